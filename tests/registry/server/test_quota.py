"""Per-organization storage quotas (``ember admin org quota``), over raw HTTP and with
skopeo against a real server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from ember.registry.server.metadata import RegistryMetadata
from tests.registry.server.support import (
    OCI_MANIFEST,
    EmberServer,
    Tenant,
    at,
    ember,
    image_manifest,
    push_blob,
    push_image,
    send_partial,
    sha256,
)
from tests.support.proc import poll_until, session_pids, thread_wchans

pytestmark = pytest.mark.integration



def quota_tenant(server: EmberServer, org: str, quota: str) -> Tenant:
    """A new organization with a pull,push token, under ``quota``."""
    server.create_org(org)
    t = Tenant(server, org, server.create_token(org, "pull,push", "q"))
    ember(server.home, "admin", "org", "quota", org, quota)
    return t

def org_row(server: EmberServer, org: str) -> dict[str, object]:
    rows = json.loads(ember(server.home, "admin", "org", "ls", "--json").stdout)
    (row,) = [r for r in rows if r["name"] == org]
    return dict(row)


def test_uploads_past_the_quota_are_refused_and_leave_nothing(server: EmberServer) -> None:
    t = quota_tenant(server, "quota1", "10000")
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
    (the final PUT or a monolithic POST) are not that blob and must not stay behind.
    Nor may they go past that blob's size while they stream: they were unbounded until
    their digest was checked at the end (any amount on disk meanwhile)."""
    t = quota_tenant(server, "quota3", "10000")
    uploads = server.home / "registry" / "uploads"
    before = {p.name for p in uploads.iterdir()}
    big = os.urandom(200_000)
    with t.client() as c:
        held = push_blob(c, "a", b"x")
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        r = c.put(at(loc, digest=held), content=big)
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID", r.text
        assert "larger than" in r.text  # refused as it outgrew the blob, not at the end
        r = c.post("/v2/a/blobs/uploads/", params={"digest": held}, content=big)
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "DIGEST_INVALID", r.text
        session = loc.split("/uploads/")[1].split("?")[0]
        assert (uploads / session).stat().st_size == 0  # nothing of it was written
        c.delete(loc)
        # a mistaken digest for bytes that do fit keeps the session, as before
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        assert c.put(at(loc, digest=held), content=b"yz").status_code == 400
        assert c.get(loc).status_code == 204
        c.delete(loc)
    assert {p.name for p in uploads.iterdir()} - before == set()


def test_bytes_cut_short_under_a_held_digest_count_until_their_session_goes(
    server: EmberServer,
) -> None:
    """Bytes that claim a blob the organization holds are free only if they become it.
    A final PUT whose client hangs up mid-body leaves them in the session, which the
    client may resume: counted against the quota until it ends (they were uncounted, and
    sessions cut short one after another put any amount past the quota).  A monolithic
    POST cut short leaves no session: its client never got the URL to resume it."""
    t = quota_tenant(server, "quota-heldcut", "200000")
    uploads = server.home / "registry" / "uploads"
    data = os.urandom(50_000)
    auth = {"Authorization": f"Bearer {t.token}", "Content-Length": str(len(data))}
    with t.client() as c:
        held = push_blob(c, "a", data)
        before = {p.name for p in uploads.iterdir()}
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        session = loc.split("/uploads/")[1].split("?")[0]
        send_partial(t.host, "PUT", at(loc, digest=held), auth, data[:30_000]).close()
        poll_until(lambda: org_row(server, "quota-heldcut")["upload_bytes"] == 30_000,
                   "the cut PUT's bytes counted")  # fmt: skip
        assert (uploads / session).stat().st_size == 30_000
        assert org_row(server, "quota-heldcut")["used_bytes"] == 80_000
        send_partial(t.host, "POST", f"/v2/a/blobs/uploads/?digest={held}", auth, data[:30_000]).close()
        poll_until(lambda: {p.name for p in uploads.iterdir()} - before == {session},
                   "the cut POST's session gone")  # fmt: skip
        # the PUT's session resumes, and its bytes become the blob again: free once more
        r = c.get(loc)
        assert r.status_code == 204 and r.headers["Range"] == "0-29999", r.headers
        r = c.put(at(r.headers["Location"], digest=held), content=data[30_000:],
                  headers={"Content-Range": f"30000-{len(data) - 1}"})  # fmt: skip
        assert r.status_code == 201, r.text
    row = org_row(server, "quota-heldcut")
    assert (row["used_bytes"], row["upload_bytes"]) == (50_000, 0)


