"""``--db postgresql://...``: the same registry on a private PostgreSQL server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.registry.server.support import EMBER, EmberServer, Tenant, at, push_image, sha256
from tests.support.images import layout_ref
from tests.support.registry import free_port

pytestmark = pytest.mark.integration


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    if initdb is None or postgres is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    # not under pytest's tmp dir: that is 0700 root, and postgres runs as its own user
    root = Path(tempfile.mkdtemp(prefix="ember-pg-"))
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [*as_pg, postgres, "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres").close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def test_registry_on_postgres(postgres_url: str, tmp_path: Path, busybox_layout: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "EMBER_REGISTRY_DB": postgres_url}

    def admin(*args: str) -> str:
        return subprocess.run([EMBER, "--home", str(home), "admin", *args], env=env,
                              check=True, capture_output=True, text=True).stdout

    admin("org", "create", "acme")
    admin("org", "create", "beta")
    acme_token = admin("token", "create", "--org", "acme").strip().splitlines()[-1]
    beta_token = admin("token", "create", "--org", "beta").strip().splitlines()[-1]
    srv = EmberServer(home)
    os.environ["EMBER_REGISTRY_DB"] = postgres_url  # the server subprocess inherits it
    try:
        srv.start()
    finally:
        del os.environ["EMBER_REGISTRY_DB"]
    try:
        acme, beta = Tenant(srv, "acme", acme_token), Tenant(srv, "beta", beta_token)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", acme.creds,
                        "--preserve-digests", layout_ref(busybox_layout), f"docker://{srv.host}/web:1"],
                       check=True, capture_output=True)
        with acme.client() as c:
            digest, _ = push_image(c, "web", "2", [os.urandom(100)])
            assert c.get("/v2/web/tags/list").json()["tags"] == ["1", "2"]
            # PostgreSQL refuses a NUL in text: a client's one is no 500
            r = c.get("/v2/web/tags/list", params={"last": "1\x00x"})
            assert r.status_code == 200 and r.json()["tags"] == ["2"], r.text
            r = c.get(f"/v2/web/referrers/{digest}", params={"artifactType": "a/b\x00"})
            assert r.status_code == 200 and r.json()["manifests"] == [], r.text
        with beta.client() as c:
            assert c.get(f"/v2/web/manifests/{digest}").status_code == 404
            assert c.get("/v2/_catalog").json()["repositories"] == []
        assert not (home / "ember.db").exists() or b"reg_orgs" not in (home / "ember.db").read_bytes()
        orgs = json.loads(admin("org", "ls", "--json"))
        assert [(o["name"], o["repositories"]) for o in orgs] == [("acme", 1), ("beta", 0)]
        report = json.loads(admin("registry", "gc", "--grace", "0", "--json"))
        assert report["manifests"] == 0 and report["blobs"] == 0
        # quota reservations on PostgreSQL: the org's row lock, sums in one statement
        used = json.loads(admin("org", "ls", "--json"))[0]["used_bytes"]
        admin("org", "quota", "acme", str(used + 5000))
        with acme.client() as c:
            r = c.patch(c.post("/v2/web/blobs/uploads/").headers["Location"], content=b"a" * 3000)
            assert r.status_code == 202, r.text
            other = c.post("/v2/web/blobs/uploads/").headers["Location"]
            assert c.patch(other, content=iter([b"b" * 3000])).status_code == 403
            assert c.put(at(r.headers["Location"], digest=sha256(b"a" * 3000))).status_code == 201
            _, manifest = push_image(c, "web", "3", [])
        orgs = json.loads(admin("org", "ls", "--json"))
        assert (orgs[0]["used_bytes"], orgs[0]["upload_bytes"]) == (used + 3000 + len(manifest), 0)
    finally:
        srv.stop()


def test_limits_and_purge_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    """The per-organization caps take the organization's row lock there (sessions opened
    at once cannot pass them together), and the server's purge runs on it."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as pg:
        pg.execute("CREATE DATABASE limits")
    url = postgres_url.rsplit("/", 1)[0] + "/limits"
    home = tmp_path / "home"
    env = {**os.environ, "EMBER_REGISTRY_DB": url}
    subprocess.run([EMBER, "--home", str(home), "admin", "org", "create", "acme"], env=env, check=True)
    token = subprocess.run([EMBER, "--home", str(home), "admin", "token", "create", "--org", "acme"],
                           env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    srv = EmberServer(home, options=["--db", url, "--max-uploads", "3", "--max-repositories", "2",
                                     "--upload-purge-interval", "0.2"])  # fmt: skip
    srv.start()
    try:
        t = Tenant(srv, "acme", token)

        def post(i: int) -> int:
            with t.client() as c:
                return c.post(f"/v2/r{i % 2}/blobs/uploads/").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(pool.map(post, range(16)))
        assert statuses == [202] * 3 + [429] * 13
        with t.client() as c:
            assert c.post("/v2/r3/blobs/uploads/").status_code == 429
            with psycopg.connect(url, autocommit=True) as pg:
                pg.execute("UPDATE reg_uploads SET expires_at = 0")
                deadline = time.monotonic() + 15
                while pg.execute("SELECT count(*) FROM reg_uploads").fetchone() != (0,):
                    assert time.monotonic() < deadline, srv.log_tail()
                    time.sleep(0.05)
            for repo in ("r0", "r1"):
                assert c.post(f"/v2/{repo}/blobs/uploads/").status_code == 202
            r = c.post("/v2/r3/blobs/uploads/")  # a third repository
            assert r.status_code == 403 and "2 repositories" in r.text, r.text
        assert "purged 3 expired upload sessions" in srv.log_path.read_text()
    finally:
        srv.stop()
