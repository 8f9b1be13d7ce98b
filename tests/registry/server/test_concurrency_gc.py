"""Many pushers sharing layers at once; garbage collection; the admin CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.registry.server.support import (
    OCI_MANIFEST,
    EmberServer,
    Tenant,
    at,
    ember,
    image_manifest,
    push_blob,
    push_image,
    sha256,
)
from tests.support.images import layout_ref

pytestmark = pytest.mark.integration


def test_many_pushers_sharing_layers(fresh_server: Callable[[], EmberServer], multilayer_layout: Path) -> None:
    srv = fresh_server()
    t = Tenant(srv, "acme", srv.create_token("acme"))
    shared = [os.urandom(300_000 + i) for i in range(3)]

    def http_pusher(i: int) -> str:
        with t.client() as c:
            # half push into one shared repository, half into their own
            repo = "shared" if i % 2 else f"own/{i}"
            layers = [*shared, os.urandom(1000 + i)]
            digest, _ = push_image(c, repo, f"t{i}", layers)
            return f"{repo}:t{i}@{digest}"

    def skopeo_pusher(i: int) -> str:
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", t.creds,
             "--preserve-digests", layout_ref(multilayer_layout), f"docker://{srv.host}/sk/{i % 2}:v{i}"],
            check=True, capture_output=True,
        )
        return f"sk/{i % 2}:v{i}"

    with ThreadPoolExecutor(max_workers=12) as pool:
        jobs = [pool.submit(http_pusher, i) for i in range(16)] + [pool.submit(skopeo_pusher, i) for i in range(6)]
        results = [j.result() for j in jobs]  # any error surfaces here
    assert len(results) == 22
    with t.client() as c:
        for res in results[:16]:
            ref, digest = res.split("@")
            repo, tag = ref.split(":")
            m = c.get(f"/v2/{repo}/manifests/{tag}")
            assert m.headers["docker-content-digest"] == digest
            for desc in json.loads(m.content)["layers"]:
                assert sha256(c.get(f"/v2/{repo}/blobs/{desc['digest']}").content) == desc["digest"]
    # one file per digest, each intact; nothing left in flight
    blobs = srv.home / "registry" / "content" / "blobs" / "sha256"
    for f in blobs.iterdir():
        assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
    for layer in shared:
        assert (blobs / hashlib.sha256(layer).hexdigest()).is_file()
    assert list((srv.home / "registry" / "uploads").iterdir()) == []


def test_gc_frees_unreferenced_and_keeps_in_flight(fresh_server: Callable[[], EmberServer]) -> None:
    srv = fresh_server()
    t = Tenant(srv, "acme", srv.create_token("acme", "pull,push,delete"))
    store = srv.home / "registry" / "content" / "blobs" / "sha256"
    with t.client() as c:
        kept_layer = os.urandom(2000)
        kept, _ = push_image(c, "app", "v1", [kept_layer])
        old_layer = os.urandom(3000)
        old, _ = push_image(c, "app", "v0", [old_layer])
        c.delete("/v2/app/manifests/v0")  # untag: the manifest and its layer become garbage
        orphan = push_blob(c, "app", os.urandom(1500))  # uploaded, never referenced
        # a referrer of the kept image stays with it
        empty = push_blob(c, "app", b"{}")
        ref_body = image_manifest(b"{}", [], subject={"mediaType": OCI_MANIFEST, "digest": kept, "size": 1})
        ref_doc = json.loads(ref_body)
        ref_doc["config"] = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}
        ref_body = json.dumps(ref_doc).encode()
        assert c.put(f"/v2/app/manifests/{sha256(ref_body)}", content=ref_body,
                     headers={"Content-Type": OCI_MANIFEST}).status_code == 201
        cancelled = c.post("/v2/abandoned/blobs/uploads/").headers["location"]
        assert c.delete(cancelled).status_code == 204
        in_flight = c.post("/v2/app/blobs/uploads/").headers["location"]
        in_flight = c.patch(in_flight, content=b"partial").headers["location"]
    # within the grace period nothing is freed
    out = ember(srv.home, "admin", "registry", "gc", "--json").stdout
    assert json.loads(out) == {"manifests": 0, "links": 0, "blobs": 0, "bytes": 0, "uploads": 0, "repositories": 0,
                               "dead_uploads": 0, "settled_uploads": 0, "ingests": 0}  # fmt: skip
    dry = json.loads(ember(srv.home, "admin", "registry", "gc", "--grace", "0", "--dry-run",
                           "--delete-untagged", "--json").stdout)  # fmt: skip
    assert dry["manifests"] == 1 and dry["links"] == 2
    assert (store / old_layer_hex(old_layer)).exists()
    # untagged manifests are kept unless asked (Distribution's default: deployments pull
    # them by digest)
    kept = json.loads(ember(srv.home, "admin", "registry", "gc", "--grace", "0", "--dry-run",
                            "--json").stdout)  # fmt: skip
    assert kept["manifests"] == 0 and kept["links"] == 1  # only the never-referenced orphan
    report = json.loads(ember(srv.home, "admin", "registry", "gc", "--grace", "0",
                              "--delete-untagged", "--json").stdout)  # fmt: skip
    assert report["manifests"] == 1  # the untagged v0 manifest
    assert report["links"] == 2  # its layer, the orphan
    assert report["blobs"] >= 3  # their files and the v0 manifest's bytes
    assert report["uploads"] == 0  # the session in flight is not expired
    assert report["repositories"] == 1  # "abandoned": its only upload was cancelled
    # nothing was killed: the session in flight has its file and holds no more than it
    assert (report["dead_uploads"], report["settled_uploads"], report["ingests"]) == (0, 0, 0)
    assert dry == report  # a dry run foresees every phase, also what the earlier ones free
    assert not (store / old_layer_hex(old_layer)).exists()
    with t.client() as c:
        assert c.get(f"/v2/app/manifests/{old}").status_code == 404
        assert c.get("/v2/_catalog").json()["repositories"] == ["app"]
        assert c.head(f"/v2/app/blobs/{orphan}").status_code == 404
        # everything reachable still reads back
        m = c.get("/v2/app/manifests/v1")
        assert m.status_code == 200
        for desc in [json.loads(m.content)["config"], *json.loads(m.content)["layers"]]:
            assert sha256(c.get(f"/v2/app/blobs/{desc['digest']}").content) == desc["digest"]
        assert c.get(f"/v2/app/manifests/{sha256(ref_body)}").status_code == 200
        # the upload in flight completes after GC
        r = c.put(at(in_flight, digest=sha256(b"partial")))
        assert r.status_code == 201, r.text


def test_pushing_again_restarts_the_grace_period(fresh_server: Callable[[], EmberServer]) -> None:
    """A blob or manifest pushed again is as young as its latest push: GC frees
    unreferenced links and untagged manifests by their age, and a client that pushes an
    image's blobs again (its old tag long moved) must not lose them before the manifest
    that references them comes."""
    srv = fresh_server()
    t = Tenant(srv, "acme", srv.create_token("acme", "pull,push,delete"))
    config, layer = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}', os.urandom(1000)
    child = image_manifest(config, [layer])
    with t.client() as c:
        for data in (config, layer):
            push_blob(c, "web", data)
        assert c.put(f"/v2/web/manifests/{sha256(child)}", content=child,
                     headers={"Content-Type": OCI_MANIFEST}).status_code == 201  # fmt: skip
        with contextlib.closing(sqlite3.connect(srv.home / "ember.db", isolation_level=None)) as db:
            for table in ("reg_blob_links", "reg_manifests"):  # an earlier push, two hours ago
                db.execute(f"UPDATE {table} SET created_at = created_at - 7200")
        for data in (config, layer):
            push_blob(c, "web", data)
        assert c.put(f"/v2/web/manifests/{sha256(child)}", content=child,
                     headers={"Content-Type": OCI_MANIFEST}).status_code == 201  # fmt: skip
    report = json.loads(ember(srv.home, "admin", "registry", "gc", "--delete-untagged", "--json").stdout)
    assert (report["manifests"], report["links"]) == (0, 0), report
    # an hour after the latest push they go (the manifest untagged, its blobs then unused)
    report = json.loads(
        ember(srv.home, "admin", "registry", "gc", "--grace", "0", "--delete-untagged", "--json").stdout
    )
    assert (report["manifests"], report["links"]) == (1, 2), report


def test_writes_waiting_on_another_writer_leave_the_server_answering(
    fresh_server: Callable[[], EmberServer],
) -> None:
    """Pushes whose writes wait for another process's write lock (a gc, another replica)
    each held one of the pool's connections in its thread; twenty of them took them all,
    and the next read on the event loop waited for one: a HEAD of a stored blob and
    `GET /v2/` took 30 s, every request of the server with them."""
    srv = fresh_server()
    t = Tenant(srv, "acme", srv.create_token("acme", "pull,push,delete"))
    with t.client() as c:
        blob = push_blob(c, "web", b"stored")

    def start_upload() -> int:
        with t.client() as c:
            return c.post("/v2/web/blobs/uploads/", timeout=60).status_code

    holder = sqlite3.connect(srv.home / "ember.db", isolation_level=None)
    pool = ThreadPoolExecutor(20)
    try:
        holder.execute("BEGIN IMMEDIATE")
        uploads = [pool.submit(start_upload) for _ in range(20)]
        time.sleep(2)  # (their writes reach the lock; nothing is timed)
        with t.client() as c:
            # SQLite makes the writes wait up to 30 s: these answer well before
            assert c.head(f"/v2/web/blobs/{blob}", timeout=15).status_code == 200
            assert c.get("/v2/", timeout=15).status_code == 200
        assert not any(u.done() for u in uploads)  # the lock held them all along
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        pool.shutdown()
    assert [u.result() for u in uploads] == [202] * 20


def old_layer_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_admin_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert ember(home, "admin", "org", "create", "Bad_Name", check=False).returncode != 0
    ember(home, "admin", "org", "create", "acme")
    dup = ember(home, "admin", "org", "create", "acme", check=False)
    assert dup.returncode != 0 and "already exists" in dup.stderr and dup.stderr.count("\n") == 1
    out = ember(home, "admin", "token", "create", "--org", "acme", "--name", "ci")
    secret = out.stdout.strip().splitlines()[-1]
    assert secret.startswith("ember_")
    missing = ember(home, "admin", "token", "create", "--org", "nope", check=False)
    assert missing.returncode != 0 and "no organization" in missing.stderr
    assert ember(home, "admin", "token", "create", "--org", "acme", "--access", "pull,root", check=False).returncode != 0
    tokens = json.loads(ember(home, "admin", "token", "ls", "--json").stdout)
    assert [(tk["org"], tk["name"], tk["access"]) for tk in tokens] == [("acme", "ci", ["pull", "push"])]
    # only the hash is stored
    db = (home / "ember.db").read_bytes()
    assert secret.encode() not in db
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in db
    orgs = json.loads(ember(home, "admin", "org", "ls", "--json").stdout)
    assert [(o["name"], o["tokens"]) for o in orgs] == [("acme", 1)]
    assert "acme" in ember(home, "admin", "org", "ls").stdout
    ember(home, "admin", "token", "revoke", tokens[0]["id"])
    assert json.loads(ember(home, "admin", "token", "ls", "--json").stdout)[0]["revoked_at"] is not None
    # an unreachable database: one line, and the password is not shown
    bad = ember(home, "admin", "org", "ls", "--db", "postgresql://u:hunter2@127.0.0.1:1/x", check=False)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1
    assert "hunter2" not in bad.stderr and "not usable" in bad.stderr
    # and one that is no URL at all (a traceback before)
    junk = ember(home, "admin", "org", "ls", "--db", "garbage", check=False)
    assert junk.returncode == 1 and junk.stderr.count("\n") == 1
    assert "not a database URL" in junk.stderr and "Traceback" not in junk.stderr
    # an in-memory SQLite database, a missing directory, an unsupported scheme: said so
    for url, said in (("sqlite:///", "in-memory SQLite database"),
                      (f"sqlite:///{home}/nowhere/x.db", "does not exist"),
                      ("mysql://x/y", "ember supports SQLite")):  # fmt: skip
        res = ember(home, "admin", "org", "ls", "--db", url, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1 and said in res.stderr, res.stderr
    # the signing secret is generated on first server start, 0600
    srv = EmberServer(home).start()
    try:
        assert (home / "config.json").stat().st_mode & 0o777 == 0o600
        assert len(json.loads((home / "config.json").read_text())["registry_secret"]) >= 32
    finally:
        srv.stop()


def test_replicas_share_tokens_and_upload_urls(fresh_server: Callable[[], EmberServer]) -> None:
    """Two servers over one state directory (same secret, database, store): an upload
    started on one continues on the other, and registry tokens work on both."""
    a = fresh_server()
    b = EmberServer(a.home).start()
    try:
        token = a.create_token("acme")
        data = os.urandom(200_000)
        ta, tb = Tenant(a, "acme", token), Tenant(b, "acme", token)
        with ta.client() as ca, tb.client() as cb:
            loc = ca.post("/v2/rep/blobs/uploads/").headers["location"]
            loc = cb.patch(loc, content=data[:100_000], headers={"Content-Range": "0-99999"}).headers["location"]
            loc = ca.patch(loc, content=data[100_000:], headers={"Content-Range": f"100000-{len(data) - 1}"}).headers["location"]
            assert cb.put(at(loc, digest=sha256(data))).status_code == 201
            assert ca.get(f"/v2/rep/blobs/{sha256(data)}").content == data
        jwt = ta.registry_token("repository:rep:pull")
        from tests.registry.server.support import http

        assert http.head(f"{b.url}/v2/rep/blobs/{sha256(data)}", headers={"Authorization": f"Bearer {jwt}"}).status_code == 200
    finally:
        b.stop()


def test_server_that_cannot_listen_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = ember(tmp_path / "home", "server", "--listen", f"127.0.0.1:{port}", check=False)
    assert busy.returncode == 2
    assert busy.stderr == f"ember: cannot listen on 127.0.0.1:{port}: Address already in use\n"
