# size: the one place the project meets redis-py: entry IDs, replies, errors and making clients (standalone or
#   cluster); each part is small and the callers want them from one module.
"""Thin helpers around redis-py shared by every package.

- :func:`iter_read_reply` flattens the four shapes redis-py returns for XREAD/XREADGROUP
  (RESP2 or RESP3, legacy or unified responses) into ``(key, entries)`` pairs.
- :func:`raw_stream_client` reads XREADGROUP and XAUTOCLAIM replies as they come off the wire
  (no dict built per entry); :func:`field_value` finds a field in such an entry.
- :func:`xack_many` acknowledges entries of several streams in one write, packed ahead.
- :func:`blocking_client` gives a client whose socket timeout outlasts a ``BLOCK``.
- :func:`classify_redis` is the one classifier of Redis errors (a reason and a kind), shared by the
  writer, the consumer and replay; :func:`classify` and :func:`translate` map redis exceptions onto
  :mod:`consumer_sdk.core.errors` for a reader.
- :func:`connect_redis` gives a client that has answered ``PING`` on a supported server: a
  :class:`redis.asyncio.cluster.RedisCluster` for a ``redis+cluster://`` URL (:func:`cluster_client`), typed
  as :class:`~redis.asyncio.Redis` like every other client (the commands the project sends are the same);
  :func:`is_cluster` tells them apart where the two differ (connection pools, multi-stream reads).
- Entry IDs are compared as ``(ms, seq)`` tuples; :func:`id_before` and :func:`id_after`
  give the neighbouring IDs for exclusive ranges.
"""

from __future__ import annotations

import enum
import inspect
import os
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast
from urllib.parse import parse_qs, urlsplit

import redis.exceptions as rexc
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from consumer_sdk.core.errors import ConfigError, MarketError, Retryable, TransientError
from consumer_sdk.core.server import require_supported
from consumer_sdk.core.urls import TLS_FILE_OPTIONS, is_cluster_url, parse_cluster_url, redact_url

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    _hiredis_pack = None
else:
    _hiredis_pack = cast(Callable[[tuple[Any, ...]], bytes], _pack)
#: hiredis's ``pack_command`` (a tuple of bytes, str or int arguments -> the RESP bytes to write), or None
#: without hiredis: several times faster than redis-py's own packing, which encodes each argument in Python
hiredis_pack: Final = _hiredis_pack

__all__ = [
    "CLUSTER_IDLE_S",
    "FAULT_REASONS",
    "MAX_SEQ",
    "Entry",
    "ErrorKind",
    "Fields",
    "IdT",
    "RedisFault",
    "StreamView",
    "blocking_client",
    "classify",
    "classify_redis",
    "client_kwargs",
    "cluster_client",
    "cluster_raw_client",
    "connect_redis",
    "effective_socket_timeout",
    "field_name",
    "field_value",
    "fmt_id",
    "hiredis_pack",
    "id_after",
    "id_before",
    "id_str",
    "id_tuple",
    "is_cluster",
    "iter_read_reply",
    "pack_xack",
    "pool_connection",
    "raw_stream_client",
    "stream_view",
    "translate",
    "xack_many",
    "xinfo_stream",
]

MAX_SEQ: Final = 2**64 - 1
#: On a Redis Cluster, how long a reader whose read found nothing waits before reading again (seconds): one
#: blocking ``XREAD``/``XREADGROUP`` cannot wait on streams of several hash slots.
CLUSTER_IDLE_S: Final = 0.01
DEFAULT_SOCKET_TIMEOUT: Final = 5.0
# Extra seconds a blocking read's socket timeout allows beyond the BLOCK itself.
BLOCK_MARGIN_S: Final = 10.0
# Connection kwargs a pool adds for itself; a copied pool builds its own.
_POOL_OWN_KWARGS: Final = frozenset(
    {
        "himport_registry",
        "maint_notifications_pool_handler",
        "orig_host_address",
        "orig_socket_timeout",
        "orig_socket_connect_timeout",
    }
)

Fields: TypeAlias = Mapping[Any, Any]
Entry: TypeAlias = tuple[Any, Fields]
IdT: TypeAlias = tuple[int, int]


# ---------------------------------------------------------------- entry IDs


def id_str(entry: bytes | str) -> str:
    return entry.decode() if isinstance(entry, bytes) else entry


