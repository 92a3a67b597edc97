"""Shards and leases: several ingestors split the configured streams, a standby takes over a dead owner's.

The configured streams are split into ``[shards] count`` shards by a stable hash of the symbol
(:func:`shard_of`: CRC-32 of the symbol's UTF-8 bytes, modulo the count), so every channel of a symbol is
in one shard, and every ingestor given the same symbols and count computes the same split.  An ingestor
ingests only the shards it holds a lease on, at most ``max_owned`` of them; one whose peers already hold
every shard is a standby: it holds nothing and asks again every round.

Keys, all with the hash tag ``{<prefix>}`` so the scripts below find them in one slot of a Redis Cluster
(on a standalone server the names are the same):

- ``<prefix>:_lease:{<prefix>}:<shard>``: the lease, a string ``"<token> <owner id>"`` with an expiry of
  ``lease_ttl_s``.  Taken with ``SET NX PX`` only when no lease is there; renewed (``PEXPIRE``) and
  released (``DEL``) only by a script that first compares the value, so an owner whose lease expired and
  was taken can never extend or delete the new owner's.
- ``<prefix>:_lease:{<prefix>}:fence``: the fencing counter; each lease taken gets ``INCR`` of it as its
  token, so a later owner of a shard always holds a larger token than every earlier one.  The tokens
  held are in the ingestor's heartbeat (``leases`` in the document), which ``market status`` reads.

Timing: every ``lease_ttl_s / 3`` the keeper renews what it holds and tries to take free shards.  A lease
is valid, as its owner sees it, until ``lease_ttl_s`` after the moment the request that last renewed it
was *sent* (never later than Redis's own expiry); past that, or when the compare finds another value, it
is lost: the ingestor stops that shard's streams at once.  A standby finds a dead owner's shard free at
most ``lease_ttl_s`` plus one round after the owner's last renewal.

Two owners at once (an owner frozen past its lease, then woken) are harmless because of the entry IDs,
not the token: the append script stores a ``seq`` only above the stream's newest, and each ingestor
writes a stream's ids contiguously and in order, so whatever the two send, each id is stored once and
none is skipped.  The woken owner finds its lease expired at its next round and stops the shard.

:class:`LeaseTable` is the pure part (what is held, what to renew and take, what was gained or lost, all
with times passed in); :class:`LeaseStore` is the thin Redis part; :func:`keep_leases` runs them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import RedisError

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.log import Throttle, get_logger, log_event

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "DEFAULT_TTL_S",
    "Gained",
    "Held",
    "LeaseSettings",
    "LeaseStats",
    "LeaseStore",
    "LeaseTable",
    "Lost",
    "fence_key",
    "keep_leases",
    "lease_key",
    "lease_round",
    "leases_doc",
    "shard_of",
    "shard_streams",
]

log = get_logger("leases")

DEFAULT_TTL_S: Final = 3.0
#: the most shards a configuration may name
MAX_SHARDS: Final = 1024


def shard_of(symbol: str, count: int) -> int:
    """The shard of every stream of ``symbol``: CRC-32 of its UTF-8 bytes modulo ``count`` (stable across
    processes, machines and Python versions, unlike :func:`hash`)."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    return zlib.crc32(symbol.encode()) % count


def shard_streams(symbols: Iterable[str], count: int) -> dict[int, tuple[str, ...]]:
    """Each shard's symbols, in the order given; a shard no symbol hashes to maps to ``()``."""
    out: dict[int, list[str]] = {i: [] for i in range(count)}
    for s in symbols:
        out[shard_of(s, count)].append(s)
    return {i: tuple(v) for i, v in out.items()}


def lease_key(prefix: str, shard: int) -> str:
    return f"{prefix}:_lease:{{{prefix}}}:{shard}"


