"""kill -9 of the server mid-upload, mid-manifest-PUT and at random moments of a
push: it starts again, serves everything committed, and clients can retry."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.registry.server.support import (
    OCI_MANIFEST,
    EmberServer,
    Tenant,
    at,
    push_blob,
    send_partial,
    sha256,
)
from tests.support.images import layout_ref

pytestmark = pytest.mark.integration


def _tenant(srv: EmberServer) -> Tenant:
    return Tenant(srv, "acme", srv.create_token("acme", "pull,push,delete"))


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill_mid_chunked_upload(fresh_server: Callable[[], EmberServer]) -> None:
    srv = fresh_server()
    t = _tenant(srv)
    data = os.urandom(12 * 1024 * 1024)
    first = 2 * 1024 * 1024
    with t.client() as c:
        loc = c.post("/v2/big/blobs/uploads/").headers["location"]
        session = loc.split("/uploads/")[1].split("?")[0]
        r = c.patch(loc, content=data[:first], headers={"Content-Range": f"0-{first - 1}"})
        assert r.status_code == 202
        loc = r.headers["location"]
    upload_file = srv.home / "registry" / "uploads" / session
    # the second chunk is 10 MiB; send 6 MiB of it and kill while the server waits for the rest
    sock = send_partial(srv.host, "PATCH", loc, {
        "Authorization": f"Bearer {t.token}", "Content-Range": f"{first}-{len(data) - 1}",
        "Content-Length": str(len(data) - first), "Content-Type": "application/octet-stream",
    }, data[first : first + 6 * 1024 * 1024])
    _wait_for(lambda: upload_file.stat().st_size > first, "part of the second chunk on disk")
    srv.kill()
    sock.close()
    srv.restart_on_same_port()
    with t.client() as c:
        # the client asks where the upload stands and resumes from there
        r = c.get(loc)
        assert r.status_code == 204
        have = int(r.headers["range"].split("-")[1]) + 1
        assert first < have <= first + 6 * 1024 * 1024
        assert upload_file.read_bytes() == data[:have]  # nothing torn, nothing invented
        r = c.patch(r.headers["location"], content=data[have:], headers={"Content-Range": f"{have}-{len(data) - 1}"})
        assert r.status_code == 202, r.text
        r = c.put(at(r.headers["location"], digest=sha256(data)))
        assert r.status_code == 201, r.text
        got = c.get(f"/v2/big/blobs/{sha256(data)}").content
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_kill_mid_manifest_put(fresh_server: Callable[[], EmberServer]) -> None:
    srv = fresh_server()
    t = _tenant(srv)
    config, layer = b'{"architecture":"amd64","os":"linux"}', os.urandom(5000)
    with t.client() as c:
        push_blob(c, "app", config)
        push_blob(c, "app", layer)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(layer), "size": len(layer)}],
        "annotations": {"pad": "x" * 20000},
    }).encode()
    sock = send_partial(srv.host, "PUT", "/v2/app/manifests/v1", {
        "Authorization": f"Bearer {t.token}", "Content-Type": OCI_MANIFEST, "Content-Length": str(len(manifest)),
    }, manifest[: len(manifest) // 2])
    time.sleep(0.2)  # let the server read what was sent; the outcome must not depend on it
    srv.kill()
    sock.close()
    srv.restart_on_same_port()
    with t.client() as c:
        assert c.get("/v2/app/manifests/v1").status_code == 404
        assert c.get("/v2/app/tags/list").json()["tags"] == []
        r = c.put("/v2/app/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 201
        assert c.get("/v2/app/manifests/v1").content == manifest


def _consistent(t: Tenant) -> int:
    """Every tag resolves and every blob it names reads back with its digest; the number of tags."""
    n = 0
    with t.client() as c:
        for repo in c.get("/v2/_catalog").json()["repositories"]:
            r = c.get(f"/v2/{repo}/tags/list")
            for tag in r.json()["tags"]:
                m = c.get(f"/v2/{repo}/manifests/{tag}")
                assert m.status_code == 200
                assert sha256(m.content) == m.headers["docker-content-digest"]
                doc = json.loads(m.content)
                for desc in [doc["config"], *doc["layers"]]:
                    blob = c.get(f"/v2/{repo}/blobs/{desc['digest']}")
                    assert blob.status_code == 200 and sha256(blob.content) == desc["digest"]
                n += 1
    return n


def test_kill_at_random_moments_of_a_push(fresh_server: Callable[[], EmberServer], multilayer_layout: Path) -> None:
    srv = fresh_server()
    t = _tenant(srv)
    rng = random.Random(1234)
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", t.creds,
           "--preserve-digests", layout_ref(multilayer_layout)]
    for round_ in range(4):
        proc = subprocess.Popen([*cmd, f"docker://{srv.host}/crash/r{round_}:v1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.6))
        srv.kill()
        proc.wait()
        srv.restart_on_same_port()
        _consistent(t)
        # the client retries and succeeds
        subprocess.run([*cmd, f"docker://{srv.host}/crash/r{round_}:v1"], check=True, capture_output=True)
    assert _consistent(t) == 4


def _quota_server(
    fresh_server: Callable[[], EmberServer], quota: int
) -> tuple[EmberServer, Tenant, Callable[[], int]]:
    """A private server whose organization "acme" has ``quota`` bytes; with a function
    that says how many of them its unfinished uploads hold."""
    from tests.registry.server.support import ember

    srv = fresh_server()
    t = _tenant(srv)
    ember(srv.home, "admin", "org", "quota", "acme", str(quota))

    def held() -> int:
        rows = json.loads(ember(srv.home, "admin", "org", "ls", "--json").stdout)
        return int(next(r for r in rows if r["name"] == "acme")["upload_bytes"])

    return srv, t, held


def test_a_quick_restart_gives_back_what_killed_requests_held(
    fresh_server: Callable[[], EmberServer],
) -> None:
    """A PATCH's reservation under the quota outlives the server killed under it; the
    purge at start gives it back.  It did not after a quick restart (the killed server
    had purged at its own start, less than half an interval before): the organization
    stayed "full" of it for up to an hour, a retried push refused."""

    srv, t, held = _quota_server(fresh_server, 10 << 20)

    with t.client() as c:
        loc = c.post("/v2/a/blobs/uploads/").headers["location"]
    session = loc.split("/uploads/")[1].split("?")[0]
    upload_file = srv.home / "registry" / "uploads" / session
    sock = send_partial(srv.host, "PATCH", loc, {
        "Authorization": f"Bearer {t.token}", "Content-Length": str(8 << 20),
    }, b"s" * (2 << 20))  # fmt: skip
    # (the server writes the body a MiB at a time)
    _wait_for(lambda: held() >= 8 << 20 and upload_file.stat().st_size >= 1 << 20, "the PATCH under way")
    srv.kill()
    sock.close()
    written = upload_file.stat().st_size
    srv.restart_on_same_port()
    _wait_for(lambda: held() == written, "the reservation given back", timeout=15)
    with t.client() as c:
        push_blob(c, "b", os.urandom((10 << 20) - written))  # the room the session leaves


def test_a_monolithic_upload_killed_mid_body_is_dropped_by_the_repairs(
    fresh_server: Callable[[], EmberServer],
) -> None:
    """`POST ?digest=` with its body cut by a kill -9 of the server: its session (whose
    URL no client ever got) stayed, file and reservation, counted against the quota
    for a day; the repairs drop it once it is older than their grace period."""
    import contextlib
    import sqlite3


    srv, t, held = _quota_server(fresh_server, 20 << 20)

    uploads = srv.home / "registry" / "uploads"
    sock = send_partial(srv.host, "POST", f"/v2/a/blobs/uploads/?digest={sha256(b'whole')}", {
        "Authorization": f"Bearer {t.token}", "Content-Length": str(8 << 20),
    }, b"s" * (2 << 20))  # fmt: skip
    _wait_for(lambda: held() >= 8 << 20 and any(p.stat().st_size for p in uploads.iterdir()),
              "the POST under way")  # fmt: skip
    srv.kill()
    sock.close()
    with contextlib.closing(sqlite3.connect(srv.home / "ember.db", isolation_level=None)) as db:
        db.execute("UPDATE reg_uploads SET created_at = created_at - 7200")  # two hours ago
    for cut in uploads.iterdir():  # its last byte came then too
        os.utime(cut, (time.time() - 7200, time.time() - 7200))
    srv.restart_on_same_port()  # its purge at start repairs what the kill left
    _wait_for(lambda: held() == 0 and not any(uploads.iterdir()), "the session dropped", timeout=15)
    with t.client() as c:
        push_blob(c, "b", os.urandom(19 << 20))  # the whole quota is free again


def test_kill_mid_gc(fresh_server: Callable[[], EmberServer]) -> None:
    """GC killed at random moments leaves a registry whose tagged images all read back;
    the next GC finishes the job."""
    from tests.registry.server.support import EMBER, push_image

    srv = fresh_server()
    t = _tenant(srv)
    shared = os.urandom(50_000)
    with t.client() as c:
        for i in range(30):
            push_image(c, f"gc/{i % 3}", f"v{i}", [shared, os.urandom(20_000 + i)])
        for i in range(0, 30, 2):  # untag half: their manifests and unique layers become garbage
            assert c.delete(f"/v2/gc/{i % 3}/manifests/v{i}").status_code == 202
    rng = random.Random(99)
    gc = [EMBER, "--home", str(srv.home), "admin", "registry", "gc", "--grace", "0", "--delete-untagged", "--json"]
    for _ in range(3):
        proc = subprocess.Popen(gc, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.2))
        proc.kill()
        proc.wait()
        assert _consistent(t) == 15
    report = json.loads(subprocess.run(gc, check=True, capture_output=True, text=True).stdout)
    again = json.loads(subprocess.run(gc, check=True, capture_output=True, text=True).stdout)
    assert again == {"manifests": 0, "links": 0, "blobs": 0, "bytes": 0, "uploads": 0, "repositories": 0,
                     "dead_uploads": 0, "settled_uploads": 0, "ingests": 0}, (report, again)  # fmt: skip
    assert _consistent(t) == 15
    store = srv.home / "registry" / "content" / "blobs" / "sha256"
    # 15 images left: 15 manifests, 15 unique layers, the shared layer, the common config
    assert len(list(store.iterdir())) == 15 + 15 + 1 + 1


def test_workers_end_with_their_killed_server(tmp_path: Path) -> None:
    """`ember server --workers 3` SIGKILLed (the OOM killer): its workers went on serving,
    unsupervised, and the restart could not listen on the port."""
    srv = EmberServer(tmp_path / "home", workers=3)
    srv.create_org("acme")
    srv.start()
    try:
        assert srv.process is not None
        master = srv.process.pid
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(master)], capture_output=True,
                                                  text=True).stdout.split()]  # fmt: skip
        assert workers
        srv.process.kill()
        srv.process.wait(10)
        _wait_for(lambda: not any(os.path.exists(f"/proc/{w}") for w in workers), "the workers to end")
        srv.restart_on_same_port()  # the port is free again
    finally:
        srv.stop()