def id_tuple(entry: bytes | str) -> IdT:
    """``"1700000000000-5"`` -> ``(1700000000000, 5)``; a bare ``"ms"`` is ``(ms, 0)``."""
    text = id_str(entry)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def id_before(entry: IdT) -> IdT:
    """The greatest ID strictly below ``entry`` (``(0, 0)`` has none: returns itself)."""
    ms, seq = entry
    if seq > 0:
        return ms, seq - 1
    if ms > 0:
        return ms - 1, MAX_SEQ
    return 0, 0


def id_after(entry: IdT) -> IdT:
    """The least ID strictly above ``entry``."""
    ms, seq = entry
    if seq < MAX_SEQ:
        return ms, seq + 1
    return ms + 1, 0


def fmt_id(entry: IdT) -> str:
    return f"{entry[0]}-{entry[1]}"


# ---------------------------------------------------------------- replies


def iter_read_reply(reply: Any) -> Iterator[tuple[Any, Sequence[Entry]]]:
    """``(key, [(entry_id, fields), ...])`` for every stream in an XREAD/XREADGROUP reply.

    Keys and IDs stay as redis-py returned them (bytes unless ``decode_responses``).
    """
    if not reply:
        return
    pairs: Any = reply.items() if isinstance(reply, dict) else reply
    for key, entries in pairs:
        # RESP3 with legacy responses wraps each stream's entries in one more list.
        if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], tuple):
            entries = entries[0]
        yield key, entries


def field_value(fields: Any, name: bytes | str) -> Any:
    """The value of field ``name`` in an entry's fields, or ``None`` when it has none.

    ``fields`` as the server sent them (``[name1, value1, name2, value2, ...]``) or as a mapping;
    a name given twice: the last value wins, as in the dict redis-py builds.
    """
    if not fields:
        return None
    if isinstance(fields, Mapping):
        return fields.get(name)
    value = None
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            value = fields[i + 1]
    return value


def _as_sent(response: Any, **_options: Any) -> Any:
    return response


def raw_stream_client(client: Redis) -> Redis:
    """A client on ``client``'s connection pool that leaves XREADGROUP and XAUTOCLAIM replies as parsed.

    An entry is ``[entry_id, [field, value, ...]]`` (``[entry_id, None]`` for a pending entry whose
    content was deleted) instead of a tuple holding a new dict: on a large read, building those
    dicts costs more than the read itself.  An XREADGROUP reply is a list of ``[key, entries]``
    (RESP2) or a dict of ``key: entries`` (RESP3); :func:`iter_read_reply` takes both.  The new
    client owns nothing: closing ``client`` (or its pool) is all the cleanup there is.
    """
    if is_cluster(client):
        raise TypeError("a Redis Cluster client has no pool to share: use cluster_raw_client")
    raw = Redis(connection_pool=client.connection_pool)
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        raw.set_response_callback(command, _as_sent)
    return raw


def cluster_raw_client(client: Redis) -> Redis:
    """For a Redis Cluster client: a new one, on the same nodes and settings, that leaves XREADGROUP and
    XAUTOCLAIM replies as parsed (see :func:`raw_stream_client`).  A cluster client has no pool to share:
    this one owns its connections, and the caller closes it (``aclose``)."""
    raw = _cluster_copy(client, {})
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        raw.set_response_callback(command, _as_sent)
    return raw


def pack_xack(key: bytes, group: bytes, ids: Sequence[bytes | str], *, use_hiredis: bool = True) -> bytes:
    """``XACK key group id ...`` as the bytes to write (RESP, one bulk string per argument)."""
    if use_hiredis and _hiredis_pack is not None:
        return _hiredis_pack((b"XACK", key, group, *ids))
    head = b"*%d\r\n$4\r\nXACK\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(ids) + 3, len(key), key, len(group), group)
    raw = [i.encode() if isinstance(i, str) else i for i in ids]
    return b"".join([head, *[b"$%d\r\n%b\r\n" % (len(i), i) for i in raw]])


_WANTS_COMMAND_NAME: dict[type, bool] = {}


async def pool_connection(pool: Any) -> Any:
    """A connection from ``pool`` (redis-py before 5.3 wants a command name; later ones warn about it)."""
    cls = type(pool)
    wants = _WANTS_COMMAND_NAME.get(cls)
    if wants is None:
        parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
        wants = _WANTS_COMMAND_NAME[cls] = parameter is not None and parameter.default is inspect.Parameter.empty
    return await (pool.get_connection("XACK") if wants else pool.get_connection())