def fence_key(prefix: str) -> str:
    return f"{prefix}:_lease:{{{prefix}}}:fence"


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """``[shards]``: ``count`` (0: not sharded, every configured stream is ingested), ``max_owned`` (the most
    shards one ingestor holds; 0: all of them) and ``lease_ttl_s``."""

    count: int = 0
    max_owned: int = 0
    ttl_s: float = DEFAULT_TTL_S

    def __post_init__(self) -> None:
        if not 0 <= self.count <= MAX_SHARDS:
            raise ConfigError(f"shards.count: {self.count} is out of range 0..{MAX_SHARDS}")
        if not 0 <= self.max_owned <= MAX_SHARDS:
            raise ConfigError(f"shards.max_owned: {self.max_owned} is out of range 0..{MAX_SHARDS}")
        if not 0.3 <= self.ttl_s <= 600.0:
            raise ConfigError(f"shards.lease_ttl_s: {self.ttl_s} is out of range 0.3..600")

    @property
    def enabled(self) -> bool:
        return self.count > 0

    @property
    def limit(self) -> int:
        """How many shards this ingestor may hold."""
        return min(self.count, self.max_owned) if self.max_owned else self.count

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 3


@dataclass(frozen=True, slots=True)
class Held:
    token: int
    #: monotonic time until which the lease is surely ours (its last renewal's send time + ttl)
    valid_until: float
    since: float


@dataclass(frozen=True, slots=True)
class Gained:
    shard: int
    token: int


@dataclass(frozen=True, slots=True)
class Lost:
    shard: int
    token: int
    #: ``expired`` (not renewed in time, as this process sees it), ``taken`` (Redis holds another value),
    #: ``released`` (given back at a clean stop), ``abandoned`` (given up, left to expire)
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseStats:
    count: int
    max_owned: int
    ttl_s: float
    #: shard -> fencing token, of what is held now
    owned: Mapping[int, int]
    gained: int
    lost: int
    #: lease-store rounds that failed (Redis unreachable, refused, too slow)
    errors: int
    #: the last failure's text while rounds fail; "" when the last round went through
    failing: str
    failing_for_s: float


@dataclass(slots=True)
class LeaseTable:
    """What one ingestor holds and what it should do next (pure: times are passed in)."""

    settings: LeaseSettings
    held: dict[int, Held] = field(default_factory=dict)
    gained: int = 0
    lost: int = 0
    errors: int = 0
    failing: str = ""
    failing_since: float = 0.0

    def expire(self, now: float) -> list[Lost]:
        """Leases past their validity: lost (a peer may hold them by now)."""
        gone = [s for s, h in self.held.items() if h.valid_until <= now]
        return [self._drop(s, "expired") for s in sorted(gone)]

    def tokens(self) -> dict[int, int]:
        return {s: h.token for s, h in sorted(self.held.items())}

    def wanted(self) -> tuple[list[int], int]:
        """``(shards to try, how many to take)``: the free ones, in shard order, while below the limit."""
        want = self.settings.limit - len(self.held)
        if want <= 0:
            return [], 0
        return [s for s in range(self.settings.count) if s not in self.held], want

    def renewed(self, results: Mapping[int, bool], sent_at: float) -> list[Lost]:
        """The renewal sent at ``sent_at`` answered: a lease still ours is valid for another ttl; one whose
        value changed is lost (``taken``)."""
        lost: list[Lost] = []
        for shard, ok in sorted(results.items()):
            h = self.held.get(shard)
            if h is None:
                continue
            if ok:
                self.held[shard] = Held(h.token, max(h.valid_until, sent_at + self.settings.ttl_s), h.since)
            else:
                lost.append(self._drop(shard, "taken"))
        return lost

    def acquired(self, got: Iterable[tuple[int, int]], sent_at: float) -> list[Gained]:
        """Leases taken by the request sent at ``sent_at``: ``(shard, token)`` each."""
        out: list[Gained] = []
        for shard, token in got:
            if shard in self.held or not 0 <= shard < self.settings.count:
                continue
            self.held[shard] = Held(token, sent_at + self.settings.ttl_s, sent_at)
            self.gained += 1
            out.append(Gained(shard, token))
        return out

    def abandon(self, shard: int) -> Lost | None:
        """Give up a lease without releasing it in Redis (it expires there within the ttl)."""
        return self._drop(shard, "abandoned") if shard in self.held else None

    def release_all(self) -> list[Lost]:
        return [self._drop(s, "released") for s in sorted(self.held)]

    def failed(self, error: str, now: float) -> None:
        self.errors += 1
        if not self.failing:
            self.failing_since = now
        self.failing = error or "error"

    def succeeded(self) -> None:
        self.failing = ""

    def _drop(self, shard: int, reason: str) -> Lost:
        h = self.held.pop(shard)
        if reason != "released":
            self.lost += 1
        return Lost(shard, h.token, reason)

    def stats(self, now: float) -> LeaseStats:
        s = self.settings
        return LeaseStats(
            count=s.count, max_owned=s.limit, ttl_s=s.ttl_s, owned=self.tokens(), gained=self.gained,
            lost=self.lost, errors=self.errors, failing=self.failing,
            failing_for_s=max(0.0, now - self.failing_since) if self.failing else 0.0,
        )


