"""Which event loop runs: the standard asyncio loop or uvloop, chosen by ``MARKET_LOOP``.

``MARKET_LOOP`` is ``auto`` (the default: uvloop when it is installed, ``pip install 'market[fast]'``,
else asyncio), ``uvloop`` (uvloop or a :class:`~consumer_sdk.core.errors.ConfigError`) or ``asyncio``.
uvloop runs the same coroutines (websockets, redis-py's asyncio client, subprocesses, signals) with less
time spent in the loop itself between them: on a busy process, a task woken by a socket waits less for
its turn.  :func:`run` is :func:`asyncio.run` on the chosen loop; :func:`loop_name` tells which one a
running loop is (``market bench`` reports it).
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from consumer_sdk.core.errors import ConfigError

__all__ = ["LOOP_ENV", "LOOP_NAMES", "choose_loop", "loop_factory", "loop_name", "run", "uvloop_available"]

T = TypeVar("T")

#: the environment variable that chooses the loop
LOOP_ENV: Final = "MARKET_LOOP"
#: the values it takes
LOOP_NAMES: Final = ("auto", "asyncio", "uvloop")


def uvloop_available() -> bool:
    """Whether uvloop can be imported here."""
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def choose_loop(setting: str | None = None, *, available: bool | None = None) -> str:
    """The loop to run, ``"asyncio"`` or ``"uvloop"``, for ``setting`` (default: ``$MARKET_LOOP``, else
    ``auto``); pure given ``available`` (whether uvloop imports; found out when not given)."""
    value = (setting if setting is not None else os.environ.get(LOOP_ENV, "auto")).strip().lower() or "auto"
    if value not in LOOP_NAMES:
        raise ConfigError(f"{LOOP_ENV}={value!r}: expected one of {', '.join(LOOP_NAMES)}")
    if value == "asyncio":
        return "asyncio"
    has = uvloop_available() if available is None else available
    if value == "uvloop" and not has:
        raise ConfigError(f"{LOOP_ENV}=uvloop but uvloop is not installed (pip install 'market[fast]')")
    return "uvloop" if has else "asyncio"


def loop_factory(setting: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function making a new loop of the kind :func:`choose_loop` picks."""
    if choose_loop(setting) == "uvloop":
        factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module("uvloop").new_event_loop
        return factory
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], *, setting: str | None = None, debug: bool | None = None) -> T:
    """:func:`asyncio.run` of ``main`` on the loop :func:`choose_loop` picks (``setting`` or ``$MARKET_LOOP``)."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory(setting)) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``"uvloop"`` or ``"asyncio"``: which kind ``loop`` (default: the running loop) is."""
    current = loop if loop is not None else asyncio.get_running_loop()
    return "uvloop" if type(current).__module__.split(".")[0] == "uvloop" else "asyncio"