def test_held_digest_bytes_that_do_not_become_the_blob_must_fit_the_quota(
    server: EmberServer,
) -> None:
    """Bytes that claim a blob the organization holds are free only if they become it.
    When a final PUT ends otherwise (its client hangs up mid-body, or its body is longer
    than its Content-Range: 416) and they do not fit the quota, the session is dropped,
    as a refused upload's is.  They were kept and counted past the quota: sessions ended
    that way one after another held 299,996 bytes of a 60,000-byte quota for a day."""
    t = quota_tenant(server, "quota-heldstack", "60000")
    uploads = server.home / "registry" / "uploads"
    data = os.urandom(50_000)
    auth = {"Authorization": f"Bearer {t.token}", "Content-Length": str(len(data))}
    with t.client() as c:
        held = push_blob(c, "a", data)
        locs = [c.post("/v2/a/blobs/uploads/").headers["Location"] for _ in range(4)]
        sessions = [loc.split("/uploads/")[1].split("?")[0] for loc in locs]
        for loc, session in zip(locs[:3], sessions, strict=False):
            send_partial(t.host, "PUT", at(loc, digest=held), auth, os.urandom(49_999)).close()
            poll_until(lambda s=session: not (uploads / s).exists(),
                       "the cut PUT's session dropped")  # fmt: skip
            assert c.get(loc).status_code == 404

        def longer() -> Iterator[bytes]:
            yield os.urandom(50_001)

        r = c.put(at(locs[3], digest=held), content=longer(), headers={"Content-Range": "0-49999"})
        assert r.status_code == 403, r.text
        assert r.json()["errors"][0]["code"] == "DENIED" and "storage quota" in r.text
        assert not (uploads / sessions[3]).exists()
        # a PUT that wrote nothing (out of order: 416) costs its session nothing, even
        # with the organization over its quota (lowered below the session's bytes)
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        loc = c.patch(loc, content=data[:5000]).headers["Location"]
        ember(server.home, "admin", "org", "quota", "quota-heldstack", "52000")
        r = c.put(at(loc, digest=held), content=data[9000:10_000],
                  headers={"Content-Range": "9000-9999"})  # fmt: skip
        assert r.status_code == 416 and r.headers["Range"] == "0-4999", r.text
        assert c.delete(loc).status_code == 204
        # bytes that fit still count until their session goes, and resume (the test above)
        ember(server.home, "admin", "org", "quota", "quota-heldstack", "100000")
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        send_partial(t.host, "PUT", at(loc, digest=held), auth, data[:30_000]).close()
        poll_until(lambda: org_row(server, "quota-heldstack")["upload_bytes"] == 30_000,
                   "the cut PUT's bytes counted")  # fmt: skip
    row = org_row(server, "quota-heldstack")
    assert (row["used_bytes"], row["upload_bytes"]) == (80_000, 30_000)


