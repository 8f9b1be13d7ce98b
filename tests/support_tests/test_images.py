"""Each image fixture yields a valid OCI layout with the content it promises,
checked with real tools (skopeo inspect, umoci unpack)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import images
from tests.support.registry import Registry
from tests.support.treecmp import umoci_unpack

pytestmark = pytest.mark.integration

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(layout: Path, digest: str) -> dict[str, Any]:
    algo, hexd = digest.split(":", 1)
    data: dict[str, Any] = json.loads((layout / "blobs" / algo / hexd).read_bytes())
    return data


def _manifest(layout: Path) -> dict[str, Any]:
    m = images.inspect_raw(layout)
    # mediaType is optional in an OCI manifest (umoci leaves it out)
    assert m.get("mediaType", OCI_MANIFEST) == OCI_MANIFEST and "layers" in m
    return m


def _config(layout: Path) -> dict[str, Any]:
    return _blob(layout, _manifest(layout)["config"]["digest"])


def _skopeo_inspect(ref: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        ["skopeo", "inspect", *extra, ref], check=True, capture_output=True, text=True
    ).stdout
    data: dict[str, Any] = json.loads(out)
    return data


# ----------------------------------------------------------------- busybox


def test_busybox_layout(busybox_layout: Path, tmp_path: Path) -> None:
    m = _manifest(busybox_layout)
    assert [layer["mediaType"] for layer in m["layers"]] == [GZIP]
    cfg = _config(busybox_layout)
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux"
    assert cfg["config"]["Cmd"] == ["/bin/sh", "-c", "echo hello from busybox"]
    rootfs = umoci_unpack(busybox_layout, "latest", tmp_path / "bundle")
    assert (rootfs / "bin" / "busybox").is_file()
    for applet in ("sh", "echo", "cat", "ls", "uname", "id", "sleep", "env", "pwd"):
        assert os.readlink(rootfs / "bin" / applet) == "busybox"
    for applet in ("hostname", "wget", "httpd", "nc"):
        assert os.readlink(rootfs / "bin" / applet) == "busybox"
    assert "app:x:1000:1000:" in (rootfs / "etc" / "passwd").read_text()
    assert "extra:x:2000:app" in (rootfs / "etc" / "group").read_text()
    home = (rootfs / "home" / "app").stat()
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777
    # the image really runs: chroot into it as root
    out = subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", "echo hello from busybox; id app"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.splitlines() == [
        "hello from busybox",
        "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)",
    ]


def test_demo_script_is_the_busybox_recipe(busybox_layout: Path, tmp_path: Path) -> None:
    """`make demo` and the fixture build the same image, digest for digest."""
    dest = tmp_path / "demo"
    subprocess.run([str(images.DEMO_SCRIPT), str(dest)], check=True, capture_output=True)
    ours = json.loads((dest / "index.json").read_text())["manifests"][0]["digest"]
    fixture = json.loads((busybox_layout / "index.json").read_text())["manifests"][0]["digest"]
    assert ours == fixture
    # idempotent: a second run keeps the layout as it is
    before = (dest / "index.json").stat().st_ino
    subprocess.run([str(images.DEMO_SCRIPT), str(dest)], check=True, capture_output=True)
    assert (dest / "index.json").stat().st_ino == before


# ----------------------------------------------------------------- multilayer


def test_multilayer_layout_config(multilayer_layout: Path) -> None:
    m = _manifest(multilayer_layout)
    assert len(m["layers"]) == 5  # busybox + three RUN + one COPY
    assert {layer["mediaType"] for layer in m["layers"]} == {GZIP}
    cfg = _config(multilayer_layout)
    c = cfg["config"]
    assert c["Entrypoint"] == ["/bin/echo", "entrypoint"]
    assert c["Cmd"] == ["default-cmd"]
    assert "GREETING=hello" in c["Env"]
    assert c["WorkingDir"] == "/home/app"
    assert c["User"] == "app"
    assert set(c["ExposedPorts"]) == {"8080/tcp", "53/udp"}
    assert c["StopSignal"] == "SIGTERM"
    assert set(c["Volumes"]) == {"/data/volume"}
    assert c["Labels"]["org.ember.test"] == "multilayer"
    assert len(cfg["rootfs"]["diff_ids"]) == 5


def test_multilayer_layout_tree(multilayer_layout: Path, tmp_path: Path) -> None:
    data = umoci_unpack(multilayer_layout, "latest", tmp_path / "bundle") / "data"
    assert not (data / "gone").exists()
    assert not (data / "dir").exists()
    assert sorted(os.listdir(data / "opaque")) == ["new"]
    assert os.readlink(data / "file-to-link") == "keep"
    assert (data / "link-to-dir").is_dir() and not (data / "link-to-dir").is_symlink()
    assert (data / "hardlink-src").read_text() == "original\n"
    assert (data / "hardlink-dst").read_text() == "changed\n"
    assert stat.S_IMODE((data / "suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((data / "setgid").stat().st_mode) == 0o2775
    owned = (data / "owned").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 2000, 0o640)
    assert stat.S_ISFIFO(os.lstat(data / "fifo").st_mode)
    assert os.getxattr(data / "xattr-file", "user.ember") == b"kept"
    assert (data / "big").stat().st_size == 1 << 20
    assert (data / "ünïcödé name").read_text() == "unicode\n"
    long_names = [n for n in os.listdir(data) if len(n) > 100]
    assert len(long_names) == 1


def test_multilayer_layers_carry_whiteouts(multilayer_layout: Path) -> None:
    import tarfile

    names: list[str] = []
    for layer in _manifest(multilayer_layout)["layers"]:
        algo, hexd = layer["digest"].split(":", 1)
        with tarfile.open(multilayer_layout / "blobs" / algo / hexd) as tar:
            names += tar.getnames()
    assert "data/.wh.gone" in names
    assert "data/.wh.dir" in names
    info = json.loads((multilayer_layout / ".ember-build.json").read_text())
    if info["storage_driver"] == "overlay":
        assert "data/opaque/.wh..wh..opq" in names
    else:  # vfs diffs whiteout each lower child instead
        assert "data/opaque/.wh.old" in names


# ----------------------------------------------------------------- zstd, multiarch


def test_zstd_layout(zstd_layout: Path, multilayer_layout: Path) -> None:
    m = _manifest(zstd_layout)
    assert m["layers"] and {layer["mediaType"] for layer in m["layers"]} == {ZSTD}
    # same uncompressed content: umoci_unpack(multilayer_layout) is its reference tree
    assert _config(zstd_layout)["rootfs"] == _config(multilayer_layout)["rootfs"]
    for layer in m["layers"]:
        algo, hexd = layer["digest"].split(":", 1)
        assert (zstd_layout / "blobs" / algo / hexd).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"


def test_multiarch_layout(multiarch_layout: Path) -> None:
    index = images.inspect_raw(multiarch_layout)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    platforms = {}
    for desc in index["manifests"]:
        manifest = _blob(multiarch_layout, desc["digest"])
        config = _blob(multiarch_layout, manifest["config"]["digest"])
        platforms[desc["platform"]["architecture"]] = config["architecture"]
        assert desc["platform"]["os"] == "linux"
    assert platforms == {"amd64": "amd64", "arm64": "arm64"}


# ----------------------------------------------------------------- debian


def test_debian_layout(debian_layout: Path, tmp_path: Path) -> None:
    m = _manifest(debian_layout)
    assert len(m["layers"]) == 1
    assert _config(debian_layout)["config"]["Cmd"] == ["/bin/bash"]
    rootfs = umoci_unpack(debian_layout, "latest", tmp_path / "bundle")
    assert (rootfs / "etc" / "debian_version").read_text().startswith("12")
    assert (rootfs / "usr" / "bin" / "apt-get").is_file()
    assert os.listdir(rootfs / "dev") == []
    assert not list((rootfs / "var" / "cache" / "apt" / "archives").glob("*.deb"))


# ----------------------------------------------------------------- registry


def test_push_layout(busybox_layout: Path, registry: Registry) -> None:
    ref = images.push_layout(busybox_layout, registry, "fixtures/busybox", "v1")
    assert ref == f"{registry.host}/fixtures/busybox:v1"
    remote = _skopeo_inspect(f"docker://{ref}", "--tls-verify=false")
    local = _skopeo_inspect(images.layout_ref(busybox_layout))
    assert remote["Digest"] == local["Digest"]


def test_push_index_with_auth(multiarch_layout: Path, auth_registry: Registry) -> None:
    ref = images.push_layout(multiarch_layout, auth_registry, "fixtures/multiarch")
    creds = auth_registry.creds
    assert creds
    raw = _skopeo_inspect(f"docker://{ref}", "--tls-verify=false", "--raw", "--creds", creds)
    assert len(raw["manifests"]) == 2
    anonymous = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--no-creds", "--raw", f"docker://{ref}"],
        capture_output=True,
    )
    assert anonymous.returncode != 0


# ----------------------------------------------------------------- the cache itself


def _tiny_layout(out: Path) -> None:
    out.mkdir()
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text('{"schemaVersion":2,"manifests":[]}')


def test_cache_builds_once_across_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_TEST_CACHE", str(tmp_path / "cache"))
    builds: list[int] = []
    start = threading.Barrier(4)

    def build(out: Path) -> None:
        builds.append(1)
        _tiny_layout(out)

    results: list[Path] = []

    def worker() -> None:
        start.wait()
        results.append(images.cached_layout("tiny", "k1", build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert len(set(results)) == 1 and images._is_layout(results[0])
    # a new recipe key is a new build
    assert images.cached_layout("tiny", "k2", build) != results[0]
    assert len(builds) == 2


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBER_TEST_CACHE", str(cache))

    def broken(out: Path) -> None:
        out.mkdir()
        (out / "oci-layout").write_text("{}")  # half a layout, then the tool dies
        raise images.ImageBuildError("tool failed")

    with pytest.raises(images.ImageBuildError):
        images.cached_layout("tiny", "k", broken)
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == []
    built: Callable[[Path], None] = _tiny_layout
    assert images._is_layout(images.cached_layout("tiny", "k", built))


def test_debian_mirror_from_apt_sources() -> None:
    mirror = images.debian_mirror()
    assert mirror.startswith(("http://", "https://")) and not mirror.endswith("/")


def test_push_as_docker_schema2(busybox_layout: Path, registry: Registry) -> None:
    ref = images.push_layout(busybox_layout, registry, "fixtures/docker", format="v2s2")
    raw = _skopeo_inspect(f"docker://{ref}", "--tls-verify=false", "--raw")
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert raw["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {layer["mediaType"] for layer in raw["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }


def test_busybox_docker_archive(busybox_docker_archive: Path, busybox_layout: Path) -> None:
    import tarfile

    with tarfile.open(busybox_docker_archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["localhost/ember-test:latest"]
    info = _skopeo_inspect(f"docker-archive:{busybox_docker_archive}")
    assert info["Layers"] and info["Architecture"] == "amd64"
    local = _config(busybox_layout)
    assert info["Env"] == local["config"]["Env"]


def test_podman_storage_push_pull(
    busybox_layout: Path, auth_registry: Registry, tmp_path: Path
) -> None:
    ref = f"{auth_registry.host}/fixtures/podman:v1"
    with images.podman_storage(tmp_path) as podman:
        image_id = podman("pull", "--quiet", images.layout_ref(busybox_layout)).split()[-1]
        podman("tag", image_id, ref)
        assert auth_registry.username and auth_registry.password
        podman(
            "login",
            "--tls-verify=false",
            "-u",
            auth_registry.username,
            "-p",
            auth_registry.password,
            auth_registry.host,
        )
        assert auth_registry.host in podman.auth_file.read_text()  # private, not /run/containers
        podman("push", "--quiet", "--tls-verify=false", ref)
        podman("rmi", ref)
        pulled = podman("pull", "--quiet", "--tls-verify=false", ref).split()[-1]
        assert pulled == image_id
        root = podman.root
    assert not root.exists()


def test_sized_layout(tmp_path: Path) -> None:
    layout = images.build_sized_layout(3)
    m = _manifest(layout)
    assert len(m["layers"]) == 2
    assert m["layers"][1]["size"] > 3 * (1 << 20)  # random data does not compress
    rootfs = umoci_unpack(layout, "latest", tmp_path / "bundle")
    assert (rootfs / "data" / "blob").stat().st_size == 3 << 20
    assert (rootfs / "bin" / "busybox").is_file()
    with pytest.raises(ValueError):
        images.build_sized_layout(0)
