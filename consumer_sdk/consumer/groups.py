"""The streams a consumer reads and its group on each: found by pattern, created, created again on ``NOGROUP``.

:class:`Groups` owns the per-stream :class:`~consumer_sdk.consumer.batch.KeyState` objects.  Literal
keys are read whether or not they exist (the group is made with ``MKSTREAM``); globs are expanded with
``SCAN ... TYPE stream`` at set-up and on every rescan.  A group is created where it is missing: at the
consumer's start on set-up, at ``0`` for streams found later or after ``NOGROUP`` (everything in a
stream that appeared, or was re-created, after the consumer started is new to the group).  History the
group can no longer read (its position, or a start given as a time or seq, lies in trimmed history) is
handed to the ``report`` callback given at construction, which may raise.  Each method costs one
pipelined round trip per step, whatever the number of streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from redis.asyncio import Redis

from consumer_sdk.consumer.batch import KeyState
from consumer_sdk.consumer.trim import group_behind_trim
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.log import get_logger, log_event
from consumer_sdk.core.redis import fmt_id, id_after, id_before, id_str, id_tuple, stream_view
from consumer_sdk.replay import Bound, parse_bound, resolve_bound, start_trimmed

__all__ = ["Groups", "ReportTrimmed", "scan_glob", "split_pattern"]

log = get_logger("consumer")

#: ``report(state, first_missing_id, first_available_id, marker)``: history lost on ``state``'s stream
ReportTrimmed: TypeAlias = Callable[[KeyState, str, str | None, Any], None]


def split_pattern(text: str, prefix: str) -> Pattern:
    """A ``venue:SYMBOL:channel`` pattern, or a full key ``<prefix>:venue:SYMBOL:channel`` under ``prefix``."""
    parts = text.split(":")
    if len(parts) == 4:
        if parts[0] != prefix:
            raise ConfigError(f"stream key {text!r} does not start with the prefix {prefix!r}")
        return Pattern(":".join(parts[1:]))
    return Pattern(text)


def scan_glob(pattern: Pattern, prefix: str) -> str:
    """The ``SCAN MATCH`` glob for ``pattern`` (fnmatch negates a class with ``[!...]``; Redis with ``[^...]``)."""
    return pattern.redis_glob(prefix).replace("[!", "[^")


class Groups:
    """The streams matching ``patterns`` under ``prefix``, and the group ``group`` on each.

    ``start_id`` is where groups created at set-up begin (``$``, ``0`` or a
    :func:`~consumer_sdk.replay.parse_bound` start); ``report`` is told of trimmed history.
    """

    def __init__(
        self, *, patterns: Sequence[str], prefix: str, group: str, start_id: str, report: ReportTrimmed
    ) -> None:
        self.patterns = tuple(dict.fromkeys(split_pattern(p, prefix) for p in patterns))
        self.prefix = prefix
        self.group = group
        self.start_id = start_id
        self.start_bound = None if start_id in ("$", "0") else parse_bound(start_id, end=False)
        self.report = report
        self.states: dict[str, KeyState] = {}
        self.by_name: dict[Any, KeyState] = {}  # a key as bytes and as str -> its state
        self.recreated = 0  # groups created again after NOGROUP

    @property
    def has_globs(self) -> bool:
        return any(not p.is_literal for p in self.patterns)

    def active(self) -> list[KeyState]:
        """The streams being read now."""
        return [s for s in self.states.values() if s.active]

    def _is_active(self, key: str) -> bool:
        state = self.states.get(key)
        return state is not None and state.active

    def literal_keys(self) -> list[str]:
        return [p.redis_glob(self.prefix) for p in self.patterns if p.is_literal]

    def state(self, key: str, literal: bool) -> KeyState:
        """The state of ``key``, made on first use."""
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = KeyState(key, literal)
            for name in state.names:
                self.by_name[name] = state
        state.literal = state.literal or literal
        return state

    def find(self, groups: Any) -> dict[str, Any] | None:
        """This group's entry in an ``XINFO GROUPS`` reply."""
        for g in groups:
            name = g.get("name")
            if name == self.group or name == self.group.encode():
                return dict(g)
        return None

    async def scan(self, client: Redis) -> list[str]:
        """The stream keys the globs match now (one ``SCAN`` walk per glob)."""
        found: list[str] = []
        for pattern in self.patterns:
            if pattern.is_literal:
                continue
            async for raw in client.scan_iter(match=scan_glob(pattern, self.prefix), count=1000, _type="stream"):
                key = id_str(raw)
                if pattern.matches(key[len(self.prefix) + 1 :]):
                    found.append(key)
        return found

    async def setup(self, client: Redis) -> None:
        """Find the streams, make sure the group exists on each, check for trimmed history."""
        keys = dict.fromkeys(self.literal_keys(), True)
        for key in await self.scan(client):
            keys.setdefault(key, False)
        for state in self.states.values():
            state.active = False
        states = [self.state(key, literal) for key, literal in keys.items()]
        await self.ensure(client, states, None)

    async def rescan(self, client: Redis) -> None:
        """Read the streams the globs match that are not read yet, from their beginning."""
        fresh = [key for key in await self.scan(client) if not self._is_active(key)]
        if fresh:
            log_event(log, logging.INFO, "streams_found", count=len(fresh), keys=fresh[:10])
            await self.ensure(client, [self.state(k, False) for k in fresh], "0")

    async def group_start(self, client: Redis, key: str, bound: Bound | None) -> str:
        """The ID a new group starts after: ``$``, ``0``, or just before the first entry ``bound`` names."""
        if bound is None:
            return self.start_id
        if bound.kind == "open":
            return "0"
        first = await resolve_bound(client, key, bound)
        return "0" if first == "-" else fmt_id(id_before(id_tuple(first)))

    async def ensure(self, client: Redis, states: Sequence[KeyState], start_id: str | None) -> None:
        """Create the group where it is missing: at ``start_id``, or where the consumer's start names."""
        if not states:
            return
        starts = [
            start_id if start_id is not None else await self.group_start(client, s.key, self.start_bound)
            for s in states
        ]
        async with client.pipeline(transaction=False) as pipe:
            for state, start in zip(states, starts, strict=True):
                pipe.xgroup_create(state.key, self.group, id=start, mkstream=state.literal)
            results = await pipe.execute(raise_on_error=False)
        existing: list[KeyState] = []
        created: list[KeyState] = []
        for state, result in zip(states, results, strict=True):
            if isinstance(result, Exception):
                text = str(result)
                if text.startswith("BUSYGROUP"):
                    existing.append(state)
                elif "requires the key to exist" in text:
                    state.active = False  # gone since it was found; a rescan will find it again
                    continue
                else:
                    raise result
            else:
                created.append(state)
            state.active = True
            state.cursor = "0"
        await self.check_positions(client, existing)
        bound = self.start_bound
        if start_id is None and bound is not None and bound.kind != "open" and created:
            await self.check_start(client, created, bound)

    async def check_start(self, client: Redis, states: Sequence[KeyState], bound: Bound) -> None:
        """Report streams where a start given as a time or seq lies in trimmed history."""
        async with client.pipeline(transaction=False) as pipe:
            for state in states:
                pipe.xinfo_stream(state.key)
            results = await pipe.execute(raise_on_error=False)
        for state, info in zip(states, results, strict=True):
            if isinstance(info, Exception):
                continue
            view = stream_view(info)
            if start_trimmed(bound, view):
                available = None if view.first_held is None else fmt_id(view.first_held)
                self.report(state, bound.text, available, ("start", bound.text))

    async def check_positions(self, client: Redis, states: Sequence[KeyState]) -> None:
        """Report streams where the group's position lies before history the stream trimmed away."""
        if not states:
            return
        async with client.pipeline(transaction=False) as pipe:
            for state in states:
                pipe.xinfo_groups(state.key)
                pipe.xinfo_stream(state.key)
            results = await pipe.execute(raise_on_error=False)
        for i, state in enumerate(states):
            groups, stream = results[2 * i], results[2 * i + 1]
            if isinstance(groups, Exception) or isinstance(stream, Exception):
                continue
            mine = self.find(groups)
            if mine is None:
                continue
            view = stream_view(stream)
            position = id_tuple(mine.get("last-delivered-id") or "0-0")
            # Redis estimates the lag of a group whose read counter it lost (after XGROUP SETID) as if
            # it had read everything trimmed: only a lag from a known counter tells trimmed entries.
            lag = mine.get("lag") if mine.get("entries-read") is not None else None
            if not group_behind_trim(position, lag if isinstance(lag, int) else None, view):
                continue
            if view.first_held is not None and view.first_held > position:
                available: str | None = fmt_id(view.first_held)
            else:
                rows: Any = await client.xrange(state.key, "(" + fmt_id(position), "+", count=1)
                available = id_str(rows[0][0]) if rows else None
            self.report(state, fmt_id(id_after(position)), available, ("group", position))

    async def recover(self, client: Redis) -> None:
        """After NOGROUP: create the group again at 0 wherever it is missing."""
        active = self.active()
        async with client.pipeline(transaction=False) as pipe:
            for state in active:
                pipe.xgroup_create(state.key, self.group, id="0", mkstream=state.literal)
            results = await pipe.execute(raise_on_error=False)
        for state, result in zip(active, results, strict=True):
            if isinstance(result, Exception):
                text = str(result)
                if text.startswith("BUSYGROUP"):
                    continue
                if "requires the key to exist" in text:
                    state.active = False
                    log_event(log, logging.WARNING, "stream_gone", key=state.key, group=self.group)
                    continue
                raise result
            self.recreated += 1
            state.cursor = ">"  # a new group has nothing pending
            log_event(log, logging.WARNING, "group_recreated", key=state.key, group=self.group, start="0")
