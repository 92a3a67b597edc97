"""asyncio helpers shared by every package."""

from __future__ import annotations

import asyncio

__all__ = ["reraise_if_cancelling"]


def reraise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task is being cancelled.

    Call it in an ``except`` that retries: a library may turn our cancellation into its own error
    (redis-py drops the connection and raises ``ConnectionError``), and a retry loop that caught
    that would run on after its owner asked it to stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
