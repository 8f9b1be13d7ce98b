"""Content digests (``algorithm:hex``) and streaming verification.

Only sha256 and sha512 are accepted: the registered algorithms of the OCI
image spec.  The encoded part must be lowercase hex of the exact length, which
also makes a digest safe to use as a file name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ember.oci.errors import DigestMismatch, InvalidDigest

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
#: the digest algorithms ember accepts
ALGORITHMS = frozenset(_HEX_LENGTH)
_SHAPE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not isinstance(text, str):
            raise InvalidDigest(f"digest must be a string, not {type(text).__name__}")
        m = _SHAPE.fullmatch(text)
        if not m:
            raise InvalidDigest(f"invalid digest {text[:100]!r}: expected ALGORITHM:HEX")
        algorithm, encoded = m.groups()
        want = _HEX_LENGTH.get(algorithm)
        if want is None:
            raise InvalidDigest(
                f"unsupported digest algorithm {algorithm!r} in {text[:100]!r} (sha256 and sha512 are)"
            )
        if len(encoded) != want or not re.fullmatch(r"[0-9a-f]+", encoded):
            raise InvalidDigest(
                f"invalid digest {text[:150]!r}: {algorithm} needs {want} lowercase hex characters"
            )
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    @property
    def short(self) -> str:
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Verifier:
    """Feed bytes; ``verify()`` checks both the digest and the size.

    Used by every reader of outside content (registry client, registry server,
    local sources) so that nothing unverified is ever committed.
    """

    def __init__(self, expected: Digest, expected_size: int | None = None) -> None:
        self.expected = expected
        self.expected_size = expected_size
        self._hash = expected.hasher()
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        if self.expected_size is not None and self.size > self.expected_size:
            raise DigestMismatch(
                f"content for {self.expected} is larger than the {self.expected_size} bytes its descriptor declares"
            )
        self._hash.update(chunk)

    def digest(self) -> Digest:
        return Digest(self.expected.algorithm, self._hash.hexdigest())

    def verify(self) -> None:
        if self.expected_size is not None and self.size != self.expected_size:
            raise DigestMismatch(
                f"content for {self.expected} has {self.size} bytes, its descriptor declares {self.expected_size}"
            )
        got = self.digest()
        if got != self.expected:
            raise DigestMismatch(f"content does not match its digest: expected {self.expected}, got {got}")
