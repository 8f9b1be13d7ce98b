"""A real ``ember server`` subprocess on a free loopback port, and its admin CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.cli import EMBER, run_ember
from tests.support.registry import free_port
from tests.support.spawn import spawn_server

#: plain HTTP on loopback: no proxies or CA bundles from the environment
CLIENT_OPTIONS: dict[str, object] = {"trust_env": False, "verify": False, "timeout": 60}
http = httpx.Client(**CLIENT_OPTIONS)  # type: ignore[arg-type]
START_TIMEOUT = 30.0


def ember(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_ember("--home", str(home), *args, check=check)


@dataclass
class EmberServer:
    home: Path
    host: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workers: int = int(os.environ.get("EMBER_TEST_SERVER_WORKERS", "1"))
    #: more options of ``ember server`` (limits, purge interval)
    options: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def start(self) -> EmberServer:
        for _ in range(5):
            self.host = f"127.0.0.1:{free_port()}"
            self.process = spawn_server(self._argv(), self.log_path, append=True)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"ember server did not start:\n{self.log_tail()}")

    def restart_on_same_port(self) -> None:
        """After a kill: start again where clients expect it."""
        self.process = spawn_server(self._argv(), self.log_path, append=True)
        if not self._wait_ready():
            raise RuntimeError(f"ember server did not restart:\n{self.log_tail()}")

    def _argv(self) -> list[str]:
        return [EMBER, "--home", str(self.home), "server", "--listen", self.host,
                "--workers", str(self.workers), *self.options]  # fmt: skip

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if http.get(f"{self.url}/v2/", timeout=2).status_code == 401:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    # -- administration through the CLI --------------------------------------------

    def create_org(self, name: str) -> None:
        ember(self.home, "admin", "org", "create", name)

    def create_token(self, org: str, access: str = "pull,push", label: str = "") -> str:
        out = ember(self.home, "admin", "token", "create", "--org", org, "--name", label, "--access", access)
        return out.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class Tenant:
    """One organization's view of a server: its token and an authenticated client."""

    server: EmberServer
    org: str
    token: str

    @property
    def creds(self) -> str:
        return f"x:{self.token}"

    @property
    def host(self) -> str:
        return self.server.host

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.token}"},
            **CLIENT_OPTIONS,  # type: ignore[arg-type]
        )

    def registry_token(self, *scopes: str) -> str:
        """A short-lived token from /token via basic auth, as docker/podman get it."""
        basic = base64.b64encode(f"someone:{self.token}".encode()).decode()
        r = http.get(
            f"{self.server.url}/token",
            params=[("service", "ember")] + [("scope", s) for s in scopes],
            headers={"Authorization": f"Basic {basic}"},
        )
        r.raise_for_status()
        return str(r.json()["token"])


def send_partial(host: str, method: str, path: str, headers: dict[str, str], body: bytes) -> socket.socket:
    """Send a request whose body is cut short; the socket stays open."""
    h, p = host.split(":")
    s = socket.create_connection((h, int(p)))
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    s.sendall(head.encode() + b"\r\n" + body)
    return s


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def at(location: str, **params: str) -> str:
    """``location`` with query parameters added (httpx's ``params=`` would replace ``_state``)."""
    from urllib.parse import urlencode

    return location + ("&" if "?" in location else "?") + urlencode(params)


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    """Monolithic POST + PUT; the digest."""
    digest = sha256(data)
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    r = client.put(at(r.headers["Location"], digest=digest), content=data,
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return digest


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def image_manifest(config: bytes, layers: list[bytes], **extra: object) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha256(b), "size": len(b)} for b in layers],
    }
    doc.update(extra)
    return json.dumps(doc).encode()


def push_image(client: httpx.Client, repo: str, tag: str, layers: list[bytes], config: bytes | None = None) -> tuple[str, bytes]:
    """Push blobs and a manifest tagged ``tag``; (manifest digest, manifest bytes)."""
    config = config or json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    for blob in [config, *layers]:
        push_blob(client, repo, blob)
    manifest = image_manifest(config, layers)
    r = client.put(f"/v2/{repo}/manifests/{tag}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return sha256(manifest), manifest
