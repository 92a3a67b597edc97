"""The HTTP control endpoint's requests, parsed: pure code.

All are GET requests on the simulator's port (websockets answers GET only):

==============================================  =================================================
``/control/state``                              fault state and statistics
``/control/close_all[?abort=true]``             close every connection (1001), or drop the TCP
                                                connections without a close frame
``/control/stall?seconds=S``                    every connection: send nothing, read nothing
                                                (so no pong), for S seconds
``/control/refuse?seconds=S``                   answer new WebSocket handshakes with HTTP 503
``/control/faults?malformed=F&duplicate=F``     fractions of stream frames to corrupt, duplicate
``&out_of_order=F``                             or swap; parameters left out keep their value
``/control/clear``                              end stall and refusal, all fractions to 0, no
                                                REST or depth fault left armed, every REST
                                                client's weight and ban forgotten
``/control/rate?value=N``                       generate N ticks a second in total from now on
``/control/hostile?kind=K[&count=N]``           put N frames of a hostile kind into every
``[&seconds=S][&jump=J]``                       connection's live stream (see :mod:`.hostile`)
``/control/rest_faults?path=P&schedule=ITEMS``  the next requests to REST path P (``*``: any;
                                                the default) get ITEMS instead of their answer,
                                                one each: ``400``, ``418``, ``429:30`` (with
                                                ``Retry-After: 30``), ``503``, ``close`` (no
                                                answer), or a hostile answer: ``huge`` (1 GiB),
                                                ``trickle`` (a byte every 0.5 s), ``redirect``,
                                                ``bad_json``, ``other_symbol``; ``ITEM*N``
                                                repeats one, ``ITEM*`` gives it to every request;
                                                an empty schedule clears P's
``/control/depth_faults?schedule=ITEMS``        arm depth faults: ``drop`` (the next diff is not
                                                sent), ``stale:N`` (the next snapshot is N
                                                batches old), each ``@SYMBOL`` or for every book
                                                (see :mod:`.depth_faults`)
==============================================  =================================================

Each answers ``200`` with the state as JSON after the change, or ``400`` with ``{"error": msg}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from .depth_faults import DepthFault, parse_depth_faults
from .errors import SimulatorConfigError
from .hostile import HostileRequest, parse_hostile
from .rest import ALL_PATHS, RestFault, parse_rest_path, parse_rest_schedule

__all__ = ["CONTROL_PREFIX", "ControlCommand", "parse_control"]

CONTROL_PREFIX: Final = "/control/"

Action = Literal[
    "state", "close_all", "stall", "refuse", "faults", "clear", "rate", "rest_faults", "hostile", "depth_faults"
]
_ACTIONS: Final[tuple[Action, ...]] = (
    "state", "close_all", "stall", "refuse", "faults", "clear", "rate", "rest_faults", "hostile", "depth_faults",
)
_HOSTILE_PARAMS: Final = ("kind", "count", "seconds", "jump")
_RATE_NAMES: Final = ("malformed", "duplicate", "out_of_order")


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """One control request: the action and its arguments."""

    action: Action
    seconds: float = 0.0
    abort: bool = False
    rates: dict[str, float] = field(default_factory=dict)
    #: rest_faults: the REST path and the faults its next requests get
    path: str = ""
    rest_faults: tuple[RestFault, ...] = ()
    #: hostile: what to send
    hostile: HostileRequest | None = None
    #: depth_faults: the faults to arm
    depth_faults: tuple[DepthFault, ...] = ()


def _last(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _number(query: Mapping[str, Sequence[str]], name: str) -> float | str:
    text = _last(query, name)
    if text is None:
        return f"missing parameter {name!r}"
    try:
        value = float(text)
    except ValueError:
        return f"parameter {name!r} must be a number, got {text!r}"
    if not math.isfinite(value) or value < 0:
        return f"parameter {name!r} must be a number >= 0, got {text!r}"
    return value


def parse_control(path: str, query: Mapping[str, Sequence[str]]) -> ControlCommand | str:
    """``/control/<action>`` and its query -> a :class:`ControlCommand`, or an error message."""
    name = path.removeprefix(CONTROL_PREFIX).strip("/")
    action = next((a for a in _ACTIONS if a == name), None)
    if action is None:
        return f"unknown control action {name!r}; expected one of " + ", ".join(_ACTIONS)
    if action == "rest_faults":
        unknown = set(query) - {"path", "schedule"}
        if unknown:
            return f"unknown parameter {sorted(unknown)[0]!r}; expected path, schedule"
        try:
            path = parse_rest_path(_last(query, "path") or ALL_PATHS)
            faults = parse_rest_schedule(_last(query, "schedule") or "")
        except SimulatorConfigError as exc:
            return str(exc)
        return ControlCommand(action, path=path, rest_faults=faults)
    if action == "depth_faults":
        unknown = set(query) - {"schedule"}
        if unknown:
            return f"unknown parameter {sorted(unknown)[0]!r}; expected schedule"
        try:
            depth_faults = parse_depth_faults(_last(query, "schedule") or "")
        except SimulatorConfigError as exc:
            return str(exc)
        return ControlCommand(action, depth_faults=depth_faults)
    if action == "hostile":
        unknown = set(query) - set(_HOSTILE_PARAMS)
        if unknown:
            return f"unknown parameter {sorted(unknown)[0]!r}; expected " + ", ".join(_HOSTILE_PARAMS)
        hostile = parse_hostile(*(_last(query, name) for name in _HOSTILE_PARAMS))
        if isinstance(hostile, str):
            return hostile
        return ControlCommand(action, hostile=hostile)
    if action == "rate":
        value = _number(query, "value")
        if isinstance(value, str):
            return value
        return ControlCommand(action, seconds=value)
    if action in ("stall", "refuse"):
        seconds = _number(query, "seconds")
        if isinstance(seconds, str):
            return seconds
        return ControlCommand(action, seconds=seconds)
    if action == "close_all":
        abort = (_last(query, "abort") or "false").lower()
        if abort not in ("1", "0", "true", "false"):
            return f"parameter 'abort' must be true or false, got {abort!r}"
        return ControlCommand(action, abort=abort in ("1", "true"))
    if action == "faults":
        rates: dict[str, float] = {}
        for rate_name in _RATE_NAMES:
            if _last(query, rate_name) is None:
                continue
            value = _number(query, rate_name)
            if isinstance(value, str):
                return value
            if value > 1.0:
                return f"parameter {rate_name!r} must be a fraction between 0 and 1, got {value!r}"
            rates[rate_name] = value
        unknown = set(query) - set(_RATE_NAMES)
        if unknown:
            return f"unknown parameter {sorted(unknown)[0]!r}; expected " + ", ".join(_RATE_NAMES)
        return ControlCommand(action, rates=rates)
    return ControlCommand(action)