async def xack_many(client: Redis, group: str, acks: Sequence[tuple[str, Sequence[bytes | str]]]) -> int:
    """Acknowledge ``ids`` in ``group`` for each ``(key, ids)``; how many were pending.

    The same as a pipeline of ``client.xack(key, group, *ids)``, written as bytes packed here:
    redis-py packs each ID as an argument of its own, in Python, which costs more than the XACK
    itself.  One connection of the client's pool, one write, one reply per stream read in turn.
    An error reply (a key that is not a stream) is raised once every reply has been read.  On a Redis
    Cluster: a pipeline of ``XACK`` (one round trip per node, the nodes at once).
    """
    if is_cluster(client):
        return await _xack_cluster(client, group, acks)
    pool: Any = client.connection_pool
    encode: Callable[[Any], bytes] = pool.get_encoder().encode  # the client's encoding of keys and names
    name = encode(group)
    payload = [pack_xack(encode(key), name, ids) for key, ids in acks]
    conn = await pool_connection(pool)
    acked = 0
    error: rexc.ResponseError | None = None
    try:
        await conn.send_packed_command(payload)
        for _ in payload:
            try:
                acked += int(await conn.read_response())
            except rexc.ResponseError as exc:  # the reply was read: the connection is still in step
                error = error or exc
    finally:  # any other error has closed the connection: it reconnects when next used
        await pool.release(conn)
    if error is not None:
        raise error
    return acked


async def _xack_cluster(client: Redis, group: str, acks: Sequence[tuple[str, Sequence[bytes | str]]]) -> int:
    pipe = client.pipeline(transaction=False)
    for key, ids in acks:
        pipe.xack(key, group, *ids)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    error = next((r for r in replies if isinstance(r, Exception)), None)
    if error is not None:
        raise error
    return sum(int(r) for r in replies)


def client_kwargs(client: Redis) -> Mapping[str, Any]:
    """The settings of the client's connections (a standalone client's pool's, a cluster client's own)."""
    if is_cluster(client):
        return cast(RedisCluster, client).get_connection_kwargs()
    return cast(Mapping[str, Any], client.connection_pool.connection_kwargs)


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (made by :func:`cluster_client`)."""
    return isinstance(client, RedisCluster)


def field_name(client: Redis) -> bytes | str:
    """The name of the tick field as this client returns it (``b"d"``, or ``"d"`` when decoding)."""
    return "d" if client_kwargs(client).get("decode_responses") else b"d"


async def xinfo_stream(client: Redis, key: str) -> dict[str, Any] | None:
    """``XINFO STREAM`` as a dict with str keys, or ``None`` when the key does not exist."""
    try:
        info: dict[str, Any] = await client.xinfo_stream(key)
    except rexc.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return info


@dataclass(frozen=True, slots=True)
class StreamView:
    """What ``XINFO STREAM`` says about trimming, reduced to what the decisions need.

    Redis 7.0 moves ``max-deleted-entry-id`` only on ``XDEL``; trimming (``XTRIM``, ``XADD MAXLEN``)
    shows as the first entry moving on and ``entries-added`` exceeding ``length``.
    """

    first_held: IdT | None  # oldest entry still held; None when the stream is empty or gone
    last_generated: IdT | None  # the last ID ever added; None when the stream is gone
    length: int
    max_deleted: IdT | None  # newest ID removed by XDEL (None: none, or Redis < 7)
    entries_added: int | None  # entries ever added (None: Redis < 7)

    @property
    def deleted(self) -> bool | None:
        """Whether any entry was ever removed (trimmed or deleted); ``None`` when Redis cannot tell (< 7)."""
        if self.max_deleted is not None:
            return True
        if self.entries_added is None:
            return None
        return self.entries_added > self.length


def stream_view(info: Mapping[str, Any] | None) -> StreamView:
    if info is None:
        return StreamView(None, None, 0, None, None)
    first = info.get("first-entry")
    first_held = id_tuple(first[0]) if first and first[0] is not None else None
    last = info.get("last-generated-id")
    deleted = info.get("max-deleted-entry-id")
    max_deleted = id_tuple(deleted) if deleted is not None else None
    added = info.get("entries-added")
    return StreamView(
        first_held=first_held,
        last_generated=id_tuple(last) if last is not None else None,
        length=int(info.get("length") or 0),
        max_deleted=None if max_deleted == (0, 0) else max_deleted,
        entries_added=None if added is None else int(added),
    )


# ---------------------------------------------------------------- clients


def effective_socket_timeout(client: Redis) -> float | None:
    """The read timeout of the client's connections (``None``: wait forever)."""
    kwargs = client_kwargs(client)
    if "socket_timeout" in kwargs:
        value = kwargs["socket_timeout"]
        return None if value is None else float(value)
    return DEFAULT_SOCKET_TIMEOUT


