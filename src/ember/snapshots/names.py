"""Snapshot keys and lease names, and the directory names that hold them (pure).

Keys are containerd-style free-form strings (``sha256:<hex>`` for committed
layers, ``machine/<id>`` for root disks, ...).  On disk each becomes one
directory name by percent-encoding everything outside a small safe set, which
is reversible, collision-free and can never form ``.``/``..`` or contain
``/``.  Names starting with ``.`` are reserved for staging directories.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from ember.snapshots.errors import InvalidSnapshotKey

MAX_KEY_LENGTH = 200
_SAFE = ":@+=-_,"


def validate_key(key: str, what: str = "snapshot key") -> str:
    if not isinstance(key, str) or not key:
        raise InvalidSnapshotKey(f"{what} must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidSnapshotKey(
            f"{what} {key[:40]!r}... is longer than {MAX_KEY_LENGTH} characters"
        )
    if not key.isprintable() or any(c.isspace() for c in key):
        raise InvalidSnapshotKey(f"{what} {key!r} contains whitespace or control characters")
    if key.startswith("."):
        raise InvalidSnapshotKey(f"{what} {key!r} must not start with '.'")
    return key


def encode(key: str, what: str = "snapshot key") -> str:
    """The directory name for ``key`` (validated)."""
    validate_key(key, what)
    # quote() never encodes '.', but keys cannot start with '.', so the result is
    # never '.', '..' or a staging name; '/' is always encoded.
    name = quote(key, safe=_SAFE)
    if len(name.encode()) > 255:
        raise InvalidSnapshotKey(f"{what} {key[:40]!r}... is too long once encoded for a file name")
    return name


def decode(dirname: str) -> str:
    return unquote(dirname)
