"""Per-organization storage quotas (``ember admin org quota``), over raw HTTP and with
skopeo against a real server."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from ember.registry.server.metadata import RegistryMetadata
from tests.registry.server.support import EmberServer, Tenant, at, ember, push_blob, sha256

pytestmark = pytest.mark.integration


def org_row(server: EmberServer, org: str) -> dict[str, object]:
    rows = json.loads(ember(server.home, "admin", "org", "ls", "--json").stdout)
    (row,) = [r for r in rows if r["name"] == org]
    return dict(row)


def test_uploads_past_the_quota_are_refused_and_leave_nothing(server: EmberServer) -> None:
    server.create_org("quota1")
    t = Tenant(server, "quota1", server.create_token("quota1", "pull,push", "q"))
    ember(server.home, "admin", "org", "quota", "quota1", "10000")
    first, second = os.urandom(6000), os.urandom(6000)
    with t.client() as c:
        push_blob(c, "a", first)
        assert org_row(server, "quota1")["used_bytes"] == 6000
        # a second blob would take the organization to 12000 bytes: refused at the end
        r = c.post("/v2/a/blobs/uploads/")
        assert r.status_code == 202
        r = c.put(at(r.headers["Location"], digest=sha256(second)), content=second)
        assert r.status_code == 403, r.text
        assert r.json()["errors"][0]["code"] == "DENIED"
        assert "storage quota" in r.text and "6000 of 10000" in r.text
        assert c.head(f"/v2/a/blobs/{sha256(second)}").status_code == 404
        # a chunk announced bigger than what is left: refused before it is written
        r = c.post("/v2/a/blobs/uploads/")
        r = c.patch(r.headers["Location"], content=second,
                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 403, r.text
        # a chunk out of order is a 416 that keeps the session, quota or not: it is not
        # refused for the bytes its wrong offset claims (6000 used + 5007 would not fit;
        # 6000 + the 10 bytes the upload really has do)
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        loc = c.patch(loc, content=b"abc").headers["Location"]
        r = c.patch(loc, content=b"d" * 7, headers={"Content-Range": "5000-5006"})
        assert r.status_code == 416, r.text
        assert r.headers["Range"] == "0-2"
        assert c.get(loc).status_code == 204
        r = c.put(at(loc, digest=sha256(b"abc" + b"d" * 7)), content=b"d" * 7,
                  headers={"Content-Range": "3-9"})  # fmt: skip
        assert r.status_code == 201, r.text
        # a blob the organization holds already costs nothing, in another repository too
        push_blob(c, "b", first)
        assert org_row(server, "quota1")["used_bytes"] == 6010
        # a quota lowered below what is stored refuses new uploads at once
        ember(server.home, "admin", "org", "quota", "quota1", "5000")
        r = c.post("/v2/a/blobs/uploads/")
        assert r.status_code == 403, r.text
        assert r.json()["errors"][0]["message"] == (
            "organization quota1 is over its storage quota: 6010 of 5000 bytes used"
        )
        # lifting the quota lets the upload through
        ember(server.home, "admin", "org", "quota", "quota1", "none")
        push_blob(c, "a", second)
    row = org_row(server, "quota1")
    assert (row["used_bytes"], row["quota_bytes"]) == (12010, None)
    # nothing of the refused uploads is left in the server's upload area
    uploads = server.home / "registry" / "uploads"
    if uploads.is_dir():
        assert not any(uploads.iterdir()), list(uploads.iterdir())


def test_a_held_digest_does_not_carry_other_bytes_past_the_quota(server: EmberServer) -> None:
    """A blob the organization holds costs nothing; bytes that only *claim* its digest
    (the final PUT or a monolithic POST) are not that blob and must not stay behind."""
    server.create_org("quota3")
    t = Tenant(server, "quota3", server.create_token("quota3", "pull,push", "q"))
    ember(server.home, "admin", "org", "quota", "quota3", "10000")
    uploads = server.home / "registry" / "uploads"
    before = {p.name for p in uploads.iterdir()}
    big = os.urandom(200_000)
    with t.client() as c:
        held = push_blob(c, "a", b"x")
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        r = c.put(at(loc, digest=held), content=big)
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID", r.text
        r = c.post("/v2/a/blobs/uploads/", params={"digest": held}, content=big)
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID", r.text
        assert c.get(loc).status_code == 404  # the session is gone with its bytes
        # a mistaken digest for bytes that do fit keeps the session, as before
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        assert c.put(at(loc, digest=held), content=b"yz").status_code == 400
        assert c.get(loc).status_code == 204
        c.delete(loc)
    assert {p.name for p in uploads.iterdir()} - before == set()


def test_skopeo_push_over_the_quota_fails_with_the_reason(
    server: EmberServer, busybox_layout: Path
) -> None:
    server.create_org("quota2")
    token = server.create_token("quota2", "pull,push", "q")
    ember(server.home, "admin", "org", "quota", "quota2", "100K")
    res = subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", "--dest-creds", f"x:{token}",
         f"oci:{busybox_layout}:latest", f"docker://{server.host}/box:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0
    assert "over its storage quota" in res.stderr, res.stderr[-2000:]


def test_a_database_from_before_quotas_gets_the_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    RegistryMetadata(url).create_org("old")
    with sqlite3.connect(tmp_path / "registry.db") as conn:  # as the first schema had it
        conn.execute("ALTER TABLE reg_orgs DROP COLUMN quota_bytes")
        conn.execute("DELETE FROM ember_migrations WHERE id = '0002-org-quota'")
    # a new process (this one has migrated its cached database already)
    ember(tmp_path, "admin", "org", "quota", "--db", url, "old", "1M")
    rows = json.loads(ember(tmp_path, "admin", "org", "ls", "--db", url, "--json").stdout)
    assert [(r["name"], r["quota_bytes"], r["used_bytes"]) for r in rows] == [("old", 1 << 20, 0)]


def test_a_body_past_the_quota_is_not_written_whole(server: EmberServer) -> None:
    """A chunked body (no Content-Length to judge it by) was written to the end before
    its quota was checked: one org could fill the disk for as long as a request ran."""
    import httpx

    server.create_org("quota4")
    t = Tenant(server, "quota4", server.create_token("quota4", "pull,push", "q"))
    ember(server.home, "admin", "org", "quota", "quota4", "10000")
    uploads = server.home / "registry" / "uploads"
    before = {p.name for p in uploads.iterdir()}
    most = [0]  # the most bytes the server's upload files held while the body was sent

    def held() -> int:
        total = 0
        for p in uploads.iterdir():
            if p.name not in before:
                with contextlib.suppress(FileNotFoundError):  # dropped meanwhile
                    total += p.stat().st_size
        return total

    def body():  # type: ignore[no-untyped-def]
        for i in range(800):  # chunks of 64 KiB: 50 MiB
            if i % 16 == 0:
                most[0] = max(most[0], held())
            yield b"z" * 65536

    with t.client() as c:
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        try:
            r = c.patch(loc, content=body(), headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 403 and "storage quota" in r.text, r.text
        except httpx.TransportError:
            pass  # the server answered and closed while the client still sent
        assert c.get(loc).status_code == 404  # dropped
    assert most[0] < 4 << 20, most[0]  # the quota's 10000 bytes and a write buffer
    assert {p.name for p in uploads.iterdir()} - before == set()
