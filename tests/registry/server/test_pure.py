"""The server's pure request logic, tested directly: routes, names, scopes,
registry tokens, upload state, header parsing; plus bounded fuzzing."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.oci.digest import Digest
from ember.registry.server import routes as r
from ember.registry.server.errors import ApiError, InvalidName
from ember.registry.server.names import (
    MAX_REPO_NAME,
    check_org_name,
    qualify,
    unqualify,
    valid_repo_name,
)
from ember.registry.server.protocol import accepts, page_size, parse_content_range, parse_range
from ember.registry.server.tokens import (
    MAX_SCOPES,
    Grant,
    InvalidToken,
    decode_token,
    encode_token,
    grant_for,
    parse_actions,
    parse_scope,
    parse_scopes,
)
from ember.registry.server.uploadstate import (
    InvalidUploadState,
    UploadState,
    sign_state,
    verify_state,
)

D = "sha256:" + "a" * 64
KEY = b"k" * 32
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_routes() -> None:
    assert r.parse_path(b"/v2/") == r.Route(r.BASE)
    assert r.parse_path(b"/v2") == r.Route(r.BASE)
    assert r.parse_path(b"/v2/_catalog") == r.Route(r.CATALOG)
    assert r.parse_path(b"/v2/team/web/tags/list") == r.Route(r.TAGS, "team/web")
    assert r.parse_path(b"/v2/web/manifests/v1.0") == r.Route(r.MANIFEST, "web", tag="v1.0")
    assert r.parse_path(f"/v2/web/manifests/{D}".encode()).digest == Digest.parse(D)
    assert r.parse_path(f"/v2/a/blobs/{D}".encode()) == r.Route(r.BLOB, "a", digest=Digest.parse(D))
    assert r.parse_path(b"/v2/a/b/blobs/uploads/") == r.Route(r.UPLOAD_START, "a/b")
    assert r.parse_path(b"/v2/a/blobs/uploads") == r.Route(r.UPLOAD_START, "a")
    sid = "0123456789abcdef" * 2
    assert r.parse_path(f"/v2/a/blobs/uploads/{sid}".encode()) == r.Route(r.UPLOAD, "a", upload_id=sid)
    assert r.parse_path(f"/v2/a/referrers/{D}".encode()).kind == r.REFERRERS
    # a repository whose components are the API's own words
    assert r.parse_path(f"/v2/blobs/manifests/blobs/{D}".encode()) == r.Route(r.BLOB, "blobs/manifests", digest=Digest.parse(D))
    assert r.parse_path(b"/v2/tags/list/tags/list") == r.Route(r.TAGS, "tags/list")


@pytest.mark.parametrize(
    "path",
    [
        b"/v2/../x/tags/list",
        b"/v2/a/./tags/list",
        b"/v2/a/%2e%2e/tags/list",
        b"/v2/%2E/tags/list",
        b"/v2/a%2Fb/tags/list",
        b"/v2/a//b/tags/list",
        b"/v2/a\\..\\b/tags/list",
        b"/v2/A/tags/list",
        b"/v2/a-/tags/list",
        b"/v2/\xff/tags/list",
        b"/v2/a/manifests/" + b"t" * 200,
        b"/v2/" + b"a/" * 1500 + b"tags/list",
    ],
)
def test_bad_paths_refused(path: bytes) -> None:
    with pytest.raises(ApiError) as e:
        r.parse_path(path)
    assert e.value.status == 400


def test_unknown_paths() -> None:
    for path in (b"/v2/a", b"/v2/a/blobs", b"/v2/a/unknown/x", b"/v3/", b"/v2/a/blobs/uploads/XYZ"):
        with pytest.raises(ApiError) as e:
            r.parse_path(path)
        assert e.value.status in (400, 404)


def test_names() -> None:
    assert valid_repo_name("a/b-c/d__e.f")
    assert not valid_repo_name("a/B") and not valid_repo_name("") and not valid_repo_name("a/../b")
    assert qualify("acme", "team/web") == "acme/team/web"
    assert unqualify("acme", "acme/acme/web") == "acme/web"
    with pytest.raises(ValueError):
        unqualify("acme", "beta/web")
    assert check_org_name("acme-2") == "acme-2"
    for bad in ("Acme", "a--b", "-a", "a/b", "a" * 64, ""):
        with pytest.raises(InvalidName):
            check_org_name(bad)


def test_scopes_and_grants() -> None:
    assert parse_scope("repository:team/web:pull,push") is not None
    assert parse_scope("repository:team/web:pull,push").actions == frozenset({"pull", "push"})  # type: ignore[union-attr]
    assert parse_scope("registry:catalog:*") is not None
    assert parse_scope("repository:../x:pull") is None
    assert parse_scope("repository:Web:pull") is None
    assert parse_scope("nonsense") is None
    scopes = parse_scopes(["repository:a:pull repository:b:push", "repository:a:delete", "registry:catalog:*"])
    g = grant_for("acme", "t1", frozenset({"pull", "push"}), scopes)
    assert g.repositories == {"acme/a": frozenset({"pull"}), "acme/b": frozenset({"push"})}
    assert g.catalog
    assert g.allows("acme/a", "pull") and not g.allows("acme/a", "delete") and not g.allows("beta/a", "pull")
    direct = Grant("acme", "t1", org_actions=frozenset({"pull"}))
    assert direct.allows("acme/x/y", "pull") and not direct.allows("acmex/y", "pull")
    assert not direct.allows("beta/x", "pull") and not direct.allows("acme/x", "push")
    assert parse_actions("pull, delete") == frozenset({"pull", "delete"})
    with pytest.raises(ValueError):
        parse_actions("pull,admin")
    with pytest.raises(ValueError, match="every token needs pull"):
        parse_actions("push")  # no client could push with it: each checks blobs first


def test_many_scopes_still_make_a_verifiable_token() -> None:
    longest = "r" * (MAX_REPO_NAME - 4)
    scopes = parse_scopes([f"repository:{longest}-{i:03}:pull,push,delete" for i in range(500)])
    assert len(scopes) == MAX_SCOPES
    g = grant_for("o" * 63, "t1", frozenset({"pull", "push", "delete"}), scopes)
    now = int(time.time())
    assert len(decode_token(KEY, encode_token(KEY, g, now), now).repositories) == MAX_SCOPES


def test_registry_token_roundtrip_and_refusals() -> None:
    now = int(time.time())
    g = Grant("acme", "t1", {"acme/web": frozenset({"pull"})}, catalog=True)
    token = encode_token(KEY, g, now)
    back = decode_token(KEY, token, now)
    assert back.org == "acme" and back.repositories == g.repositories and back.catalog
    with pytest.raises(InvalidToken, match="expired"):
        decode_token(KEY, token, now + 3600)
    with pytest.raises(InvalidToken, match="not valid yet"):
        decode_token(KEY, encode_token(KEY, g, now + 3600), now)
    with pytest.raises(InvalidToken, match="signature"):
        decode_token(b"other" * 8, token, now)
    h, p, s = token.split(".")
    with pytest.raises(InvalidToken):
        decode_token(KEY, f"{h}.{p}.", now)
    with pytest.raises(InvalidToken):
        decode_token(KEY, f"{h}.{p}", now)
    with pytest.raises(InvalidToken):
        decode_token(KEY, "a.b.c", now)


def test_upload_state() -> None:
    now = int(time.time())
    st_ = UploadState("acme", "acme/web", "ab" * 16, 42, now + 60)
    text = sign_state(KEY, st_)
    assert verify_state(KEY, text, now) == st_
    with pytest.raises(InvalidUploadState, match="expired"):
        verify_state(KEY, text, now + 61)
    with pytest.raises(InvalidUploadState):
        verify_state(b"x" * 32, text, now)
    payload, mac = text.split(".")
    with pytest.raises(InvalidUploadState):
        verify_state(KEY, payload + "." + mac[:-2] + "AA", now)
    with pytest.raises(InvalidUploadState):
        verify_state(KEY, payload, now)


def test_header_parsing() -> None:
    assert parse_content_range("0-99") == (0, 99)
    assert parse_content_range("bytes=5-9") == (5, 9)
    assert parse_content_range("bytes 5-9/100") == (5, 9)
    for bad in ("9-5", "-1-2", "a-b", "", "1-"):
        with pytest.raises(ApiError):
            parse_content_range(bad)
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: whole blob
    with pytest.raises(ApiError):
        parse_range("bytes=100-", 100)
    assert accepts([], "application/x")
    assert accepts(["application/a, application/x;q=0.1"], "application/x")
    assert accepts(["*/*"], "application/x") and accepts(["application/*"], "application/x")
    assert not accepts(["application/a", "text/plain"], "application/x")
    assert page_size(None) == 1000 and page_size("5") == 5
    for bad in ("1001", "-1", "x", "99999999999"):
        with pytest.raises(ApiError):
            page_size(bad)


def test_an_invalid_range_is_ignored_and_q0_excludes_a_type() -> None:
    """RFC 9110 14.1.1: a byte range whose last position is before its first is invalid,
    and an invalid Range is ignored (the whole blob), not unsatisfiable (it was a 416).
    RFC 9110 12.4.2: ``q=0`` means not acceptable, and the most specific media range
    that matches decides (12.5.1); the parameters were dropped, q=0 taken for yes."""
    assert parse_range("bytes=5-2", 100) is None
    assert parse_range("bytes=500-2", 100) is None
    with pytest.raises(ApiError):
        parse_range("bytes=100-200", 100)  # a valid range past the end is still a 416
    assert not accepts(["application/x;q=0"], "application/x")
    assert not accepts(["application/x ; Q=0.000"], "application/x")
    assert not accepts(["*/*, application/x;q=0"], "application/x")
    assert not accepts(["application/*;q=0", "*/*"], "application/x")
    assert accepts(["application/*;q=0, application/x;q=0.001"], "application/x")
    assert accepts(["application/x;charset=utf-8;q=1"], "application/x")
    assert accepts(["application/y;q=0, */*"], "application/x")


# -- bounded fuzzing: parsers of hostile input never fail any other way -------------

_path_alphabet = st.sampled_from(list("/v2abcz09.-_:%2eE\\") + ["/v2/", "blobs", "uploads", "manifests", "tags/list", "..", D])


@FUZZ
@given(st.lists(_path_alphabet, max_size=20).map("".join).map(str.encode) | st.binary(max_size=300))
def test_fuzz_parse_path(path: bytes) -> None:
    try:
        route = r.parse_path(path)
    except ApiError as e:
        assert e.status in (400, 404)
        return
    # whatever parses is free of traversal
    assert ".." not in route.name.split("/") and "%" not in route.name
    assert route.name == "" or valid_repo_name(route.name)


@FUZZ
@given(st.text(max_size=200) | st.lists(st.sampled_from(["eyJ", ".", "a", "_", "-", "=", "{}"]), max_size=30).map("".join))
def test_fuzz_decode_token(text: str) -> None:
    with pytest.raises(InvalidToken):
        decode_token(KEY, text, int(time.time()))


@FUZZ
@given(st.dictionaries(st.text(max_size=10), st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3), max_size=8))
def test_fuzz_token_claims_with_the_right_key(claims: dict[str, object]) -> None:
    """Even correctly signed garbage claims are refused cleanly, never crash."""
    import base64
    import hashlib
    import hmac

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    h = b64(b'{"alg":"HS256"}')
    p = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(KEY, f"{h}.{p}".encode(), hashlib.sha256).digest())
    with contextlib.suppress(InvalidToken):
        decode_token(KEY, f"{h}.{p}.{sig}", int(time.time()))


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_upload_state_and_headers(text: str) -> None:
    with pytest.raises(InvalidUploadState):
        verify_state(KEY, text, 0)
    for fn in (parse_content_range, lambda v: parse_range(v, 1000), page_size):
        with contextlib.suppress(ApiError):
            fn(text)
    parse_scope(text)


def test_trailing_newlines_never_pass() -> None:
    """``$`` matches before a final newline; every validator must use fullmatch."""
    assert not valid_repo_name("web\n")
    with pytest.raises(InvalidName):
        check_org_name("acme\n")
    with pytest.raises(ApiError):
        page_size("5\n")
    with pytest.raises(InvalidUploadState):
        verify_state(KEY, "abc\n.def", 0)


# -- the manifest PUT path: parse + describe, fuzzed with manifest-shaped JSON ------

_digests = st.sampled_from([D, "sha256:" + "b" * 64, "sha512:" + "c" * 128, "md5:x", "sha256:XYZ", ""])
_media = st.sampled_from([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws", "application/json", "text/x", "",
])
_descriptor = st.fixed_dictionaries(
    {"mediaType": _media, "digest": _digests, "size": st.integers(-2, 10**6)},
    optional={"urls": st.lists(st.text(max_size=5), max_size=2), "artifactType": _media,
              "platform": st.fixed_dictionaries({"os": st.text(max_size=5), "architecture": st.text(max_size=5)})},
)
_manifest_doc = st.fixed_dictionaries(
    {"schemaVersion": st.sampled_from([1, 2, 2, 2, "2", None])},
    optional={"mediaType": _media, "config": _descriptor, "layers": st.lists(_descriptor, max_size=3),
              "manifests": st.lists(_descriptor, max_size=3), "subject": _descriptor,
              "artifactType": _media, "annotations": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)},
)


@FUZZ
@given(_manifest_doc, _media)
def test_fuzz_manifest_put_validation(doc: dict[str, object], content_type: str) -> None:
    from ember.oci.errors import FormatError
    from ember.oci.manifest import ImageIndex, parse_manifest
    from ember.registry.server.references import describe_manifest

    body = json.dumps(doc).encode()
    try:
        parsed = parse_manifest(body, content_type)
        new = describe_manifest(parsed, Digest.of(body), len(body))
    except FormatError:
        return
    # what the server will require to be present is exactly what the document names
    if isinstance(parsed, ImageIndex):
        assert not new.blobs and set(new.children) == {str(m.digest) for m in parsed.manifests}
        assert all(new.children[str(m.digest)] == m.size for m in parsed.manifests)
    else:
        assert new.blobs[str(parsed.config.digest)] == parsed.config.size and not new.children
        assert set(new.blobs) <= {str(parsed.config.digest)} | {str(layer.digest) for layer in parsed.layers}
    for d in new.blobs | new.children:
        Digest.parse(d)
    assert new.subject == (str(parsed.subject.digest) if parsed.subject else None)


def test_parse_listen() -> None:
    from ember.errors import UsageError
    from ember.registry.server.serve import parse_listen

    assert parse_listen("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_listen("[::1]:5000") == ("::1", 5000)
    assert parse_listen("registry.example:443") == ("registry.example", 443)
    # a 300-character host was an IDNA UnicodeError traceback in getaddrinfo
    for bad in ("a" * 300 + ":1", "x" * 64 + ".example:1", "bad_host:1", "h\u00e9:1", ":1", "a:0",
                "a:65536", "a"):  # fmt: skip
        with pytest.raises(UsageError):
            parse_listen(bad)


def test_a_token_header_nested_too_deep_is_invalid_not_a_crash() -> None:
    """The header is read before the signature is checked: '[' * 5000 raised
    RecursionError, not InvalidToken (a 500 for a client's bad token)."""
    import base64

    deep = base64.urlsafe_b64encode(b"[" * 5000).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="not JSON"):
        decode_token(KEY, f"{deep}.e30.c2ln", int(time.time()))


def test_a_registry_secret_set_in_config_is_never_replaced(tmp_path: Path) -> None:
    """A `registry_secret` a person put in config.json (shared by replicas) that was
    shorter than 32 characters was replaced by a random one without a word, and the
    replicas then refused each other's tokens.  The same value in the environment was
    an error; now both are."""
    import json

    from ember.home import Home
    from ember.registry.server.config import load_secret
    from ember.registry.server.errors import RegistryError

    home = Home(tmp_path / "home")
    made = load_secret(home)
    assert len(made) >= 32 and load_secret(home) == made  # made once, then kept
    config = home.config_file
    config.write_text(json.dumps({"registry_secret": "shared-between-replicas"}))
    with pytest.raises(RegistryError, match="at least 32 characters"):
        load_secret(home)
    assert json.loads(config.read_text())["registry_secret"] == "shared-between-replicas"
    config.write_text(json.dumps({"registry_secret": "s" * 40}))
    assert load_secret(home) == b"s" * 40