def leases_doc(stats: LeaseStats, streams: Mapping[int, Sequence[str]]) -> dict[str, Any]:
    """The ``leases`` section of the heartbeat document (JSON-ready): what ``market status`` judges."""
    return {
        "count": stats.count, "max_owned": stats.max_owned, "ttl_s": stats.ttl_s,
        "owned": [{"shard": s, "token": t, "symbols": len(streams.get(s, ()))} for s, t in stats.owned.items()],
        "gained": stats.gained, "lost": stats.lost, "errors": stats.errors,
        "failing": stats.failing[:200] or None,
        "failing_for_s": round(stats.failing_for_s, 1) if stats.failing else None,
    }


# ---------------------------------------------------------------------------------------------- I/O
# KEYS[1]: the fence counter, KEYS[2..]: the leases to try in order.  ARGV: owner, px, how many to take.
# Returns {index, token, index, token, ...} of the leases taken (index into KEYS[2..], from 0).
_ACQUIRE: Final = """
local out, want = {}, tonumber(ARGV[3])
for i = 2, #KEYS do
  if want <= 0 then break end
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local token = redis.call('INCR', KEYS[1])
    redis.call('SET', KEYS[i], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
    out[#out + 1] = i - 2
    out[#out + 1] = token
    want = want - 1
  end
end
return out
"""
# KEYS: leases held.  ARGV[1]: owner, ARGV[2]: px, ARGV[3..]: each one's token.  Returns 1 (renewed) or 0 each.
_RENEW: Final = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 2] .. ' ' .. ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS: leases held.  ARGV[1]: owner, ARGV[2..]: each one's token.  Deletes those still ours.
_RELEASE: Final = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] .. ' ' .. ARGV[1] then
    n = n + redis.call('DEL', KEYS[i])
  end
