import hashlib

import pytest

from ember.oci import mediatypes as mt
from ember.oci.chainid import chain_ids
from ember.oci.digest import Digest, Verifier
from ember.oci.errors import DigestMismatch, InvalidDigest, UnsupportedMediaType


def test_digest_parse_and_of() -> None:
    d = Digest.of(b"hello")
    assert str(d) == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert Digest.parse(str(d)) == d
    d512 = Digest.of(b"hello", "sha512")
    assert Digest.parse(str(d512)) == d512


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,
        "sha256",
        "",
        "sha256:../../etc",
        "sha256:" + "a" * 64 + "\n",  # "$" alone would let a trailing newline through
    ],
)
def test_digest_invalid(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_verifier_checks_digest_and_size() -> None:
    d = Digest.of(b"abc")
    v = Verifier(d, 3)
    v.update(b"ab")
    v.update(b"c")
    v.verify()
    v = Verifier(d, 2)
    with pytest.raises(DigestMismatch):
        v.update(b"abc")
    v = Verifier(d, 4)
    v.update(b"abc")
    with pytest.raises(DigestMismatch, match="4"):
        v.verify()
    v = Verifier(d)
    v.update(b"abd")
    with pytest.raises(DigestMismatch):
        v.verify()


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        (mt.OCI_LAYER_TAR, "none"),
        (mt.OCI_LAYER_GZIP, "gzip"),
        (mt.OCI_LAYER_ZSTD, "zstd"),
        (mt.DOCKER_LAYER_GZIP, "gzip"),
        (mt.DOCKER_LAYER_TAR, "none"),
        (mt.DOCKER_FOREIGN_LAYER, "gzip"),
        (mt.OCI_LAYER_NONDIST_GZIP, "gzip"),
        (mt.OCI_LAYER_NONDIST_ZSTD, "zstd"),
        (mt.OCI_LAYER_NONDIST_TAR, "none"),
    ],
)
def test_layer_compression(media_type: str, compression: str) -> None:
    assert mt.layer_compression(media_type) == compression


@pytest.mark.parametrize(
    "media_type", [mt.OCI_MANIFEST, mt.OCI_CONFIG, "application/x-tar", "", mt.OCI_LAYER_GZIP + "x"]
)
def test_layer_compression_refuses_others(media_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        mt.layer_compression(media_type)


def test_nondistributable_named_explicitly() -> None:
    assert mt.is_nondistributable(mt.DOCKER_FOREIGN_LAYER)
    assert mt.is_nondistributable(mt.OCI_LAYER_NONDIST_TAR)
    assert not mt.is_nondistributable(mt.OCI_LAYER_GZIP)


def test_chain_ids() -> None:
    a, b, c = (Digest.of(x) for x in (b"a", b"b", b"c"))
    ids = chain_ids([a, b, c])
    assert ids[0] == a
    ab = hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert ids[1] == Digest("sha256", ab)
    assert ids[2] == Digest("sha256", hashlib.sha256(f"sha256:{ab} {c}".encode()).hexdigest())
    assert chain_ids([]) == []
