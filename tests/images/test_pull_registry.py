"""Pulling from a real docker-registry: plain, htpasswd, multi-arch, zstd; unpack equals umoci."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ember.images import ImageNotFound, ImageService
from ember.oci import mediatypes as mt
from ember.oci.errors import NoMatchingPlatform
from ember.oci.platform import Platform
from ember.registry.client.credentials import Credentials, CredentialStore
from ember.registry.client.errors import AuthenticationFailed, ManifestUnknown, RegistryUnreachable
from ember.unpack import apply_layers
from tests.support.images import inspect_raw, push_layout
from tests.support.registry import Registry, free_port
from tests.support.treecmp import assert_same_tree, umoci_unpack

pytestmark = pytest.mark.integration


def unpack(service: ImageService, ref: str, dest: Path) -> Path:
    image = service.get(ref)
    dest.mkdir()
    apply_layers(dest, [(service.layer_path(x), x.media_type, x.diff_id) for x in image.layers])
    return dest


def test_pull_multilayer_and_unpack_equals_umoci(
    service: ImageService, registry: Registry, multilayer_layout: Path, tmp_path: Path
) -> None:
    ref = push_layout(multilayer_layout, registry, "test/multilayer")
    image = service.pull(ref, progress=False)
    raw = inspect_raw(multilayer_layout)
    assert image.reference == ref
    assert len(image.layers) == 5
    assert image.platform == Platform("linux", "amd64")
    assert image.config.entrypoint == ["/bin/echo", "entrypoint"]
    assert image.config.cmd == ["default-cmd"]
    assert image.config.user == "app"
    assert image.config.working_dir == "/home/app"
    assert "GREETING=hello" in image.config.env
    assert image.config.exposed_ports == ["53/udp", "8080/tcp"]
    assert image.config.labels["org.ember.test"] == "multilayer"
    assert image.config.volumes == ["/data/volume"]
    assert image.config.stop_signal == "SIGTERM"
    # the digest skopeo pushed (--preserve-digests): the layout's, and its bytes' sha256
    (entry,) = json.loads((multilayer_layout / "index.json").read_text())["manifests"]
    assert str(image.manifest_digest) == entry["digest"]
    algorithm, hex_ = entry["digest"].split(":")
    manifest_bytes = (multilayer_layout / "blobs" / algorithm / hex_).read_bytes()
    assert json.loads(manifest_bytes) == raw
    assert image.manifest_digest.hex == hashlib.sha256(manifest_bytes).hexdigest()
    for layer in image.layers:
        assert service.content.exists(layer.digest)
        assert service.layer_path(layer).stat().st_size == layer.size
    # the record survives a new service (a new process)
    again = ImageService(service.home).get(ref)
    assert again.manifest_digest == image.manifest_digest
    assert [x.chain_id for x in again.layers] == [x.chain_id for x in image.layers]
    assert service.get(str(image.manifest_digest)).reference == ref
    assert service.get(image.manifest_digest.hex[:12]).reference == ref

    ours = unpack(service, ref, tmp_path / "ours")
    theirs = umoci_unpack(multilayer_layout, "latest", tmp_path / "umoci")
    assert_same_tree(ours, theirs)


def test_pull_zstd(
    service: ImageService,
    registry: Registry,
    zstd_layout: Path,
    multilayer_layout: Path,
    tmp_path: Path,
) -> None:
    ref = push_layout(zstd_layout, registry, "test/zstd")
    image = service.pull(ref, progress=False)
    assert {x.media_type for x in image.layers} == {mt.OCI_LAYER_ZSTD}
    ours = unpack(service, ref, tmp_path / "ours")
    assert_same_tree(ours, umoci_unpack(multilayer_layout, "latest", tmp_path / "umoci"))


def test_pull_multiarch_by_platform(
    service: ImageService, registry: Registry, multiarch_layout: Path
) -> None:
    ref = push_layout(multiarch_layout, registry, "test/multiarch")
    arm = service.pull(ref, Platform.parse("linux/arm64"), progress=False)
    assert arm.platform.architecture == "arm64"
    rec = service.list()[0]
    assert rec.index_digest is not None and rec.platform == "linux/arm64"
    amd = service.pull(ref, Platform.parse("linux/amd64"), progress=False)
    assert amd.platform.architecture == "amd64"
    assert amd.manifest_digest != arm.manifest_digest
    # one record per reference: the last pull wins
    assert [r.platform for r in service.list()] == ["linux/amd64"]
    with pytest.raises(NoMatchingPlatform) as err:
        service.pull(ref, Platform.parse("linux/s390x"), progress=False)
    assert "linux/amd64" in str(err.value) and "linux/arm64" in str(err.value)
    assert service.ensure(ref, Platform.parse("linux/arm64")).platform.architecture == "arm64"


def test_pull_with_basic_auth(
    service: ImageService,
    auth_registry: Registry,
    busybox_layout: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = push_layout(busybox_layout, auth_registry, "test/private")
    with pytest.raises(AuthenticationFailed, match="ember registry login"):
        service.pull(ref, progress=False)
    store = CredentialStore(service.home.credentials)
    store.save(auth_registry.host, Credentials(auth_registry.username or "", "wrong"))
    with pytest.raises(AuthenticationFailed, match="refused"):
        service.pull(ref, progress=False)
    store.save(
        auth_registry.host, Credentials(auth_registry.username or "", auth_registry.password or "")
    )
    assert service.pull(ref, progress=False).reference == ref
    assert (service.home.credentials.stat().st_mode & 0o777) == 0o600


def test_pull_with_docker_config_credentials(
    home: object,
    auth_registry: Registry,
    busybox_layout: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import base64
    import json

    from ember.home import Home

    ref = push_layout(busybox_layout, auth_registry, "test/private-docker")
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    auth = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    (docker_dir / "config.json").write_text(
        json.dumps({"auths": {f"http://{auth_registry.host}/v2/": {"auth": auth}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    assert isinstance(home, Home)
    assert ImageService(home).pull(ref, progress=False).reference == ref


def test_unknown_tag_and_repository(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    push_layout(busybox_layout, registry, "test/known")
    with pytest.raises(ManifestUnknown, match="not found"):
        service.pull(f"{registry.host}/test/known:nope", progress=False)
    with pytest.raises(ManifestUnknown):
        service.pull(f"{registry.host}/test/unknown-repo", progress=False)
    assert service.list() == []


def test_unreachable_registry(service: ImageService) -> None:
    with pytest.raises(RegistryUnreachable, match="cannot reach"):
        service.pull(f"127.0.0.1:{free_port()}/nothing/here", progress=False)


def test_remove_keeps_shared_blobs(
    service: ImageService, registry: Registry, multilayer_layout: Path, zstd_layout: Path
) -> None:
    gzip = service.pull(push_layout(multilayer_layout, registry, "test/gzip"), progress=False)
    same = service.pull(push_layout(multilayer_layout, registry, "test/gzip-again"), progress=False)
    zstd = service.pull(push_layout(zstd_layout, registry, "test/zstd-rm"), progress=False)
    assert zstd.config_digest == gzip.config_digest  # recompressed: same config, other layers
    service.remove(gzip.reference)
    with pytest.raises(ImageNotFound):
        service.get(gzip.reference)
    for layer in gzip.layers:  # still used by the same image under another name
        assert service.content.exists(layer.digest)
    service.remove(same.reference)
    for layer in gzip.layers:
        assert not service.content.exists(layer.digest)
    assert not service.content.exists(gzip.manifest_digest)
    assert service.content.exists(zstd.config_digest)
    assert service.get(zstd.reference).manifest_digest == zstd.manifest_digest
    with pytest.raises(ImageNotFound):
        service.remove(gzip.reference)


def test_pull_docker_schema2(
    service: ImageService, registry: Registry, multilayer_layout: Path, tmp_path: Path
) -> None:
    ref = push_layout(multilayer_layout, registry, "test/v2s2", format="v2s2")
    image = service.pull(ref, progress=False)
    assert image.manifest.media_type == mt.DOCKER_MANIFEST
    assert image.manifest.config.media_type == mt.DOCKER_CONFIG
    assert {x.media_type for x in image.layers} == {mt.DOCKER_LAYER_GZIP}
    ours = unpack(service, ref, tmp_path / "ours")
    assert_same_tree(ours, umoci_unpack(multilayer_layout, "latest", tmp_path / "umoci"))


def test_pull_docker_manifest_list(
    service: ImageService, registry: Registry, multiarch_layout: Path
) -> None:
    ref = push_layout(multiarch_layout, registry, "test/v2s2-list", format="v2s2")
    image = service.pull(ref, Platform.parse("linux/arm64"), progress=False)
    assert image.platform.architecture == "arm64"
    assert image.manifest.media_type == mt.DOCKER_MANIFEST
    assert service.list()[0].index_digest is not None


def test_remove_respects_snapshot_leases(
    service: ImageService, registry: Registry, multilayer_layout: Path
) -> None:
    from ember.snapshots.leases import Leases

    image = service.pull(push_layout(multilayer_layout, registry, "test/leased"), progress=False)
    base = service.home.snapshots
    (base / "locks").mkdir(parents=True)
    leases = Leases(base / "leases", base / "locks" / "gc.lock")
    kept, expired = image.layers[0].digest, image.layers[1].digest
    leases.create("building", ttl=3600, content=[str(kept)])
    leases.create("stale", ttl=-1, content=[str(expired)])
    service.remove(image.reference)
    assert service.content.exists(kept)  # a live lease claims it
    assert not service.content.exists(expired)  # an expired lease protects nothing
    for layer in image.layers[2:]:
        assert not service.content.exists(layer.digest)
    with pytest.raises(ImageNotFound):
        service.get(image.reference)