def test_a_put_on_a_session_another_request_streams_to_keeps_its_reservation(
    server: EmberServer,
) -> None:
    """The final PUT reserved the session's bytes before it found the session busy: it
    set what the session holds to the few bytes its file had, under a PATCH still
    streaming megabytes it had been allowed; other sessions then took the same room
    (three sessions held 24 MiB of a 10 MiB quota)."""
    t = quota_tenant(server, "quota-busyput", str(10 << 20))
    body = 8 << 20
    with t.client() as c:
        loc = c.post("/v2/a/blobs/uploads/").headers["Location"]
        path = loc.split(t.host, 1)[-1]
        auth = {"Authorization": f"Bearer {t.token}", "Content-Length": str(body)}
        streaming = send_partial(t.host, "PATCH", path, auth, b"s" * 65536)
        try:
            poll_until(lambda: org_row(server, "quota-busyput")["upload_bytes"] >= body,
                       "the PATCH's reservation")  # fmt: skip
            r = c.put(at(loc, digest=sha256(b"")))
            assert r.status_code == 400 and "another request is using" in r.text, r.text
            assert org_row(server, "quota-busyput")["upload_bytes"] >= body
            # so another session cannot take the same room
            r = c.post("/v2/b/blobs/uploads/", params={"digest": sha256(b"y" * (4 << 20))},
                       content=b"y" * (4 << 20))  # fmt: skip
            assert r.status_code == 403, r.text
        finally:
            streaming.close()


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

    t = quota_tenant(server, "quota4", "10000")
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


def test_unfinished_uploads_count_against_the_quota(server: EmberServer) -> None:
    """Each upload session was bounded by what the quota leaves but not counted, so N open
    sessions could hold N times that; now their bytes are part of what is used."""
    t = quota_tenant(server, "quota5", "10000")
    data = os.urandom(6000)
    with t.client() as c:
        r = c.patch(c.post("/v2/a/blobs/uploads/").headers["Location"], content=data[:5000])
        assert r.status_code == 202, r.text
        first = r.headers["Location"]
        row = org_row(server, "quota5")
        assert (row["used_bytes"], row["upload_bytes"]) == (5000, 5000)
        # another session may not take the same room: announced, streamed or monolithic
        loc = c.post("/v2/b/blobs/uploads/").headers["Location"]
        r = c.patch(loc, content=data)
        assert r.status_code == 403, r.text
        assert r.json()["errors"][0]["message"] == (
            "organization quota5 is over its storage quota: 5000 of 10000 bytes used "
            "(5000 of them by unfinished uploads), this upload needs 6000"
        )
        assert c.get(loc).status_code == 404  # dropped
        loc = c.post("/v2/b/blobs/uploads/").headers["Location"]
        r = c.patch(loc, content=iter([data]))  # chunked: no Content-Length
        assert r.status_code == 403 and "more than the 5000 bytes left" in r.text, r.text
        r = c.post("/v2/b/blobs/uploads/", params={"digest": sha256(data)}, content=data)
        assert r.status_code == 403, r.text
        # a session's own bytes count once: it may grow up to the quota and finish
        r = c.patch(first, content=data[5000:])
        assert r.status_code == 202, r.text
        assert c.put(at(r.headers["Location"], digest=sha256(data))).status_code == 201
        row = org_row(server, "quota5")
        assert (row["used_bytes"], row["upload_bytes"]) == (6000, 0)
        # a cancelled session gives its room back
        r = c.patch(c.post("/v2/b/blobs/uploads/").headers["Location"], content=b"y" * 4000)
        assert r.status_code == 202, r.text
        assert c.post("/v2/c/blobs/uploads/", params={"digest": sha256(b"z")}, content=b"z").status_code == 403
        assert c.delete(r.headers["Location"]).status_code == 204
        push_blob(c, "c", b"y" * 4000)
    assert org_row(server, "quota5")["used_bytes"] == 10000


def _stream_chunks(c: httpx.Client, location: str, chunks: int, meet: threading.Barrier) -> int | None:
    """PATCH ``chunks`` x 64 KiB as a chunked body, the rest of it only once every
    stream sent its first chunk; the status (None: the server answered and closed
    while the client still sent)."""

    def body() -> Iterator[bytes]:
        yield b"s" * 65536
        meet.wait(timeout=30)
        time.sleep(0.3)  # the other stream's first chunk has reached the server
        for _ in range(chunks - 1):
            yield b"s" * 65536

    try:
        return c.patch(location, content=body()).status_code
    except httpx.TransportError:
        return None


def _held(c: httpx.Client, location: str) -> int:
    """Bytes an upload session holds (0: it was dropped)."""
    r = c.get(location)
    if r.status_code == 404:
        return 0
    assert r.status_code == 204, r.text
    return int(r.headers["Range"].split("-")[1]) + 1


