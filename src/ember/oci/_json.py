"""Strict JSON decoding and field checks shared by the manifest and config parsers."""

from __future__ import annotations

from typing import Any

from ember import jsonutil
from ember.oci.errors import FormatError

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two readers could pick different values: refuse rather than guess.
            raise ValueError(f"duplicate key {key[:100]!r}")
        out[key] = value
    return out


def load_object(data: bytes, what: str, limit: int, error: type[FormatError]) -> dict[str, Any]:
    if len(data) > limit:
        raise error(f"{what} is {len(data)} bytes, more than the {limit} ember accepts")
    try:
        doc = jsonutil.loads(data, object_pairs_hook=_no_duplicates)
    except ValueError as e:  # UnicodeDecodeError and too deep a nesting are ValueErrors
        raise error(f"{what} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} must be a JSON object, not {type(doc).__name__}")
    return doc


class Fields:
    """Typed access to one JSON object, raising ``error`` with a path on bad input."""

    def __init__(self, doc: dict[str, Any], where: str, error: type[FormatError]) -> None:
        self.doc = doc
        self.where = where
        self.error = error

    def fail(self, key: str, problem: str) -> FormatError:
        return self.error(f"{self.where}: field {key!r} {problem}")

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.doc.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is missing")
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {type(value).__name__}")
        return value

    def integer(self, key: str, *, required: bool = False) -> int | None:
        value = self.doc.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, not {type(value).__name__}")
        if not _INT64_MIN <= value <= _INT64_MAX:
            # the specs' integers are int64: Go clients cannot read a larger one back
            raise self.fail(key, "does not fit in a 64-bit signed integer")
        return value

    def obj(self, key: str, *, required: bool = False) -> dict[str, Any] | None:
        value = self.doc.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is missing")
            return None
        if not isinstance(value, dict):
            raise self.fail(key, f"must be an object, not {type(value).__name__}")
        return value

    def array(self, key: str, *, required: bool = False) -> list[Any] | None:
        value = self.doc.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is missing")
            return None
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, not {type(value).__name__}")
        return value

    def texts(self, key: str) -> list[str] | None:
        value = self.array(key)
        if value is None:
            return None
        if not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        return list(value)

    def str_slice(self, key: str) -> list[str] | None:
        """A list of strings, or one string read as a list of one.

        Docker's ``strslice`` type (Cmd, Entrypoint) takes both forms, and
        images written by older tools carry the string form; it is not a shell
        command line: Docker does not split or wrap it either.
        """
        value = self.doc.get(key)
        if isinstance(value, str):
            return [value]
        return self.texts(key)

    def text_map(self, key: str) -> dict[str, str] | None:
        value = self.obj(key)
        if value is None:
            return None
        if not all(isinstance(v, str) for v in value.values()):
            raise self.fail(key, "must map strings to strings")
        return dict(value)
