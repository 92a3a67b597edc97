"""Reading untrusted JSON: typed fields, and a named problem for each field that is missing or wrong.

A document read from Redis (a heartbeat, a stored control state) may come from another version, an
odd tool or a mistake.  :class:`Reader` reads it field by field: each read returns a value of the
type asked for (the default when the field is missing or of another type) and records a
:class:`Problem` naming the field's path and what was found.  Nothing here raises on any input.
Cost: each read is one dict lookup and one type check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Problem", "Reader", "kind_of"]


@dataclass(frozen=True, slots=True)
class Problem:
    """A field a :class:`Reader` could not take as it found it (it took the field's default instead)."""

    #: where, e.g. ``writer.connected`` or ``connections.sessions[0].state``
    path: str
    #: what the schema wants there, e.g. ``an integer``
    expected: str
    #: what was there: ``nothing`` (missing), ``null``, or the kind of value, e.g. ``a string``
    found: str
    #: the field is absent, or null where a value belongs: ordinary for a document of an older version
    #: (a null item of a list is not missing: it is malformed)
    missing: bool = False

    def __str__(self) -> str:
        return f"{self.path or 'the document'}: expected {self.expected}, found {self.found}"


def kind_of(value: object) -> str:
    """How a problem names what it found: ``null``, ``a boolean``, ``an integer``, ``a string``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Reader:
    """Typed reads of one JSON object, recording a :class:`Problem` for each field it had to default.

    Each read names the field and says what it expects; what it returns always has the expected type
    (the default when the field is missing or wrong).  A reader of a section absent as a whole
    (:meth:`section`) is ``quiet``: that absence is the one problem reported, not each of its fields.
    """

    __slots__ = ("_doc", "_path", "_problems", "_quiet")

    def __init__(self, doc: Mapping[str, Any], path: str, problems: list[Problem], *, quiet: bool = False) -> None:
        self._doc = doc
        self._path = path
        self._problems = problems
        self._quiet = quiet

    def _where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def _bad(self, key: str, expected: str, found: str, *, missing: bool = False) -> None:
        if not self._quiet:
            self._problems.append(Problem(self._where(key), expected, found, missing))

    def _value(self, key: str, expected: str, ok: Callable[[object], bool], *, nullable: bool = False) -> object:
        """The value if ``ok`` says it has the right type, else None (a null is fine when ``nullable``)."""
        if key not in self._doc:
            self._bad(key, expected, "nothing", missing=True)
            return None
        v = self._doc[key]
        if v is None:
            if not nullable:
                self._bad(key, expected, "null", missing=True)
            return None
        if not ok(v):
            self._bad(key, expected, kind_of(v))
            return None
        return v

    def integer(self, key: str) -> int:
        v = self._value(key, "an integer", _is_int)
        return v if isinstance(v, int) else 0

    def integer_or_none(self, key: str) -> int | None:
        v = self._value(key, "an integer", _is_int, nullable=True)
        return v if isinstance(v, int) else None

    def number(self, key: str) -> float:
        v = self.number_or_none(key, nullable=False)
        return 0.0 if v is None else v

    def number_or_none(self, key: str, *, nullable: bool = True) -> float | None:
        v = self._value(key, "a number", _is_number, nullable=nullable)
        if not isinstance(v, int | float):
            return None
        try:
            return float(v)
        except OverflowError:
            self._bad(key, "a number", "an integer too large for a number")
            return None

    def text(self, key: str, default: str = "") -> str:
        v = self._value(key, "a string", lambda x: isinstance(x, str))
        return v if isinstance(v, str) else default

    def text_or_none(self, key: str) -> str | None:
        v = self._value(key, "a string", lambda x: isinstance(x, str), nullable=True)
        return v if isinstance(v, str) else None

    def flag(self, key: str, default: bool = False) -> bool:
        v = self._value(key, "true or false", lambda x: isinstance(x, bool))
        return v if isinstance(v, bool) else default

    def counts(self, key: str) -> dict[str, int]:
        """An object of integers; a value of another type counts 0 (its key is kept: readers name it)."""
        v = self._value(key, "an object of integers", lambda x: isinstance(x, Mapping))
        if not isinstance(v, Mapping):
            return {}
        out: dict[str, int] = {}
        for k, n in v.items():
            if not _is_int(n):
                self._bad(f"{key}.{k}", "an integer", kind_of(n))
            out[str(k)] = n if _is_int(n) else 0
        return out

    def names(self, key: str) -> tuple[str, ...]:
        """A list of strings; an item of another type is left out."""
        v = self._value(key, "a list of strings", lambda x: isinstance(x, list))
        if not isinstance(v, list):
            return ()
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self._bad(f"{key}[{i}]", "a string", kind_of(item))
        return tuple(item for item in v if isinstance(item, str))

    def section(self, key: str) -> Reader:
        v = self._value(key, "an object", lambda x: isinstance(x, Mapping))
        ok = isinstance(v, Mapping)
        return Reader(v if isinstance(v, Mapping) else {}, self._where(key), self._problems,
                       quiet=self._quiet or not ok)

    def rows(self, key: str) -> list[Reader]:
        """A list of objects; an item of another type is left out."""
        v = self._value(key, "a list of objects", lambda x: isinstance(x, list))
        out: list[Reader] = []
        for i, item in enumerate(v if isinstance(v, list) else ()):
            if isinstance(item, Mapping):
                out.append(Reader(item, f"{self._where(key)}[{i}]", self._problems, quiet=self._quiet))
            else:
                self._bad(f"{key}[{i}]", "an object", kind_of(item))
        return out
