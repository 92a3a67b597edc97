"""Pure decisions about a group's place in a stream: holes, trimmed history, lag.

Each takes what ``XINFO STREAM``/``XINFO GROUPS`` said (a :class:`~consumer_sdk.core.redis.StreamView`
or the raw mappings) and entry IDs; no I/O.
"""

from __future__ import annotations

from typing import Any

from consumer_sdk.core.redis import IdT, StreamView, id_tuple

__all__ = ["group_behind_trim", "hole_verdict", "lag_estimate"]


def hole_verdict(hole_has_entries: bool, before: IdT, after: IdT, view: StreamView) -> str:
    """What a hole in seq between the entries ``before`` and ``after`` is.

    ``"shared"``: the stream holds entries in it, given to another consumer of the group;
    ``"trimmed"``: an entry in it was deleted (``max-deleted-entry-id``), or trimming has passed
    ``before`` (the oldest entry held is newer, or none is left), so what was there is gone;
    ``"gap"``: nothing was ever stored there.
    """
    if hole_has_entries:
        return "shared"
    md = view.max_deleted
    if md is not None and before < md < after:
        return "trimmed"
    if view.first_held is None or view.first_held > before:
        return "trimmed"
    return "gap"


def group_behind_trim(last_delivered: IdT, lag: int | None, view: StreamView) -> bool:
    """Whether a group at ``last_delivered`` will skip entries removed before it read them.

    An ``XDEL`` after its position; entries added after its position with none left; or the oldest
    entry held newer than its position while Redis counts more unread entries (``lag``) than the
    stream holds.  Without a ``lag`` (Redis < 7, or one Redis could not compute) a jump in seq
    between the position and the oldest entry held stands in for the count.
    """
    md = view.max_deleted
    if md is not None and md > last_delivered:
        return True
    if view.last_generated is None or view.last_generated <= last_delivered:
        return False
    first = view.first_held
    if first is None:
        return True
    if first <= last_delivered:
        return False  # trimming removes the oldest first: all after the position is still there
    if view.deleted is False:
        return False  # nothing was ever removed: a stream whose first seq is not 1 has skipped nothing
    if lag is not None:
        return lag > view.length
    return first[1] > last_delivered[1] + 1


def lag_estimate(group: dict[str, Any], stream: dict[str, Any] | None) -> int:
    """Entries the group has not been given yet: Redis 7's ``lag`` when it knows it, otherwise
    0 when the group is at the stream's last ID, else the stream length (an upper bound)."""
    lag = group.get("lag")
    if isinstance(lag, int):
        return lag
    if stream is None:
        return 0
    last_delivered = id_tuple(group.get("last-delivered-id") or "0-0")
    if last_delivered >= id_tuple(stream.get("last-generated-id") or "0-0"):
        return 0
    return int(stream.get("length") or 0)
