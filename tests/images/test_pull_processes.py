"""Pulls in real processes: kill -9 mid-download then resume, two pulls of one image at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.home import Home
from ember.images import ImageService
from tests.images.test_pull_cancel import partial_download
from tests.registry.client.proxy import Behaviour, misbehaving_proxy
from tests.support.images import push_layout
from tests.support.registry import Registry

pytestmark = pytest.mark.integration

EMBER = str(Path(sys.executable).with_name("ember"))
STALL_AT = 2_000_000


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "EMBER_HOME": str(home), "DOCKER_CONFIG": str(home / "no-docker")}


def test_kill_9_mid_download_then_resume(
    tmp_path: Path, registry: Registry, debian_layout: Path
) -> None:
    push_layout(debian_layout, registry, "procs/debian")
    home = tmp_path / "home"
    ingest = home / "content" / "ingest"
    with misbehaving_proxy(registry.host, Behaviour(stall_blob_after=STALL_AT)) as proxy:
        ref = f"{proxy.host}/procs/debian"
        proc = subprocess.Popen([EMBER, "image", "pull", "-q", ref], env=env_for(home))
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if partial_download(ingest, STALL_AT) is not None:
                    break
                assert proc.poll() is None, "the pull ended before it was killed"
                time.sleep(0.05)
            else:
                pytest.fail("the download never reached the stall point")
        finally:
            proc.kill()
            proc.wait()
        service = ImageService(Home(home))
        assert service.list() == []  # nothing recorded by the killed pull
        partial = [p for p in ingest.glob("sha256-*") if p.stat().st_size >= STALL_AT]
        assert len(partial) == 1
        digest_hex = partial[0].name.removeprefix("sha256-")
        assert not (home / "content" / "blobs" / "sha256" / digest_hex).exists()

        again = subprocess.run(
            [EMBER, "image", "pull", "-q", ref], env=env_for(home), capture_output=True, text=True
        )
        assert again.returncode == 0, again.stderr
        gets = proxy.requests(f"/blobs/sha256:{digest_hex}", "GET")
        assert gets[-1].headers.get("range") == f"bytes={STALL_AT}-"
        assert gets[-1].status == 206
    image = ImageService(Home(home)).get(ref)
    assert any(layer.digest.hex == digest_hex for layer in image.layers)
    assert not partial[0].exists()


def test_two_processes_pull_one_image(
    tmp_path: Path, registry: Registry, multilayer_layout: Path
) -> None:
    ref = push_layout(multilayer_layout, registry, "procs/multilayer")
    home = tmp_path / "home"
    procs = [
        subprocess.Popen(
            [EMBER, "image", "pull", "-q", ref],
            env=env_for(home),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    listed = subprocess.run(
        [EMBER, "image", "ls", "--json"], env=env_for(home), capture_output=True, text=True
    )
    assert [r["reference"] for r in json.loads(listed.stdout)] == [ref]
    image = ImageService(Home(home)).get(ref)
    for layer in image.layers:
        assert (
            home / "content" / "blobs" / "sha256" / layer.digest.hex
        ).stat().st_size == layer.size
    assert list((home / "content" / "ingest").iterdir()) == []