def blocking_timeout(block_ms: int) -> float:
    """A socket timeout comfortably above a ``BLOCK block_ms``."""
    return block_ms / 1000.0 + BLOCK_MARGIN_S


def blocking_client(client: Redis | str, block_ms: int) -> tuple[Redis, bool]:
    """A client on which ``BLOCK block_ms`` cannot hit the socket timeout, and whether the caller owns it.

    A URL gets a new client with a fitting ``socket_timeout``, a health check and no
    retries of its own (callers retry with backoff and count).  A given client is
    returned as is when its timeout is long enough; otherwise a dedicated pool with
    the same connection settings and a longer timeout is built (the caller closes it).
    """
    timeout = blocking_timeout(block_ms)
    if isinstance(client, str) and is_cluster_url(client):
        made = cluster_client(client, socket_timeout=timeout, socket_connect_timeout=5.0, health_check_interval=30)
        return made, True
    if isinstance(client, str):
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        owned = Redis.from_url(
            client,
            socket_timeout=timeout,
            socket_connect_timeout=5.0,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )
        return owned, True
    current = effective_socket_timeout(client)
    if current is None or current >= block_ms / 1000.0 + 1.0:
        return client, False
    if is_cluster(client):
        return _cluster_copy(client, {"socket_timeout": timeout}), True
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _POOL_OWN_KWARGS}
    kwargs["socket_timeout"] = timeout
    new_pool = ConnectionPool(connection_class=pool.connection_class, **kwargs)
    dedicated = Redis(connection_pool=new_pool)
    dedicated.auto_close_connection_pool = True
    return dedicated, True


#: the settings a cluster client takes (the rest of what a URL may carry, it refuses)
_CLUSTER_TAKES: Final = frozenset(inspect.signature(RedisCluster.__init__).parameters) - {
    "self", "host", "port", "startup_nodes", "db", "path",
}


def cluster_client(url: str, **settings: Any) -> Redis:
    """A Redis Cluster client (not yet connected) for a ``redis+cluster://`` URL
    (:func:`~consumer_sdk.core.urls.parse_cluster_url`): every node named is a start-up node, the URL's
    login and options apply to every node, ``settings`` win over the options.  It follows ``MOVED`` and
    ``ASK`` and finds the nodes again after a failover.  :class:`ConfigError` for an option a cluster
    client does not take.  Typed as :class:`~redis.asyncio.Redis`: the commands the project sends are
    the same (:func:`is_cluster` tells them apart)."""
    from redis.asyncio.connection import parse_url

    parsed = parse_cluster_url(url)
    options: dict[str, Any] = dict(parse_url(parsed.node_url(*parsed.nodes[0])))
    for name in ("host", "port", "db", "path", "connection_class"):
        options.pop(name, None)
    options.update(settings)
    refused = sorted(set(options) - _CLUSTER_TAKES)
    if refused:
        where = redact_url(url)
        raise ConfigError(f"invalid Redis Cluster URL {where!r}: a cluster client does not take {refused[0]!r}")
    nodes = [ClusterNode(host, port) for host, port in parsed.nodes]
    return cast(Redis, RedisCluster(startup_nodes=nodes, ssl=parsed.tls, **options))


#: connection settings of a cluster client that a copy of it takes as they are
_COPIED: Final = (
    "username", "password", "decode_responses", "encoding", "encoding_errors", "socket_timeout",
    "socket_connect_timeout", "socket_keepalive", "socket_keepalive_options", "health_check_interval",
    "client_name", "protocol", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
    "ssl_check_hostname", "ssl_ca_data", "ssl_ciphers", "ssl_min_version",
)