def test_uploads_streaming_at_once_share_the_quota(server: EmberServer) -> None:
    """Two bodies streaming at once were each bounded by what the quota left when they
    started, so together they stored twice that; now each reserves room as it grows."""
    server.create_org("quota6")
    t = Tenant(server, "quota6", server.create_token("quota6", "pull,push", "q"))

    def two_streams() -> tuple[list[int | None], int]:
        meet = threading.Barrier(2)
        with t.client() as a, t.client() as b, ThreadPoolExecutor(2) as pool:
            locs = [c.post("/v2/s/blobs/uploads/").headers["Location"] for c in (a, b)]
            jobs = [pool.submit(_stream_chunks, c, loc, 32, meet) for c, loc in zip((a, b), locs, strict=True)]
            statuses = [j.result() for j in jobs]  # 2 MiB each
            held = sum(_held(a, loc) for loc in locs)
            for loc in locs:
                a.delete(loc)
        return statuses, held

    ember(server.home, "admin", "org", "quota", "quota6", "3M")
    statuses, held = two_streams()
    assert statuses.count(202) < 2 and held <= 3 << 20, (statuses, held)
    # room enough for both: neither is refused for what the other reserved ahead
    ember(server.home, "admin", "org", "quota", "quota6", "5M")
    statuses, held = two_streams()
    assert statuses == [202, 202] and held == 4 << 20, (statuses, held)
    assert org_row(server, "quota6")["upload_bytes"] == 0


def test_two_uploads_finishing_at_once_cannot_both_take_the_last_room(
    fresh_server: Callable[[], EmberServer],
) -> None:
    """The final check was a read: two uploads finishing at once both passed it when only
    one fitted.  Now it is a reservation in the database, one at a time per org."""
    srv = fresh_server()
    t = Tenant(srv, "acme", srv.create_token("acme"))
    blobs = [os.urandom(6000), os.urandom(6000)]
    with t.client() as c:  # written while the organization had no quota: nothing reserved
        locs = [c.patch(c.post("/v2/a/blobs/uploads/").headers["Location"], content=b).headers["Location"]
                for b in blobs]  # fmt: skip
    ember(srv.home, "admin", "org", "quota", "acme", "10000")

    def finish(location: str, blob: bytes) -> int:
        with t.client() as c:
            return c.put(at(location, digest=sha256(blob))).status_code

    # Every database writer waits while this holds the write lock: both PUTs get as far
    # as they can without writing (a check that is only a read passes for both).
    db = sqlite3.connect(srv.home / "ember.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(finish, loc, blob) for loc, blob in zip(locs, blobs, strict=True)]
            # both wait for the lock at once: two of the server's threads in SQLite's busy
            # handler (it sleeps between its tries)
            assert srv.process is not None
            server = srv.process.pid
            poll_until(
                lambda: sum("nanosleep" in w for w in thread_wchans(session_pids(server))) >= 2
                or any(j.done() for j in jobs),
                "the two PUTs never waited for the database together",
            )
            assert not any(j.done() for j in jobs), [j.result() for j in jobs if j.done()]
            db.execute("ROLLBACK")
            statuses = sorted(j.result() for j in jobs)
    finally:
        db.close()
    assert statuses == [201, 403]
    assert org_row(srv, "acme")["used_bytes"] == 6000


def test_manifests_count_against_the_quota(server: EmberServer) -> None:
    """Manifests were not counted: a tenant could push any number of distinct ones."""
    server.create_org("quota7")
    t = Tenant(server, "quota7", server.create_token("quota7", "pull,push", "q"))
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = os.urandom(1000)
    headers = {"Content-Type": OCI_MANIFEST}
    with t.client() as c:
        _, manifest = push_image(c, "a", "v1", [layer], config)
        used = len(config) + len(layer) + len(manifest)
        assert org_row(server, "quota7")["used_bytes"] == used
        ember(server.home, "admin", "org", "quota", "quota7", str(used + 100))
        bigger = image_manifest(config, [layer], annotations={"pad": "x" * 500})
        r = c.put("/v2/a/manifests/v2", content=bigger, headers=headers)
        assert r.status_code == 403, r.text
        assert r.json()["errors"][0] == {
            "code": "DENIED",
            "message": f"organization quota7 is over its storage quota: {used} of {used + 100} "
            f"bytes used, this manifest needs {len(bigger)}",
        }
        assert c.get("/v2/a/manifests/v2").status_code == 404
        assert c.get(f"/v2/a/manifests/{sha256(bigger)}").status_code == 404
        blobs = server.home / "registry" / "content" / "blobs" / "sha256"
        assert not (blobs / sha256(bigger).split(":")[1]).exists()  # nothing written
        # a manifest the organization holds costs nothing: another tag, another repository
        assert c.put("/v2/a/manifests/v3", content=manifest, headers=headers).status_code == 201
        for blob in (config, layer):
            push_blob(c, "b", blob)
        assert c.put("/v2/b/manifests/v1", content=manifest, headers=headers).status_code == 201
        assert org_row(server, "quota7")["used_bytes"] == used
        ember(server.home, "admin", "org", "quota", "quota7", "none")
        assert c.put("/v2/a/manifests/v2", content=bigger, headers=headers).status_code == 201
    assert org_row(server, "quota7")["used_bytes"] == used + len(bigger)


def _state_expiry(location: str) -> int:
    """The expiry an upload URL's signed state carries."""
    token = parse_qs(urlsplit(location).query)["_state"][0]
    payload = token.split(".")[0]
    return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[4])


