"""asyncio helpers shared by every package."""

from __future__ import annotations

import asyncio

__all__ = ["reraise_if_cancelling"]


def reraise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task is being cancelled.

    Call it in an ``except`` that retries, and after each Redis call of a loop that runs until cancelled:
    redis-py may turn our cancellation into its own error (it drops the connection and raises
    ``ConnectionError``) or absorb it and return the reply as if nothing happened (seen with redis-py 8
    on single commands and pipelines alike), and a loop that went on would outlive its owner's stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