def _cluster_copy(client: Redis, settings: Mapping[str, Any]) -> Redis:
    """A new cluster client on ``client``'s known nodes, with its connection settings and ``settings``."""
    from redis.asyncio.connection import SSLConnection

    cluster = cast(RedisCluster, client)
    kwargs = cluster.get_connection_kwargs()
    options: dict[str, Any] = {k: kwargs[k] for k in _COPIED if k in kwargs and kwargs[k] is not None}
    options["ssl"] = issubclass(cast(type, kwargs.get("connection_class", object)), SSLConnection)
    options.update(settings)
    nodes = [ClusterNode(n.host, n.port) for n in cluster.get_nodes()] or [
        ClusterNode(n.host, n.port) for n in cluster.nodes_manager.startup_nodes.values()
    ]
    return cast(Redis, RedisCluster(startup_nodes=nodes, **options))


# ---------------------------------------------------------------- errors


class ErrorKind(enum.Enum):
    """What a Redis error means, the project's one rule (:mod:`consumer_sdk.core.errors`)."""

    TRANSIENT = "transient"  # Redis away or busy for now: back off and retry, it passes by itself
    NOGROUP = "nogroup"  # the group (or the stream) is gone: recreate the group
    FATAL = "fatal"  # refused until someone acts (memory, ACL, key type, settings): retrying alone will not help


@dataclass(frozen=True, slots=True)
class RedisFault:
    """One error met talking to Redis: ``reason``, a bounded label (see :data:`FAULT_REASONS`), and its kind."""

    reason: str
    kind: ErrorKind

    @property
    def retryable(self) -> bool:
        """Whether waiting alone may fix it (:attr:`ErrorKind.TRANSIENT`)."""
        return self.kind is ErrorKind.TRANSIENT


_T, _N, _F = ErrorKind.TRANSIENT, ErrorKind.NOGROUP, ErrorKind.FATAL
_UNREACHABLE: Final = RedisFault("unreachable", _T)
_AUTH: Final = RedisFault("auth", _F)
_NOGROUP: Final = RedisFault("nogroup", _N)
_BAD_ID: Final = RedisFault("bad_id", _F)
_OTHER: Final = RedisFault("other", _F)
#: redis-py's exception classes, most specific first (it strips the reply's first word from their text)
_BY_EXCEPTION: Final[tuple[tuple[type[BaseException], RedisFault], ...]] = (
    (rexc.OutOfMemoryError, RedisFault("oom", _F)),
    (rexc.ReadOnlyError, RedisFault("readonly", _T)),
    (rexc.BusyLoadingError, RedisFault("loading", _T)),  # a ConnectionError to redis-py, a reply to us
    (rexc.NoScriptError, RedisFault("noscript", _F)),
    (rexc.MasterDownError, RedisFault("masterdown", _T)),  # a ClusterDownError
    (rexc.ClusterDownError, RedisFault("clusterdown", _T)),
    (rexc.TryAgainError, RedisFault("tryagain", _T)),
    (rexc.AskError, RedisFault("moved", _F)),  # MovedError is an AskError
    (rexc.NoPermissionError, RedisFault("noperm", _F)),
    (rexc.AuthenticationError, _AUTH),  # a ConnectionError
    (rexc.AuthorizationError, _AUTH),  # a ConnectionError
    (rexc.ConnectionError, _UNREACHABLE),
    (rexc.TimeoutError, _UNREACHABLE),
    (OSError, _UNREACHABLE),
    (Retryable, RedisFault("transient", _T)),  # ours, e.g. TransientError raised around a Redis call
)
#: the first word of an error reply (what a script returns, and what redis-py leaves in the text of a
#: plain ResponseError)
_BY_WORD: Final[Mapping[str, RedisFault]] = {
    "OOM": RedisFault("oom", _F),
    "READONLY": RedisFault("readonly", _T),
    "LOADING": RedisFault("loading", _T),
    "BUSY": RedisFault("busy", _T),
    "NOSCRIPT": RedisFault("noscript", _F),
    "MASTERDOWN": RedisFault("masterdown", _T),
    "CLUSTERDOWN": RedisFault("clusterdown", _T),
    "TRYAGAIN": RedisFault("tryagain", _T),
    "MOVED": RedisFault("moved", _F),
    "ASK": RedisFault("moved", _F),
    "MISCONF": RedisFault("misconf", _F),
    "NOREPLICAS": RedisFault("noreplicas", _F),
    "NOPERM": RedisFault("noperm", _F),
    "NOAUTH": _AUTH,
    "WRONGPASS": _AUTH,
    "WRONGTYPE": RedisFault("wrongtype", _F),
    "NOGROUP": _NOGROUP,
    "UNBLOCKED": _NOGROUP,  # the stream was deleted while a read was blocked on it
}
#: ``ERR`` replies naming an entry ID that XADD can never accept
_BAD_ID_TEXTS: Final = ("The ID specified in XADD", "Invalid stream ID")
#: every ``reason`` :func:`classify_redis` can give (bounded: fit for a metric label)
FAULT_REASONS: Final = tuple(
    sorted({f.reason for f in (*(f for _, f in _BY_EXCEPTION), *_BY_WORD.values(), _BAD_ID, _OTHER)})
)


