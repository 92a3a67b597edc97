"""Redis URLs: the default, the check, and the one redactor that keeps secrets out of logs and documents.

Pure; every function is O(length of the URL).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit, urlunsplit

from consumer_sdk.core.errors import ConfigError

__all__ = ["DEFAULT_REDIS_URL", "public_url", "redact_url", "validate_redis_url"]

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
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
    return url
