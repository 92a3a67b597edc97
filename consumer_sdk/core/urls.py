"""Redis URLs: the default, the check, and the one redactor that keeps secrets out of logs and documents.

A Redis Cluster is named by ``redis+cluster://[user:password@]host:port[,host:port...][/0][?options]`` (or
``rediss+cluster://`` over TLS): one or more of its nodes, from which a client learns the rest
(:func:`parse_cluster_url`).  A cluster has one database, 0.

Pure; every function is O(length of the URL), the check of the query's options O(options x the names
redis-py's connection takes).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from consumer_sdk.core.env import nearest
from consumer_sdk.core.errors import ConfigError

__all__ = [
    "CLUSTER_SCHEMES",
    "DEFAULT_REDIS_URL",
    "TLS_FILE_OPTIONS",
    "ClusterUrl",
    "is_cluster_url",
    "parse_cluster_url",
    "public_url",
    "redact_url",
    "validate_redis_url",
]

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
#: the URL options that name a file the TLS handshake reads (``rediss://...?ssl_ca_certs=/path/ca.pem``)
TLS_FILE_OPTIONS: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_UNPARSEABLE: Final = "<unparseable URL>"
#: the schemes that name a Redis Cluster, and whether each speaks TLS
CLUSTER_SCHEMES: Final = {"redis+cluster": False, "rediss+cluster": True}


def redact_url(url: str, *, keep_query: bool = True) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``; never raises.

    A URL without a password comes back as written.  ``keep_query=False`` also drops the query and the
    fragment (where tokens travel) and rebuilds the URL even without a password (:func:`public_url`).
    """
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
        user = parts.username
    except ValueError:
        return _UNPARSEABLE
    if keep_query and not has_password:
        return url
    # Keep the host part exactly as written (IPv6 brackets, a port even if invalid): only the secret goes.
    hostport = parts.netloc.rpartition("@")[2]
    netloc = hostport
    if has_password:
        netloc = f"{user or ''}:***@{hostport}"
    elif user:
        netloc = f"{user}@{hostport}"
    query, fragment = (parts.query, parts.fragment) if keep_query else ("", "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def public_url(url: str) -> str:
    """The URL with no password, query or fragment: fit for a document others read (the heartbeat)."""
    return redact_url(url, keep_query=False)


def validate_redis_url(url: str) -> str:
    """``url`` itself when it is a ``redis://``, ``rediss://`` or ``unix://`` URL with a host where one is
    needed, or a cluster URL (:func:`parse_cluster_url`); a :class:`ConfigError` naming the (redacted) URL
    otherwise."""
    if is_cluster_url(url):
        parse_cluster_url(url)
        return url
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: bad host or port") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"invalid Redis URL {redact_url(url)!r}: scheme must be redis://, rediss://, unix://, "
            "or redis+cluster:// (rediss+cluster://) for a Redis Cluster"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: no host")
    _check_options(url, parts.scheme, parts.query)
    return url


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """A cluster URL taken apart: the nodes to start from, TLS or not, the login, and the options (as a
    ``redis://`` URL of the first node would carry them: :attr:`node_url`)."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None
    password: str | None
    query: str

    def node_url(self, host: str, port: int) -> str:
        """A ``redis://`` (``rediss://``) URL of one node with the login and options of the cluster URL."""
        login = ""
        if self.username is not None or self.password is not None:
            login = (self.username or "") + (f":{self.password}" if self.password is not None else "") + "@"
        shown = f"[{host}]" if ":" in host else host
        query = f"?{self.query}" if self.query else ""
        return f"{'rediss' if self.tls else 'redis'}://{login}{shown}:{port}/0{query}"


def parse_cluster_url(url: str) -> ClusterUrl:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0][?options]`` taken apart; a
    :class:`ConfigError` naming the (redacted) URL when it is not one: another scheme, no node, a node
    without a port or with a bad one, a database other than 0 (a cluster has only that one), an option
    redis-py's connection does not take.  Pure, O(length of the URL)."""
    where = redact_url(url)
    scheme, sep, rest = url.partition("://")
    tls = CLUSTER_SCHEMES.get(scheme.lower())
    if not sep or tls is None:
        raise ConfigError(f"invalid Redis Cluster URL {where!r}: scheme must be redis+cluster:// or rediss+cluster://")
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ConfigError(f"invalid Redis Cluster URL {where!r}: a cluster has database 0 only, not {path!r}")
    login, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = login.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, port = _host_port(item.strip(), where)
        nodes.append((host, port))
    parsed = ClusterUrl(tuple(dict.fromkeys(nodes)), tls, username, password, query)
    _check_options(parsed.node_url(*nodes[0]), "rediss" if tls else "redis", query, shown=where)
    return parsed


def _host_port(item: str, where: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of one cluster node; :class:`ConfigError` naming the URL if not."""
    if not item:
        raise ConfigError(f"invalid Redis Cluster URL {where!r}: an empty node (host:port, comma-separated)")
    if item.startswith("["):
        host, close, tail = item[1:].partition("]")
        port = tail[1:] if close and tail.startswith(":") else ""
    else:
        host, _, port = item.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"invalid Redis Cluster URL {where!r}: node {item!r} is not host:port")
    return host, int(port)


def _check_options(url: str, scheme: str, query: str, *, shown: str | None = None) -> None:
    """:class:`ConfigError` for a query option redis-py's connection does not take (it would fail, with a
    traceback, at the first command), naming the nearest one it takes; for an ``ssl_*`` option on a URL
    that is not ``rediss://``; and for a value redis-py cannot read (``socket_timeout=soon``)."""
    if not query:
        return
    where = shown if shown is not None else redact_url(url)
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection, parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {where!r}: {exc}") from None
    cls = {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(scheme, Connection)
    known = {"max_connections"}  # the pool's own; every other option goes to the connection
    for base in cls.__mro__:
        init = base.__dict__.get("__init__")
        if init is not None:
            known.update(
                n
                for n, p in inspect.signature(init).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
            )
    for name in parse_qs(query):
        if name in known:
            continue
        if name.startswith("ssl_") and name in inspect.signature(SSLConnection.__init__).parameters:
            raise ConfigError(f"invalid Redis URL {where!r}: {name} needs TLS, a rediss:// URL")
        close = nearest(name, known)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"invalid Redis URL {where!r}: unknown option {name!r}{hint}")
