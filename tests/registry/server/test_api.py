"""The distribution API over raw HTTP against a real ``ember server`` (conformance-style)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator

import pytest

from tests.registry.server.support import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Tenant,
    at,
    http,
    image_manifest,
    push_blob,
    push_image,
    sha256,
)

pytestmark = pytest.mark.integration

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def test_base_endpoint_challenge_and_token_flow(acme: Tenant) -> None:
    r = http.get(f"{acme.server.url}/v2/")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == f'Bearer realm="{acme.server.url}/token",service="ember"'
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    token = acme.registry_token()
    r = http.get(f"{acme.server.url}/v2/", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    # the ember token itself is accepted as a bearer token, and as basic auth
    with acme.client() as c:
        assert c.get("/v2/").status_code == 200
    assert http.get(f"{acme.server.url}/v2/", auth=("u", acme.token)).status_code == 200
    assert http.get(f"{acme.server.url}/v2/", auth=("u", "ember_nope")).status_code == 401
    # a token asked for without any scope (podman search) lists the org's catalog
    unscoped = http.get(f"{acme.server.url}/token", params={"service": "ember"}, auth=("u", acme.token))
    r = http.get(f"{acme.server.url}/v2/_catalog",
                 headers={"Authorization": f"Bearer {unscoped.json()['token']}"})
    assert r.status_code == 200 and "repositories" in r.json()
    assert http.get(f"{acme.server.url}/v2/_catalog").status_code == 401


def test_token_endpoint_grants_only_what_is_held(acme_pusher: Tenant) -> None:
    url = f"{acme_pusher.server.url}/token"
    assert http.get(url, params={"scope": "repository:x:pull"}).status_code == 401
    wrong = http.get(url, auth=("u", "wrong"))
    assert wrong.status_code == 401 and wrong.json()["errors"][0]["message"] == "unknown or revoked ember token"
    r = http.get(
        url,
        params=[("service", "ember"), ("scope", "repository:web:pull,push,delete"), ("scope", "repository:other:pull")],
        auth=("u", acme_pusher.token),
    )
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"] and body["expires_in"] > 0
    payload = body["token"].split(".")[1]
    claims = json.loads(__import__("base64").urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    access = {a["name"]: sorted(a["actions"]) for a in claims["access"]}
    assert access == {"acme/web": ["pull", "push"], "acme/other": ["pull"]}
    # the ember token as a bearer token on /token works too
    r = http.get(url, params={"scope": "repository:web:pull"}, headers={"Authorization": f"Bearer {acme_pusher.token}"})
    assert r.status_code == 200 and r.json()["token"]
    # OAuth2 password grant (POST form) as well
    r = http.post(url, data={"grant_type": "password", "username": "u", "password": acme_pusher.token,
                              "scope": "repository:web:pull", "service": "ember"})
    assert r.status_code == 200 and r.json()["access_token"]
    r = http.post(url, data={"grant_type": "refresh_token", "refresh_token": "x", "service": "ember"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_insufficient_scope_challenge(acme: Tenant) -> None:
    token = acme.registry_token("repository:scoped:pull")
    h = {"Authorization": f"Bearer {token}"}
    r = http.post(f"{acme.server.url}/v2/scoped/blobs/uploads/", headers=h)
    assert r.status_code == 403
    assert 'scope="repository:scoped:pull,push"' in r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    token = acme.registry_token("repository:scoped:pull,push")
    r = http.post(f"{acme.server.url}/v2/scoped/blobs/uploads/", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 202


def test_monolithic_and_post_with_digest(acme: Tenant) -> None:
    data = os.urandom(10000)
    with acme.client() as c:
        digest = push_blob(c, "mono", data)
        r = c.head(f"/v2/mono/blobs/{digest}")
        assert r.status_code == 200
        assert r.headers["content-length"] == str(len(data))
        assert r.headers["docker-content-digest"] == digest
        assert c.get(f"/v2/mono/blobs/{digest}").content == data
        other = os.urandom(5000)
        r = c.post("/v2/mono/blobs/uploads/", params={"digest": sha256(other)}, content=other)
        assert r.status_code == 201, r.text
        assert r.headers["location"] == f"/v2/mono/blobs/{sha256(other)}"
        assert c.get(f"/v2/mono/blobs/{sha256(other)}").content == other
        # wrong digest: refused, nothing published
        wrong = "sha256:" + "0" * 64
        r = c.post("/v2/mono/blobs/uploads/", params={"digest": wrong}, content=b"abc")
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        assert c.head(f"/v2/mono/blobs/{wrong}").status_code == 404


def test_sha512_blob(acme: Tenant) -> None:
    data = os.urandom(3000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    with acme.client() as c:
        r = c.post("/v2/sha/blobs/uploads/")
        r = c.put(at(r.headers["location"], digest=digest), content=data)
        assert r.status_code == 201, r.text
        assert c.get(f"/v2/sha/blobs/{digest}").content == data


def test_streamed_patch_then_put_empty_body(acme: Tenant) -> None:
    data = os.urandom(300_000)
    with acme.client() as c:
        r = c.post("/v2/stream/blobs/uploads/")
        assert r.status_code == 202
        assert r.headers["range"] == "0-0"
        assert "oci-chunk-min-length" in r.headers
        loc = r.headers["location"]

        def body():  # type: ignore[no-untyped-def]
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        r = c.patch(loc, content=body())
        assert r.status_code == 202, r.text
        assert r.headers["range"] == f"0-{len(data) - 1}"
        r = c.put(at(r.headers["location"], digest=sha256(data)))
        assert r.status_code == 201, r.text
        assert c.get(f"/v2/stream/blobs/{sha256(data)}").content == data


def test_chunked_upload_with_ranges_and_416(acme: Tenant) -> None:
    data = os.urandom(250_000)
    chunks = [data[:100_000], data[100_000:200_000], data[200_000:]]
    with acme.client() as c:
        loc = c.post("/v2/chunked/blobs/uploads/").headers["location"]
        offset = 0
        first_loc = None
        for chunk in chunks[:2]:
            r = c.patch(loc, content=chunk, headers={
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Type": "application/octet-stream"})
            assert r.status_code == 202, r.text
            first_loc = first_loc or loc
            loc = r.headers["location"]
            offset += len(chunk)
            assert r.headers["range"] == f"0-{offset - 1}"
        # a repeated chunk and an out-of-order chunk: 416, nothing written
        r = c.patch(loc, content=chunks[1], headers={"Content-Range": f"100000-{200_000 - 1}"})
        assert r.status_code == 416
        r = c.patch(loc, content=chunks[2], headers={"Content-Range": f"210000-{210_000 + len(chunks[2]) - 1}"})
        assert r.status_code == 416
        # a stale URL (earlier offset) cannot append either
        r = c.patch(first_loc, content=b"x" * 10)
        assert r.status_code == 416
        # status: 204 with Location and Range
        r = c.get(loc)
        assert r.status_code == 204
        assert r.headers["range"] == f"0-{offset - 1}"
        assert r.headers["location"]
        # a body (chunked: no Content-Length to compare) longer than its Content-Range:
        # what the range covers is kept, the rest refused
        def overlong() -> Iterator[bytes]:
            yield chunks[2][:30_000]
            yield chunks[2][30_000:]
        r = c.patch(loc, content=overlong(), headers={"Content-Range": f"{offset}-{offset + 9}"})
        assert r.status_code == 416 and r.headers["range"] == f"0-{offset + 9}"
        offset += 10
        r = c.patch(r.headers["location"], content=chunks[2][10:],
                    headers={"Content-Range": f"{offset}-{len(data) - 1}"})  # fmt: skip
        assert r.status_code == 202
        r = c.put(at(r.headers["location"], digest=sha256(data)))
        assert r.status_code == 201
        assert c.get(f"/v2/chunked/blobs/{sha256(data)}").content == data
        # the finished session is gone
        assert c.get(r.headers["location"].replace("/blobs/", "/blobs/uploads/x")).status_code in (400, 404)


def test_put_with_final_chunk_and_cancel(acme: Tenant) -> None:
    data = os.urandom(2000)
    with acme.client() as c:
        loc = c.post("/v2/final/blobs/uploads/").headers["location"]
        r = c.patch(loc, content=data[:1000], headers={"Content-Range": "0-999"})
        r = c.put(at(r.headers["location"], digest=sha256(data)), content=data[1000:],
                  headers={"Content-Range": "1000-1999"})
        assert r.status_code == 201, r.text
        loc = c.post("/v2/final/blobs/uploads/").headers["location"]
        assert c.delete(loc).status_code == 204
        assert c.get(loc).status_code == 404
        assert c.patch(loc, content=b"x").status_code == 404


def test_range_reads(acme: Tenant) -> None:
    data = bytes(range(256)) * 1000
    with acme.client() as c:
        digest = push_blob(c, "ranges", data)
        r = c.get(f"/v2/ranges/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
        r = c.get(f"/v2/ranges/blobs/{digest}", headers={"Range": "bytes=-5"})
        assert r.content == data[-5:]
        r = c.get(f"/v2/ranges/blobs/{digest}", headers={"Range": f"bytes={len(data) - 3}-"})
        assert r.content == data[-3:]
        r = c.get(f"/v2/ranges/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416


def test_an_invalid_range_and_a_head_get_the_whole_blob(acme: Tenant) -> None:
    """RFC 9110: ``bytes=5-2`` is an invalid range, ignored (14.1.1: it was a 416); a
    HEAD ignores Range, only GET has range handling (14.2: an unsatisfiable one was a
    416, a satisfiable one a 200 anyway)."""
    data = os.urandom(100)
    with acme.client() as c:
        digest = push_blob(c, "badranges", data)
        r = c.get(f"/v2/badranges/blobs/{digest}", headers={"Range": "bytes=5-2"})
        assert r.status_code == 200 and r.content == data, r.status_code
        for value in ("bytes=500-", "bytes=5-2", "bytes=0-9"):
            r = c.head(f"/v2/badranges/blobs/{digest}", headers={"Range": value})
            assert r.status_code == 200 and r.headers["content-length"] == "100", (value, r.status_code)
            assert "content-range" not in r.headers


def test_accept_with_q0_excludes_the_type(acme: Tenant) -> None:
    """``q=0`` is "not acceptable" (RFC 9110 12.4.2): it was taken as acceptable."""
    with acme.client() as c:
        push_image(c, "q0", "v1", [os.urandom(100)])
        for accept in (f"{OCI_MANIFEST};q=0", f"*/*, {OCI_MANIFEST}; q=0.0"):
            r = c.get("/v2/q0/manifests/v1", headers={"Accept": accept})
            assert r.status_code == 404, (accept, r.status_code)
            assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        r = c.get("/v2/q0/manifests/v1", headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.1"})
        assert r.status_code == 200


def test_a_405_says_which_methods_are_allowed(acme: Tenant) -> None:
    """A 405 must carry Allow (RFC 9110 15.5.6): it carried none."""
    digest = f"sha256:{'4' * 64}"
    cases = {
        ("POST", "/v2/"): "GET, HEAD",
        ("DELETE", "/v2/_catalog"): "GET, HEAD",
        ("PUT", f"/v2/allow/blobs/{digest}"): "DELETE, GET, HEAD",
        ("POST", f"/v2/allow/manifests/{digest}"): "DELETE, GET, HEAD, PUT",
        ("POST", "/v2/allow/tags/list"): "GET",
        ("GET", "/v2/allow/blobs/uploads/"): "POST",
        ("POST", f"/v2/allow/blobs/uploads/{'a' * 32}"): "DELETE, GET, PATCH, PUT",
    }
    with acme.client() as c:
        for (method, path), allow in cases.items():
            r = c.request(method, path)
            assert r.status_code == 405 and r.json()["errors"][0]["code"] == "UNSUPPORTED", (method, path)
            assert r.headers.get("allow") == allow, (method, path, r.headers.get("allow"))
    r = http.put(f"{acme.server.url}/token")
    assert r.status_code == 405 and r.headers.get("allow") == "GET, POST"

def test_manifest_put_get_accept_and_validation(acme: Tenant) -> None:
    with acme.client() as c:
        digest, manifest = push_image(c, "app", "v1", [os.urandom(1000), os.urandom(2000)])
        r = c.put("/v2/app/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201
        assert r.headers["location"] == f"/v2/app/manifests/{digest}"
        assert r.headers["docker-content-digest"] == digest
        for ref in ("v1", digest):
            r = c.get(f"/v2/app/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200 and r.content == manifest
            assert r.headers["content-type"] == OCI_MANIFEST
            assert r.headers["docker-content-digest"] == digest
            r = c.head(f"/v2/app/manifests/{ref}")
            assert r.status_code == 200 and r.headers["content-length"] == str(len(manifest))
        # Accept that excludes the type
        r = c.get("/v2/app/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
        assert r.status_code == 404
        r = c.get("/v2/app/manifests/v1", headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5"})
        assert r.status_code == 200
        assert c.get("/v2/app/manifests/nope").status_code == 404
        # digest in the URL must match the body
        wrong = "sha256:" + "1" * 64
        r = c.put(f"/v2/app/manifests/{wrong}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        # referenced blob absent from this repository
        bad = image_manifest(b"{}", [b"never uploaded"])
        r = c.put("/v2/app/manifests/bad", content=bad, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
        # a descriptor whose size is not the blob's
        resized = json.loads(manifest)
        resized["layers"][0]["size"] += 1
        r = c.put("/v2/app/manifests/bad", content=json.dumps(resized).encode(), headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
        assert "size" in r.json()["errors"][0]["message"]
        # media type must agree with the body; index/manifest confusion refused
        r = c.put("/v2/app/manifests/bad", content=manifest, headers={"Content-Type": OCI_INDEX})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
        confused = json.loads(manifest)
        confused["manifests"] = []
        r = c.put("/v2/app/manifests/bad", content=json.dumps(confused).encode(),
                  headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400
        # a body without mediaType may be only an OCI kind (docker/distribution alike)
        untyped = json.loads(manifest)
        del untyped["mediaType"]
        untyped_bytes = json.dumps(untyped).encode()
        r = c.put("/v2/app/manifests/bad", content=untyped_bytes, headers={"Content-Type": DOCKER_MANIFEST})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
        r = c.put("/v2/app/manifests/untyped", content=untyped_bytes, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201
        assert c.head("/v2/app/manifests/untyped").headers["content-type"] == OCI_MANIFEST
        r = c.put("/v2/app/manifests/bad", content=b"{not json", headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
        # too large
        r = c.put("/v2/app/manifests/big", content=b" " * (4 * 1024 * 1024 + 1), headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 413
        assert c.get("/v2/app/manifests/bad").status_code == 404


def test_index_needs_its_children_and_nested_empty_index(acme: Tenant) -> None:
    with acme.client() as c:
        child, child_bytes = push_image(c, "idx", "child", [os.urandom(500)])
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": child, "size": len(child_bytes),
             "platform": {"architecture": "amd64", "os": "linux"}}]}
        body = json.dumps(index).encode()
        r = c.put("/v2/idx/manifests/multi", content=body, headers={"Content-Type": OCI_INDEX})
        assert r.status_code == 201, r.text
        # an index naming a manifest this repository does not have
        index["manifests"][0]["digest"] = "sha256:" + "2" * 64  # type: ignore[index]
        r = c.put("/v2/idx/manifests/broken", content=json.dumps(index).encode(), headers={"Content-Type": OCI_INDEX})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
        empty = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
        assert c.put("/v2/idx/manifests/empty", content=empty, headers={"Content-Type": OCI_INDEX}).status_code == 201
        nested = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_INDEX, "digest": sha256(empty), "size": len(empty)},
            {"mediaType": OCI_INDEX, "digest": sha256(body), "size": len(body)}]}).encode()
        r = c.put("/v2/idx/manifests/nested", content=nested, headers={"Content-Type": OCI_INDEX})
        assert r.status_code == 201, r.text
        assert c.get("/v2/idx/manifests/nested").content == nested


def test_tags_list_pagination_and_cap(acme: Tenant) -> None:
    with acme.client() as c:
        _, manifest = push_image(c, "tagged", "a", [os.urandom(100)])
        for tag in ["b", "c", "d", "e"]:
            assert c.put(f"/v2/tagged/manifests/{tag}", content=manifest, headers={"Content-Type": OCI_MANIFEST}).status_code == 201
        assert c.get("/v2/tagged/tags/list").json() == {"name": "tagged", "tags": ["a", "b", "c", "d", "e"]}
        r = c.get("/v2/tagged/tags/list", params={"n": 2})
        assert r.json()["tags"] == ["a", "b"]
        assert r.headers["link"] == '</v2/tagged/tags/list?n=2&last=b>; rel="next"'
        assert c.get("/v2/tagged/tags/list", params={"n": 2, "last": "b"}).json()["tags"] == ["c", "d"]
        assert c.get("/v2/tagged/tags/list", params={"n": 10, "last": "e"}).json()["tags"] == []
        # no tag holds a NUL: a "last" with one pages as what comes before it
        assert c.get("/v2/tagged/tags/list", params={"last": "b\x00x"}).json()["tags"] == ["c", "d", "e"]
        assert c.get("/v2/tagged/tags/list", params={"last": "\x00"}).json()["tags"] == ["a", "b", "c", "d", "e"]
        r = c.get("/v2/tagged/tags/list", params={"n": 100000})
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
        assert c.get("/v2/no-such-repo/tags/list").status_code == 404


def test_referrers_api(acme: Tenant) -> None:
    with acme.client() as c:
        subject, subject_bytes = push_image(c, "refs", "v1", [os.urandom(100)])
        # missing subject: 200 with an empty index
        r = c.get(f"/v2/refs/referrers/sha256:{'3' * 64}")
        assert r.status_code == 200
        assert r.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        empty = b"{}"
        push_blob(c, "refs", empty)
        sig = os.urandom(64)
        push_blob(c, "refs", sig)
        referrers = {}
        for atype in ("application/vnd.example.sig", "application/vnd.example.sbom"):
            doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": atype,
                   "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(empty), "size": 2},
                   "layers": [{"mediaType": "application/octet-stream", "digest": sha256(sig), "size": len(sig)}],
                   "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_bytes)},
                   "annotations": {"org.example": atype}}
            body = json.dumps(doc).encode()
            r = c.put(f"/v2/refs/manifests/{sha256(body)}", content=body, headers={"Content-Type": OCI_MANIFEST})
            assert r.status_code == 201, r.text
            assert r.headers["oci-subject"] == subject
            referrers[atype] = sha256(body)
        r = c.get(f"/v2/refs/referrers/{subject}", params={"artifactType": "no/such\x00type"})
        assert r.status_code == 200 and r.json()["manifests"] == [], r.text
        r = c.get(f"/v2/refs/referrers/{subject}")
        got = {m["artifactType"]: m for m in r.json()["manifests"]}
        assert set(got) == set(referrers)
        assert got["application/vnd.example.sig"]["digest"] == referrers["application/vnd.example.sig"]
        assert got["application/vnd.example.sig"]["annotations"] == {"org.example": "application/vnd.example.sig"}
        assert "oci-filters-applied" not in r.headers
        r = c.get(f"/v2/refs/referrers/{subject}", params={"artifactType": "application/vnd.example.sbom"})
        assert r.headers["oci-filters-applied"] == "artifactType"
        assert [m["digest"] for m in r.json()["manifests"]] == [referrers["application/vnd.example.sbom"]]
        assert r.headers["content-type"].startswith(OCI_INDEX)


def test_deletes(acme: Tenant) -> None:
    with acme.client() as c:
        layer = os.urandom(700)
        digest, manifest = push_image(c, "del", "v1", [layer])
        c.put("/v2/del/manifests/v2", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert c.delete("/v2/del/manifests/v1").status_code == 202  # tag only
        assert c.get("/v2/del/manifests/v1").status_code == 404
        assert c.get(f"/v2/del/manifests/{digest}").status_code == 200
        assert c.delete(f"/v2/del/manifests/{digest}").status_code == 202
        assert c.get("/v2/del/manifests/v2").status_code == 404  # its tags went with it
        assert c.delete(f"/v2/del/manifests/{digest}").status_code == 404
        assert c.delete(f"/v2/del/blobs/{sha256(layer)}").status_code == 202
        assert c.head(f"/v2/del/blobs/{sha256(layer)}").status_code == 404
        assert c.delete(f"/v2/del/blobs/{sha256(layer)}").status_code == 404


def test_mount_within_org(acme: Tenant) -> None:
    with acme.client() as c:
        layer = os.urandom(1234)
        digest = push_blob(c, "mount-src", layer)
        r = c.post("/v2/mount-dst/blobs/uploads/", params={"mount": digest, "from": "mount-src"})
        assert r.status_code == 201
        assert r.headers["location"] == f"/v2/mount-dst/blobs/{digest}"
        assert c.get(f"/v2/mount-dst/blobs/{digest}").content == layer
        # mount without from, and from a repository that does not exist: plain upload sessions
        assert c.post("/v2/mount-dst/blobs/uploads/", params={"mount": digest}).status_code == 202
        assert c.post("/v2/mount-dst/blobs/uploads/", params={"mount": digest, "from": "nowhere"}).status_code == 202


def test_catalog_pagination(acme: Tenant) -> None:
    with acme.client() as c:
        for name in ("cat/a", "cat/b", "cat/c"):
            push_blob(c, name, b"x")
        names = c.get("/v2/_catalog").json()["repositories"]
        assert {"cat/a", "cat/b", "cat/c"} <= set(names)
        assert names == sorted(names)
        r = c.get("/v2/_catalog", params={"n": 1, "last": "cat/a"})
        assert r.json()["repositories"] == ["cat/b"]
        assert 'rel="next"' in r.headers["link"]
        assert c.get("/v2/_catalog", params={"n": 5000}).status_code == 400
        # a repository with only an upload started holds nothing: not listed
        assert c.post("/v2/cat/started/blobs/uploads/").status_code == 202
        assert "cat/started" not in c.get("/v2/_catalog").json()["repositories"]


def test_error_format_and_unknown_paths(acme: Tenant) -> None:
    with acme.client() as c:
        r = c.get(f"/v2/nothing/blobs/sha256:{'4' * 64}")
        assert r.status_code == 404
        err = r.json()["errors"][0]
        assert err["code"] == "BLOB_UNKNOWN" and err["message"]
        assert c.get("/v2/nothing/blobs/md5:abc").json()["errors"][0]["code"] == "DIGEST_INVALID"
        assert c.get("/v2/UPPER/tags/list").json()["errors"][0]["code"] == "NAME_INVALID"
        assert c.put(f"/v2/nothing/blobs/sha256:{'4' * 64}").status_code == 405
        assert c.get("/elsewhere").status_code == 404
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for path in ("/v2/", "/v2/_catalog"):
                r = c.request(method, path)
                assert r.status_code == 405, (method, path, r.status_code)
                assert r.json()["errors"][0]["code"] == "UNSUPPORTED"
    # malformed Basic credentials: a 401 that still says how to authenticate
    for value in ("Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Basic",
                  "Basic " + base64.b64encode(b"nocolon").decode()):  # fmt: skip
        r = http.get(f"{acme.server.url}/v2/", headers={"Authorization": value})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer realm=")
        r = http.get(f"{acme.server.url}/token", headers={"Authorization": value})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic realm=")
        # the same challenge as without credentials, with the scope the request needs
        r = http.get(f"{acme.server.url}/v2/web/tags/list", headers={"Authorization": value})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == http.get(f"{acme.server.url}/v2/web/tags/list").headers["www-authenticate"]
        assert 'scope="repository:web:pull"' in r.headers["www-authenticate"]


def test_docker_schema2_manifest(acme: Tenant) -> None:
    with acme.client() as c:
        config = b'{"architecture":"amd64","os":"linux"}'
        layer = os.urandom(100)
        push_blob(c, "docker", config)
        push_blob(c, "docker", layer)
        doc = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
               "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(config), "size": len(config)},
               "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha256(layer), "size": len(layer)}]}
        body = json.dumps(doc, indent=3).encode()
        assert c.put("/v2/docker/manifests/x", content=body, headers={"Content-Type": DOCKER_MANIFEST}).status_code == 201
        r = c.get("/v2/docker/manifests/x", headers={"Accept": DOCKER_MANIFEST})
        assert r.content == body and r.headers["content-type"] == DOCKER_MANIFEST
        schema1 = json.dumps({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}).encode()
        r = c.put("/v2/docker/manifests/old", content=schema1,
                  headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"})
        assert r.status_code == 400
        _ = OCI_CONFIG


def test_rejected_manifest_creates_no_repository(acme: Tenant) -> None:
    with acme.client() as c:
        bad = image_manifest(b"{}", [b"never uploaded"])
        r = c.put("/v2/ghost/manifests/v1", content=bad, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400
        assert "ghost" not in c.get("/v2/_catalog").json()["repositories"]
        assert c.get("/v2/ghost/tags/list").status_code == 404


def test_a_repository_with_only_an_upload_started_is_unknown(acme: Tenant) -> None:
    """Its tags/list said ``[]``; the distribution spec says NAME_UNKNOWN, and the
    catalog leaves it out already."""
    with acme.client() as c:
        loc = c.post("/v2/upload-only/blobs/uploads/").headers["Location"]
        r = c.get("/v2/upload-only/tags/list")
        assert r.status_code == 404, r.text
        assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert "upload-only" not in c.get("/v2/_catalog").json()["repositories"]
        assert c.delete(loc).status_code == 204
        push_blob(c, "upload-only", b"a blob makes it a repository")
        assert c.get("/v2/upload-only/tags/list").json() == {"name": "upload-only", "tags": []}
        assert "upload-only" in c.get("/v2/_catalog").json()["repositories"]


def test_empty_blob(acme: Tenant) -> None:
    with acme.client() as c:
        digest = push_blob(c, "empty", b"")
        r = c.head(f"/v2/empty/blobs/{digest}")
        assert r.status_code == 200 and r.headers["content-length"] == "0"
        r = c.get(f"/v2/empty/blobs/{digest}")
        assert r.status_code == 200 and r.content == b""
        assert c.get(f"/v2/empty/blobs/{digest}", headers={"Range": "bytes=0-"}).status_code == 416
        # no last bytes of nothing either (it was a 206 with "bytes 0--1/0")
        r = c.get(f"/v2/empty/blobs/{digest}", headers={"Range": "bytes=-5"})
        assert r.status_code == 416 and r.headers["content-range"] == "bytes */0"


def test_bytes_gone_under_a_row_is_a_404_not_a_500(acme: Tenant) -> None:
    """What a GC racing a read looks like: the row was read, the file is gone."""
    with acme.client() as c:
        layer = os.urandom(321)
        digest, _ = push_image(c, "vanish", "v1", [layer])
        store = acme.server.home / "registry" / "content" / "blobs" / "sha256"
        (store / digest.split(":")[1]).unlink()
        (store / sha256(layer).split(":")[1]).unlink()
        assert c.get("/v2/vanish/manifests/v1").status_code == 404
        assert c.get(f"/v2/vanish/blobs/{sha256(layer)}").status_code == 404
        assert c.head(f"/v2/vanish/blobs/{sha256(layer)}").status_code == 404  # so clients upload again
        # and a push of the same content repairs it
        digest2, _ = push_image(c, "vanish", "v1", [layer])
        assert digest2 == digest and c.get("/v2/vanish/manifests/v1").status_code == 200
        assert c.get(f"/v2/vanish/blobs/{sha256(layer)}").content == layer


def test_large_and_sha512_manifests(acme: Tenant) -> None:
    with acme.client() as c:
        config = b'{"architecture":"amd64","os":"linux"}'
        push_blob(c, "bigm", config)
        # just under the 4 MiB limit (the conformance suite pushes ~4 MB manifests)
        body = image_manifest(config, [], annotations={"pad": "x" * (4 * 1024 * 1024 - 400)})
        assert len(body) <= 4 * 1024 * 1024
        r = c.put("/v2/bigm/manifests/big", content=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201, r.text
        assert c.get("/v2/bigm/manifests/big").content == body
        # addressed by sha512
        small = image_manifest(config, [])
        d512 = "sha512:" + hashlib.sha512(small).hexdigest()
        r = c.put(f"/v2/bigm/manifests/{d512}", content=small, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201, r.text
        assert r.headers["docker-content-digest"] == d512
        r = c.get(f"/v2/bigm/manifests/{d512}")
        assert r.content == small and r.headers["docker-content-digest"] == d512
