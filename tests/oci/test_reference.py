import re

import pytest

from ember.oci.digest import Digest
from ember.oci.errors import InvalidReference
from ember.oci.reference import Reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("debian", "docker.io/library/debian:latest"),
        ("debian:bookworm", "docker.io/library/debian:bookworm"),
        ("library/debian", "docker.io/library/debian:latest"),
        ("docker.io/debian", "docker.io/library/debian:latest"),
        ("index.docker.io/debian", "docker.io/library/debian:latest"),
        ("index.docker.io/user/app", "docker.io/user/app:latest"),
        ("user/app:v1", "docker.io/user/app:v1"),
        ("a/b/c", "docker.io/a/b/c:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
        ("quay.io/org/app", "quay.io/org/app:latest"),
        ("[::1]:5000/app:x", "[::1]:5000/app:x"),
        ("Registry/app", "Registry/app:latest"),  # uppercase first component is a host
        ("x/a.b-c__d", "docker.io/x/a.b-c__d:latest"),
        (f"debian@{D}", f"docker.io/library/debian@{D}"),
        (f"host:1/app:v2@{D}", f"host:1/app:v2@{D}"),
        ("app:_under", "docker.io/library/app:_under"),
        ("x/a--b", "docker.io/x/a--b:latest"),
    ],
)
def test_normalisation(text: str, normalised: str) -> None:
    assert str(Reference.parse(text)) == normalised


def test_fields() -> None:
    ref = Reference.parse(f"localhost:5000/team/app:v1@{D}")
    assert ref.registry == "localhost:5000"
    assert ref.repository == "team/app"
    assert ref.tag == "v1"
    assert ref.digest == Digest.parse(D)
    assert ref.target == D  # the digest wins
    assert ref.name == "localhost:5000/team/app"
    assert Reference.parse("debian").api_host == "registry-1.docker.io"
    assert Reference.parse("debian").familiar() == "debian:latest"
    assert Reference.parse(f"debian@{D}").tag is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        " debian",
        "debian ",
        "Debian",
        "user/App",
        "debian:",
        "debian:-tag",
        "debian:.tag",
        "debian:" + "t" * 129,
        "debian@sha256:abc",
        "debian@md5:" + "a" * 32,
        "debian@",
        "/debian",
        "debian/",
        "a//b",
        "a/b_",
        "a/-b",
        "a/b..c",
        "a/b___c",
        "ho_st.io/app",
        "host:port/app",
        "host.io/" + "a" * 300,
        ":tag",
        "a/b:c:d",
        "a b",
        "déb",
        "debian\n",
        "debian:latest\n",
        "example.com\n/app",
        "debian@sha256:" + "a" * 64 + "\n",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReference):
        Reference.parse(text)


@pytest.mark.parametrize("port", ["0", "00", "65536", "99999", "0000065536", "9" * 5000])
def test_port_out_of_range(port: str) -> None:
    with pytest.raises(InvalidReference, match=f"invalid port {port[:20]} .*1 to 65535"):
        Reference.parse(f"host:{port}/app")


def test_port_limits() -> None:
    assert Reference.parse("host:1/app").registry == "host:1"
    assert Reference.parse("[::1]:65535/app").registry == "[::1]:65535"
    assert Reference.parse("host:08080/app").registry == "host:08080"
    assert Reference.parse("[::1]/app").registry == "[::1]"


def test_uppercase_message_is_clear() -> None:
    with pytest.raises(InvalidReference, match="lowercase"):
        Reference.parse("library/Debian")


def test_round_trip_is_stable() -> None:
    for text in ["debian", "localhost:5000/a/b:t", f"quay.io/x/y@{D}"]:
        once = str(Reference.parse(text))
        assert str(Reference.parse(once)) == once


@pytest.mark.parametrize(
    ("text", "written"),
    [("a:b:c", "a:b"), ("docker.io/a:b:c", "a:b"), ("host:5000/x_-y:t", "x_-y"), ("x/-y", "x/-y")],
)
def test_an_invalid_repository_is_named_as_written(text: str, written: str) -> None:
    """'a:b:c' was reported as "invalid repository name 'library/a:b'"."""
    with pytest.raises(InvalidReference, match=re.escape(f"invalid repository name {written!r} in {text!r}")):
        Reference.parse(text)


def test_an_image_id_is_not_a_repository_name() -> None:
    """As Docker: 64 hex characters name an image (its ID), never docker.io/library/<hex>."""
    with pytest.raises(InvalidReference, match="64 hexadecimal characters are an image ID"):
        Reference.parse("a" * 64)
    # shorter, or with a tag or a path, it is a name as any other (Docker takes those too)
    assert Reference.parse("a" * 12).name == f"docker.io/library/{'a' * 12}"
    assert Reference.parse(f"{'a' * 64}:1").tag == "1"
    assert Reference.parse(f"team/{'a' * 64}").repository == f"team/{'a' * 64}"
