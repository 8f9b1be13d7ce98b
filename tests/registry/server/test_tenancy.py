"""Tenancy attacks over raw HTTP: one organization must not see, read, mount,
overwrite or delete another's content, whatever URL or token it sends."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from pathlib import Path

import pytest

from tests.registry.server.support import (
    OCI_MANIFEST,
    EmberServer,
    Tenant,
    at,
    ember,
    http,
    push_blob,
    push_image,
    sha256,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secret_image(acme: Tenant) -> tuple[str, str, bytes]:
    """acme's private image ``web:1``: (manifest digest, layer digest, layer bytes)."""
    layer = os.urandom(4096)
    with acme.client() as c:
        digest, _ = push_image(c, "web", "1", [layer])
    return digest, sha256(layer), layer


def test_same_name_two_orgs(acme: Tenant, beta: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    with beta.client() as c:
        beta_digest, _ = push_image(c, "web", "1", [os.urandom(100)])
        assert c.get("/v2/web/manifests/1").headers["docker-content-digest"] == beta_digest
    with acme.client() as c:
        assert c.get("/v2/web/manifests/1").headers["docker-content-digest"] == secret_image[0]


def test_cross_tenant_blob_reads(beta: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    manifest, layer, _ = secret_image
    with beta.client() as c:
        for path in (f"/v2/web/blobs/{layer}", f"/v2/acme/web/blobs/{layer}", f"/v2/other/blobs/{layer}"):
            assert c.head(path).status_code == 404
            assert c.get(path).status_code == 404
            assert c.get(path, headers={"Range": "bytes=0-10"}).status_code == 404
        for path in (f"/v2/acme/web/manifests/{manifest}", "/v2/acme/web/manifests/1",
                     f"/v2/web/manifests/{manifest}"):
            assert c.get(path).status_code == 404
        assert c.get("/v2/acme/web/tags/list").status_code == 404
        assert c.get(f"/v2/acme/web/referrers/{manifest}").json()["manifests"] == []


def test_cross_tenant_mount_reveals_nothing(beta: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    _, layer, _ = secret_image
    with beta.client() as c:
        for source in ("web", "acme/web", "../acme/web"):
            r = c.post("/v2/stolen/blobs/uploads/", params={"mount": layer, "from": source})
            assert r.status_code == 202, (source, r.status_code)
            assert "location" in r.headers
        assert c.head(f"/v2/stolen/blobs/{layer}").status_code == 404
        # a manifest naming acme's layer cannot be pushed without the bytes
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": layer, "size": 4096},
                           "layers": []}).encode()
        r = c.put("/v2/stolen/manifests/x", content=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400


def test_mount_needs_pull_on_source(acme: Tenant) -> None:
    """A registry token scoped to push on the target only cannot mount from elsewhere."""
    with acme.client() as c:
        digest = push_blob(c, "mount-private", os.urandom(300))
    token = acme.registry_token("repository:mount-target:pull,push")
    h = {"Authorization": f"Bearer {token}"}
    r = http.post(f"{acme.server.url}/v2/mount-target/blobs/uploads/",
                   params={"mount": digest, "from": "mount-private"}, headers=h)
    assert r.status_code == 202
    token = acme.registry_token("repository:mount-target:pull,push", "repository:mount-private:pull")
    r = http.post(f"{acme.server.url}/v2/mount-target/blobs/uploads/",
                   params={"mount": digest, "from": "mount-private"}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201


def test_catalog_and_tags_are_per_org(acme: Tenant, beta: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    with beta.client() as c:
        push_blob(c, "beta-only", b"b")
        repos = c.get("/v2/_catalog").json()["repositories"]
    assert "beta-only" in repos
    assert not any(r.startswith("acme") or r.startswith("beta/") for r in repos)
    with acme.client() as c:
        repos = c.get("/v2/_catalog").json()["repositories"]
    assert "web" in repos and "beta-only" not in repos


def test_cross_tenant_delete_and_overwrite(acme: Tenant, beta: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    manifest, layer, _ = secret_image
    with beta.client() as c:
        assert c.delete(f"/v2/acme/web/manifests/{manifest}").status_code == 404
        assert c.delete(f"/v2/acme/web/blobs/{layer}").status_code == 404
        c.delete("/v2/web/manifests/1")  # beta's own web:1, if any
    with acme.client() as c:
        r = c.get("/v2/web/manifests/1")
        assert r.status_code == 200 and r.headers["docker-content-digest"] == manifest
        assert c.get(f"/v2/web/blobs/{layer}").content == secret_image[2]


def test_upload_url_of_another_tenant(acme: Tenant, beta: Tenant) -> None:
    with acme.client() as c:
        loc = c.post("/v2/upl/blobs/uploads/").headers["location"]
    data = b"beta's bytes"
    with beta.client() as c:
        assert c.patch(loc, content=data).status_code == 404
        assert c.put(at(loc, digest=sha256(data)), content=data).status_code == 404
        assert c.get(loc).status_code == 404
        assert c.delete(loc).status_code == 404
        # the same session id under beta's own name of the repository
        assert c.patch(loc.replace("/v2/upl/", "/v2/upl/"), content=data).status_code == 404
    with acme.client() as c:
        r = c.get(loc)
        assert r.status_code == 204 and r.headers["range"] == "0-0"


def _tamper(loc: str, change: dict[int, object]) -> str:
    base, state = loc.split("?_state=")
    payload_b64, mac = state.split(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    for i, v in change.items():
        payload[i] = v
    forged = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{base}?_state={forged}.{mac}"


def test_tampered_and_expired_upload_urls(acme: Tenant) -> None:
    with acme.client() as c:
        loc = c.post("/v2/tamper/blobs/uploads/").headers["location"]
        session = loc.split("/uploads/")[1].split("?")[0]
        c.patch(loc, content=b"12345")
        for forged in (
            _tamper(loc, {3: 99}),  # offset
            _tamper(loc, {4: int(time.time()) + 10**8}),  # expiry
            _tamper(loc, {1: "acme/other"}),  # repository
            _tamper(loc, {4: int(time.time()) - 10}),  # expired
            loc.split("?")[0],  # no state at all
            loc[:-3] + ("AAA" if not loc.endswith("AAA") else "BBB"),  # broken signature
        ):
            assert c.patch(forged, content=b"x").status_code == 404, forged
            assert c.get(forged).status_code == 404
        # another session id with this session's state
        other = loc.replace(session, "f" * 32)
        assert c.get(other).status_code == 404
        # a valid state moved to another repository path
        assert c.get(loc.replace("/v2/tamper/", "/v2/tamper2/")).status_code == 404
        assert c.get(loc).status_code == 204


def _raw_get(server_host: str, path: str, token: str) -> int:
    """Send the path exactly as written (httpx would normalise dot segments)."""
    host, port = server_host.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_dot_segments_refused_before_authorization(beta: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    _, layer, _ = secret_image
    for path in (
        f"/v2/../acme/web/blobs/{layer}",
        f"/v2/x/../../acme/web/blobs/{layer}",
        f"/v2/web/./blobs/{layer}",
        f"/v2/%2e%2e/acme/web/blobs/{layer}",
        "/v2/%2E%2E/acme/web/manifests/1",
        f"/v2/web%2f..%2facme/blobs/{layer}",
        "/v2/.%2e/acme/web/tags/list",
        f"/v2//web/blobs/{layer}",
    ):
        assert _raw_get(beta.host, path, beta.token) == 400, path
    # refused without any credentials too: the check comes before authorization
    assert _raw_get(beta.host, f"/v2/../acme/web/blobs/{layer}", "none") == 400


def test_unsigned_foreign_and_expired_registry_tokens(acme: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    import hashlib
    import hmac

    real = acme.registry_token("repository:web:pull")
    header, payload, sig = real.split(".")
    url = f"{acme.server.url}/v2/web/manifests/1"
    assert http.get(url, headers={"Authorization": f"Bearer {real}"}).status_code == 200

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged_claims = dict(claims, org="acme", access=[{"type": "repository", "name": "acme/web", "actions": ["pull", "push", "delete"]}])
    key = b"attacker key"
    candidates = {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(forged_claims)}.",
        "unsigned": f"{header}.{b64(forged_claims)}.",
        "modified claims": f"{header}.{b64(forged_claims)}.{sig}",
    }
    # foreign key, announced through jwk / jku / x5u headers: must be ignored
    for extra in ({}, {"jwk": {"kty": "oct", "k": base64.urlsafe_b64encode(key).decode()}},
                  {"jku": "http://attacker/keys"}, {"x5u": "http://attacker/cert"}):
        h = b64({"alg": "HS256", "typ": "JWT", **extra})
        body = b64(forged_claims)
        mac = hmac.new(key, f"{h}.{body}".encode(), hashlib.sha256).digest()
        candidates[f"foreign {list(extra)}"] = f"{h}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    expired_claims = dict(claims, exp=int(time.time()) - 3600)
    candidates["expired (re-signed with a foreign key)"] = f"{header}.{b64(expired_claims)}.{sig}"
    for name, token in candidates.items():
        r = http.get(url, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, name
        assert 'error="invalid_token"' in r.headers["www-authenticate"], name


def test_push_only_token_cannot_delete(acme: Tenant, acme_pusher: Tenant, secret_image: tuple[str, str, bytes]) -> None:
    manifest, layer, _ = secret_image
    with acme_pusher.client() as c:
        assert c.get(f"/v2/web/manifests/{manifest}").status_code == 200
        for path in (f"/v2/web/manifests/{manifest}", "/v2/web/manifests/1", f"/v2/web/blobs/{layer}"):
            r = c.delete(path)
            assert r.status_code == 403, path
            assert r.json()["errors"][0]["code"] == "DENIED"
    # through the token flow: the delete action is simply not granted
    token = acme_pusher.registry_token("repository:web:pull,push,delete")
    r = http.delete(f"{acme.server.url}/v2/web/manifests/1", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]
    with acme.client() as c:
        assert c.get("/v2/web/manifests/1").status_code == 200


def test_registry_tokens_die_with_the_api_token_they_came_from(
    server: EmberServer, secret_image: tuple[str, str, bytes]
) -> None:
    api_token = server.create_token("acme", "pull", "revoked-later")
    tenant = Tenant(server, "acme", api_token)
    jwt = tenant.registry_token("repository:web:pull")
    manifest = f"{server.url}/v2/web/manifests/1"
    accept = {"Accept": OCI_MANIFEST}
    assert http.get(manifest, headers={"Authorization": f"Bearer {jwt}", **accept}).status_code == 200
    # the API token used directly, so that this server process has it cached
    assert http.get(manifest, headers={"Authorization": f"Bearer {api_token}", **accept}).status_code == 200
    listed = json.loads(ember(server.home, "admin", "token", "ls", "--org", "acme", "--json").stdout)
    ember(server.home, "admin", "token", "revoke", *[t["id"] for t in listed if t["name"] == "revoked-later"])
    # a registry token still within its 5 minutes, and the cached API token, are refused
    # as soon as the server's revocation list is refreshed (every few seconds)
    deadline = time.monotonic() + 30
    codes: tuple[int, int] = (0, 0)
    while time.monotonic() < deadline:
        codes = (
            http.get(manifest, headers={"Authorization": f"Bearer {jwt}", **accept}).status_code,
            http.get(manifest, headers={"Authorization": f"Bearer {api_token}", **accept}).status_code,
        )
        if codes == (401, 401):
            break
        time.sleep(0.25)
    assert codes == (401, 401)
    r = http.get(manifest, headers={"Authorization": f"Bearer {jwt}", **accept})
    assert "revoked" in r.text and 'error="invalid_token"' in r.headers["www-authenticate"]


def test_an_expired_token_is_refused_and_nothing_made_from_it_outlives_it(server: EmberServer) -> None:
    """`admin token create --expires-in`: API tokens never expired (a leaked one worked for
    ever unless someone revoked it)."""

    def live_tokens() -> int:
        orgs = json.loads(ember(server.home, "admin", "org", "ls", "--json").stdout)
        return next(o["tokens"] for o in orgs if o["name"] == "acme")

    before = live_tokens()
    out = ember(server.home, "admin", "token", "create", "--org", "acme", "--name", "brief",
                "--access", "pull", "--expires-in", "4s")  # fmt: skip
    token = out.stdout.strip().splitlines()[-1]
    assert "expires " in out.stderr
    listed = [t for t in json.loads(ember(server.home, "admin", "token", "ls", "--json").stdout)
              if t["name"] == "brief"]  # fmt: skip
    expires_at = listed[0]["expires_at"]
    assert time.time() < expires_at <= time.time() + 4
    assert live_tokens() == before + 1
    assert http.get(f"{server.url}/v2/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    answer = http.get(f"{server.url}/token", auth=("x", token)).json()
    assert 1 <= answer["expires_in"] <= 4
    jwt = answer["token"]
    claims = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))
    assert claims["exp"] <= expires_at  # the registry token ends with the API token
    assert http.get(f"{server.url}/v2/", headers={"Authorization": f"Bearer {jwt}"}).status_code == 200
    time.sleep(max(0.0, expires_at - time.time()) + 1.1)
    assert http.get(f"{server.url}/v2/", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert http.get(f"{server.url}/token", auth=("x", token)).status_code == 401
    # the registry token made from it: refused once the servers' revocation lists
    # (refreshed every 5 s) hold its expiry, not 30 s later when its own clock-skew
    # leeway would end
    deadline = time.monotonic() + 10
    while http.get(f"{server.url}/v2/", headers={"Authorization": f"Bearer {jwt}"}).status_code != 401:
        assert time.monotonic() < deadline, "a registry token outlived its expired API token"
        time.sleep(0.25)
    assert live_tokens() == before  # `org ls` counts the live ones
    for bad in ("soon", "-1h", "1y"):
        res = ember(server.home, "admin", "token", "create", "--org", "acme", "--expires-in", bad, check=False)
        assert res.returncode == 2 and "give a duration such as 30d" in res.stderr, res.stderr
    # out of range: expired before it is handed over, or a date that does not format (the
    # token was stored, its secret never printed, and `token ls` failed from then on)
    for bad in ("0s", "1ns", "999ms", "36501d", "1000000000000d", "9" * 60 + "d"):
        res = ember(server.home, "admin", "token", "create", "--org", "acme", "--expires-in", bad, check=False)
        assert res.returncode == 2 and "from 1s to 100 years" in res.stderr, res.stderr
    assert "Traceback" not in ember(server.home, "admin", "token", "ls").stderr


def test_tokens_of_a_database_from_before_expiry_do_not_expire(tmp_path: Path) -> None:
    """0005 adds the expiry column; the tokens made before it keep working."""
    import contextlib
    import sqlite3

    from ember.registry.server.metadata import RegistryMetadata

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    meta = RegistryMetadata(url)
    meta.create_org("old")
    _, secret = meta.create_token("old", "before", frozenset({"pull"}))
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db, db:  # as 0004 left it
        db.execute("ALTER TABLE reg_tokens DROP COLUMN expires_at")
        db.execute("DELETE FROM ember_migrations WHERE id = '0005-token-expiry'")
    listed = json.loads(ember(tmp_path, "admin", "token", "ls", "--db", url, "--json").stdout)
    assert [(t["name"], t["expires_at"]) for t in listed] == [("before", None)]
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(reg_tokens)")}
    assert "expires_at" in columns
    found = meta.resolve_token(secret)  # (the column is back: the CLI migrated the file)
    assert found is not None and found.expires_at is None


def test_revoked_token(server: EmberServer) -> None:
    token = server.create_token("acme", "pull", "short-lived")
    token_id = ember(server.home, "admin", "token", "ls", "--org", "acme", "--json").stdout
    ids = [t["id"] for t in json.loads(token_id) if t["name"] == "short-lived"]
    ember(server.home, "admin", "token", "revoke", ids[0])
    assert http.get(f"{server.url}/v2/", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert http.get(f"{server.url}/token", auth=("x", token)).status_code == 401
    assert ember(server.home, "admin", "token", "revoke", ids[0], check=False).returncode != 0
