"""Redis URLs: the default, the check, and the one redactor that keeps secrets out of logs and documents.

Pure; every function is O(length of the URL), the check of the query's options O(options x the names
redis-py's connection takes).
"""

from __future__ import annotations

import inspect
from typing import Final
from urllib.parse import parse_qs, urlsplit, urlunsplit

from consumer_sdk.core.env import nearest
from consumer_sdk.core.errors import ConfigError

__all__ = ["DEFAULT_REDIS_URL", "TLS_FILE_OPTIONS", "public_url", "redact_url", "validate_redis_url"]

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
#: the URL options that name a file the TLS handshake reads (``rediss://...?ssl_ca_certs=/path/ca.pem``)
TLS_FILE_OPTIONS: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_UNPARSEABLE: Final = "<unparseable URL>"


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
    needed; a :class:`ConfigError` naming the (redacted) URL otherwise."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: bad host or port") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: scheme must be redis://, rediss:// or unix://")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: no host")
    _check_options(url, parts.scheme, parts.query)
    return url


def _check_options(url: str, scheme: str, query: str) -> None:
    """:class:`ConfigError` for a query option redis-py's connection does not take (it would fail, with a
    traceback, at the first command), naming the nearest one it takes; for an ``ssl_*`` option on a URL
    that is not ``rediss://``; and for a value redis-py cannot read (``socket_timeout=soon``)."""
    if not query:
        return
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection, parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from None
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
            raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: {name} needs TLS, a rediss:// URL")
        close = nearest(name, known)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: unknown option {name!r}{hint}")