def classify_redis(error: BaseException | str) -> RedisFault:
    """The one classifier of Redis errors: an exception, or the text of an error reply (a script's).

    Pure, O(1); by redis-py's exception class first, then by the reply's first word.

    =============================================  ===========  =========
    error (exception class / reply's first word)   reason       kind
    =============================================  ===========  =========
    ConnectionError, TimeoutError, OSError         unreachable  TRANSIENT
    ReadOnlyError / ``READONLY``                   readonly     TRANSIENT
    BusyLoadingError / ``LOADING``                 loading      TRANSIENT
    ``BUSY`` (a script or function running)        busy         TRANSIENT
    MasterDownError / ``MASTERDOWN``               masterdown   TRANSIENT
    ClusterDownError / ``CLUSTERDOWN``             clusterdown  TRANSIENT
    TryAgainError / ``TRYAGAIN``                   tryagain     TRANSIENT
    a :class:`~consumer_sdk.core.errors.Retryable`  transient    TRANSIENT
    ``NOGROUP``, ``UNBLOCKED``                     nogroup      NOGROUP
    OutOfMemoryError / ``OOM``                     oom          FATAL
    NoScriptError / ``NOSCRIPT``                   noscript     FATAL
    MovedError, AskError / ``MOVED``, ``ASK``      moved        FATAL
    ``MISCONF`` (snapshots failing)                misconf      FATAL
    ``NOREPLICAS`` (min-replicas-to-write)         noreplicas   FATAL
    NoPermissionError / ``NOPERM``                 noperm       FATAL
    AuthenticationError, AuthorizationError /      auth         FATAL
    ``NOAUTH``, ``WRONGPASS``
    ``WRONGTYPE`` (the key is not a stream)        wrongtype    FATAL
    ``ERR The ID specified in XADD ...``,          bad_id       FATAL
    ``ERR Invalid stream ID ...``
    anything else                                  other        FATAL
    =============================================  ===========  =========

    The rule: TRANSIENT is Redis away or busy for a while, which passes without anyone acting; FATAL
    is a refusal that lasts until someone acts (memory, ACLs, a key of the wrong type, settings).  OOM
    is FATAL: Redis refuses writes until maxmemory is raised or data goes.  Each caller then acts on
    its own stakes: a reader (:class:`~consumer_sdk.consumer.Consumer`, replay, ``market tail``)
    retries TRANSIENT, recreates its group on NOGROUP and raises on FATAL (:func:`translate`),
    since nothing is lost by stopping: the entries stay in their streams.  The writer
    (:func:`distributor.writer.classify_error`) holds and spills every tick whatever the kind,
    except those Redis can never store (``wrongtype``, ``bad_id``: dead-lettered), since dropping
    ticks is worse than waiting for a person; it reports the reason meanwhile.
    """
    if not isinstance(error, str):
        for cls, found in _BY_EXCEPTION:
            if isinstance(error, cls):
                return found
        if not isinstance(error, rexc.ResponseError):
            return _OTHER
        error = str(error)
    word, _, rest = error.partition(" ")
    by_word = _BY_WORD.get(word)
    if by_word is not None:
        return by_word
    text = rest if word == "ERR" else error  # redis-py strips "ERR " from a ResponseError's text
    if text.startswith(_BAD_ID_TEXTS):
        return _BAD_ID
    return _OTHER


def classify(exc: BaseException) -> ErrorKind:
    """What a reader does about ``exc``: the kind :func:`classify_redis` gives."""
    return classify_redis(exc).kind