def test_an_upload_counts_until_it_expires(server: EmberServer) -> None:
    """An abandoned session stops counting when it expires, 24 h after it started; its
    URLs expire with it however often it is used (each answer gave a URL good for 24 h
    more, so a session could outlive its place in the quota)."""
    t = quota_tenant(server, "quota8", "10000")
    with t.client() as c:
        r = c.post("/v2/a/blobs/uploads/")
        session, started = r.headers["Docker-Upload-UUID"], r.headers["Location"]
        time.sleep(1.1)
        r = c.patch(started, content=b"a" * 6000)
        assert r.status_code == 202, r.text
        assert _state_expiry(r.headers["Location"]) == _state_expiry(started)
        assert _state_expiry(c.get(r.headers["Location"]).headers["Location"]) == _state_expiry(started)
        assert c.post("/v2/a/blobs/uploads/", params={"digest": sha256(b"b" * 6000)},
                      content=b"b" * 6000).status_code == 403  # fmt: skip
        with contextlib.closing(sqlite3.connect(server.home / "ember.db")) as db, db:
            db.execute("UPDATE reg_uploads SET expires_at = ? WHERE id = ?", (time.time() - 1, session))
        assert org_row(server, "quota8")["upload_bytes"] == 0
        push_blob(c, "a", b"b" * 6000)


def test_a_database_from_before_upload_quotas_gets_the_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    meta = RegistryMetadata(url)
    meta.create_org("old")
    meta.create_upload("old", "old/a", "s1", time.time() + 3600)
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db, db:  # as 0002 left it
        db.execute("DROP INDEX reg_repos_org")
        db.execute("DROP INDEX reg_uploads_repo")
        db.execute("ALTER TABLE reg_uploads DROP COLUMN held_bytes")
        db.execute("DELETE FROM ember_migrations WHERE id = '0003-quota-uploads'")
    # a new process (this one has migrated its cached database already)
    ember(tmp_path, "admin", "org", "quota", "--db", url, "old", "1M")
    rows = json.loads(ember(tmp_path, "admin", "org", "ls", "--db", url, "--json").stdout)
    assert [(r["name"], r["used_bytes"], r["upload_bytes"]) for r in rows] == [("old", 0, 0)]
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db:
        assert db.execute("SELECT id, held_bytes FROM reg_uploads").fetchall() == [("s1", 0)]
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"reg_repos_org", "reg_uploads_repo"} <= indexes