end
return n
"""


class LeaseStore:
    """The leases of one prefix in Redis, for one owner (its heartbeat id)."""

    def __init__(self, redis: aioredis.Redis, prefix: str, owner: str) -> None:
        if " " in owner or not owner:
            raise ValueError(f"a lease owner is one word, got {owner!r}")
        self.redis, self.prefix, self.owner = redis, prefix, owner
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, shards: Sequence[int], want: int, ttl_s: float) -> list[tuple[int, int]]:
        """Take up to ``want`` of the free ``shards``: ``(shard, token)`` of each taken."""
        if not shards or want <= 0:
            return []
        keys = [fence_key(self.prefix), *(lease_key(self.prefix, s) for s in shards)]
        flat = await self._acquire(keys=keys, args=[self.owner, _px(ttl_s), want])
        pairs = [int(x) for x in flat]
        return [(shards[pairs[i]], pairs[i + 1]) for i in range(0, len(pairs), 2)]

    async def renew(self, held: Mapping[int, int], ttl_s: float) -> dict[int, bool]:
        """Extend each lease still ours (compared with its token and our id); False for one that is not."""
        if not held:
            return {}
        shards = sorted(held)
        keys = [lease_key(self.prefix, s) for s in shards]
        out = await self._renew(keys=keys, args=[self.owner, _px(ttl_s), *(held[s] for s in shards)])
        return {s: bool(int(x)) for s, x in zip(shards, out, strict=True)}

    async def release(self, held: Mapping[int, int]) -> int:
        """Delete the leases still ours; how many were."""
        if not held:
            return 0
        shards = sorted(held)
        keys = [lease_key(self.prefix, s) for s in shards]
        return int(await self._release(keys=keys, args=[self.owner, *(held[s] for s in shards)]))

    async def read(self, count: int) -> dict[int, tuple[int, str] | None]:
        """Each shard's ``(token, owner)`` as Redis holds it now (None: free)."""
        pipe = self.redis.pipeline(transaction=False)
        for s in range(count):
            pipe.get(lease_key(self.prefix, s))
        out: dict[int, tuple[int, str] | None] = {}
        for s, raw in enumerate(await pipe.execute()):
            if raw is None:
                out[s] = None
                continue
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            token, _, owner = text.partition(" ")
            out[s] = (int(token), owner)
        return out


def _px(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))


OnChange = Callable[[Sequence[Gained], Sequence[Lost]], Awaitable[None]]


async def lease_round(table: LeaseTable, store: LeaseStore, *, clock: Callable[[], float] = time.monotonic
                      ) -> tuple[list[Gained], list[Lost]]:
    """One round: drop what expired, renew what is held, take free shards up to the limit.

    Raises what Redis raised (the table counts it as failed first); bounded by one renewal period."""
    s = table.settings
    lost = table.expire(clock())
    gained: list[Gained] = []
    try:
        async with asyncio.timeout(s.renew_every_s):
            sent = clock()
            lost += table.renewed(await store.renew(table.tokens(), s.ttl_s), sent)
            shards, want = table.wanted()
            if want:
                sent = clock()
                gained = table.acquired(await store.acquire(shards, want, s.ttl_s), sent)
    except (RedisError, OSError, TimeoutError) as exc:
        reraise_if_cancelling()
        why = f"no answer within {s.renew_every_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
        table.failed(why[:200] or type(exc).__name__, clock())
        raise
    table.succeeded()
    return gained, lost


async def keep_leases(table: LeaseTable, store: LeaseStore, on_change: OnChange, *,
                      clock: Callable[[], float] = time.monotonic) -> None:
    """Every ``ttl / 3``: a :func:`lease_round`, then ``on_change(gained, lost)`` when anything changed.

    A Redis error is counted and logged (at most once a second) and never ends the loop; leases not
    renewed meanwhile expire as :meth:`LeaseTable.expire` finds.  On cancellation (a clean stop) what is
    held is released in Redis (best effort, within one second), so a standby need not wait for the ttl."""
    throttle = Throttle(log, interval=1.0)
    period = table.settings.renew_every_s
    loop = asyncio.get_running_loop()
    try:
        while True:
            began = loop.time()
            failing = bool(table.failing)
            try:
                gained, lost = await lease_round(table, store, clock=clock)
            except (RedisError, OSError, TimeoutError):
                gained, lost = [], table.expire(clock())
                throttle.log(logging.WARNING, "lease_store_failed", error=table.failing, errors=table.errors,
                             held=sorted(table.held))
            else:
                if failing:
                    log_event(log, logging.INFO, "lease_store_recovered", errors=table.errors)
            reraise_if_cancelling()  # a cancellation redis-py absorbed mid-reply: stop all the same
            if gained or lost:
                await on_change(gained, lost)
            await asyncio.sleep(max(0.0, period - (loop.time() - began)))
    finally:
        held = table.tokens()
        table.release_all()
        if held:
            try:
                async with asyncio.timeout(1.0):
                    await store.release(held)
            except (RedisError, OSError, TimeoutError):
                pass  # they expire by themselves within the ttl