def translate(exc: BaseException, what: str = "redis") -> MarketError:
    """The :mod:`consumer_sdk.core.errors` exception for a redis exception (raise it ``from exc``)."""
    kind = classify(exc)
    if kind is ErrorKind.TRANSIENT:
        return TransientError(f"{what}: {type(exc).__name__}: {exc}")
    text = str(exc)
    if text.startswith("WRONGTYPE"):
        return ConfigError(f"{what}: key holds a value that is not a stream ({text})")
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError | rexc.NoPermissionError):
        return ConfigError(f"{what}: not allowed: {text}")
    return MarketError(f"{what}: {type(exc).__name__}: {text}")


# ---------------------------------------------------------------- connecting


async def connect_redis(url: str, *, socket_timeout: float = 10.0) -> Redis:
    """A client for ``url`` that has answered PING; :class:`TransientError` naming the (redacted) URL if not,
    :class:`ConfigError` when the server is older than the supported floor (:mod:`consumer_sdk.core.server`),
    when a TLS file the URL names (:data:`~consumer_sdk.core.urls.TLS_FILE_OPTIONS`) cannot be read, when
    the TLS handshake fails (a certificate the CA given does not verify, ...) and when Redis refuses the
    user or password: retrying fixes none of these.

    Costs one connection, a ``PING`` and an ``INFO server``; the caller closes the client.
    """
    where = redact_url(url)
    _check_tls_files(url, where)
    settings: dict[str, Any] = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": 5.0, "health_check_interval": 30,
    }
    cluster = is_cluster_url(url)
    client = cluster_client(url, **settings) if cluster else Redis.from_url(url, **settings)
    try:
        if cluster:
            await _initialize_cluster(client, where)
        await client.ping()
        await require_supported(client, where)
        if not cluster:
            await _refuse_cluster_node(client, where)
    except rexc.AuthenticationError as exc:
        await client.aclose()
        raise ConfigError(f"Redis at {where} refused the credentials: {exc}") from None
    except (rexc.RedisError, OSError) as exc:
        await client.aclose()
        if isinstance(exc.__cause__, ssl.SSLError):
            hint = ""
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                hint = " (the server's certificate does not verify against the CA in ssl_ca_certs, or the system's)"
            raise ConfigError(f"TLS with Redis at {where} failed: {exc}{hint}") from None
        raise TransientError(f"Redis unreachable at {where}: {exc}") from None
    except ConfigError:
        await client.aclose()
        raise
    return client


async def _initialize_cluster(client: Redis, where: str) -> None:
    """Learn the cluster's nodes and slots; :class:`ConfigError` when the nodes named are no cluster, or the
    cluster leaves slots uncovered (the error redis-py gives names which)."""
    try:
        await cast(RedisCluster, client).initialize()
    except rexc.RedisClusterException as exc:
        text = str(exc)
        if "cluster mode is not enabled" in text.lower():
            raise ConfigError(f"Redis at {where} is a standalone server, not a cluster: use a redis:// URL") from None
        if "not covered" in text.lower():
            raise ConfigError(f"the Redis Cluster at {where} does not serve every hash slot: {text}") from None
        if isinstance(exc.__cause__, rexc.AuthenticationError | rexc.AuthorizationError):
            raise ConfigError(f"Redis at {where} refused the credentials: {exc.__cause__}") from None
        raise TransientError(f"Redis Cluster unreachable at {where}: {text}") from None


async def _refuse_cluster_node(client: Redis, where: str) -> None:
    """:class:`ConfigError` when a plain URL reaches a node of a Redis Cluster (keys in other nodes' slots
    would be refused with ``MOVED``): the URL must say ``redis+cluster://``.  One ``INFO cluster``."""
    info = await client.info("cluster")
    if info.get("cluster_enabled"):
        raise ConfigError(
            f"Redis at {where} is a node of a Redis Cluster: name it with redis+cluster://host:port[,host:port...]"
        )


def _check_tls_files(url: str, where: str) -> None:
    """:class:`ConfigError` naming the option when a TLS file the URL names is not a readable file."""
    query = urlsplit(url).query
    if not query:
        return
    options = parse_qs(query)
    for name in TLS_FILE_OPTIONS:
        path = options.get(name, [""])[0]  # redis-py takes the first
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"invalid Redis URL {where!r}: {name}: no readable file at {path!r}")
