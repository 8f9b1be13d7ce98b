"""Pulls through a misbehaving proxy: cut connections, ignored Range, corruption, 503s, Bearer tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.home import Home
from ember.images import ImageService
from ember.oci.config import parse_config
from ember.registry.client.credentials import Credentials, CredentialStore
from ember.registry.client.errors import AuthenticationFailed, BlobCorrupt
from tests.registry.client.proxy import Behaviour, misbehaving_proxy
from tests.support.images import push_layout
from tests.support.registry import Registry

pytestmark = pytest.mark.integration


def test_resume_after_cut_connection(
    service: ImageService, registry: Registry, debian_ref: str
) -> None:
    with misbehaving_proxy(registry.host, Behaviour(cut_blob_after=1_000_000)) as proxy:
        image = service.pull(f"{proxy.host}/{debian_ref}", progress=False)
    big = max(image.layers, key=lambda x: x.size)
    gets = proxy.requests(f"/blobs/{big.digest}", "GET")
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    assert gets[1].headers["range"] == "bytes=1000000-"
    assert gets[1].status == 206
    assert service.content.path(big.digest).stat().st_size == big.size


def test_resume_when_server_ignores_range(
    service: ImageService, registry: Registry, debian_ref: str
) -> None:
    with misbehaving_proxy(
        registry.host, Behaviour(cut_blob_after=500_000, ignore_range=True)
    ) as proxy:
        image = service.pull(f"{proxy.host}/{debian_ref}", progress=False)
    big = max(image.layers, key=lambda x: x.size)
    gets = proxy.requests(f"/blobs/{big.digest}", "GET")
    assert len(gets) == 2 and gets[1].status == 200  # whole blob again, writer restarted
    assert service.content.exists(big.digest)


def test_a_config_whose_download_started_over_is_read_from_its_verified_bytes(
    service: ImageService, registry: Registry, busybox_layout: Path, tmp_path: Path
) -> None:
    """The config is read as it arrives.  A registry that sent a forged start, cut the
    connection and answered the resume with the whole real blob (200, Range ignored):
    the reader went on where it was, and handed out the forged start with the real rest
    as verified (the digest checks the second download only), so a pinned image's
    config could be changed.  Now the start-over is seen and the stored blob read."""
    ref = push_layout(busybox_layout, registry, "faults/forged")
    config = service.pull(ref, progress=False).config_digest
    other = ImageService(Home(tmp_path / "second-home"))
    behaviour = Behaviour(cut_blob_after=40, ignore_range=True, corrupt_first_get={str(config)})
    with (
        misbehaving_proxy(registry.host, behaviour) as proxy,
        other.pulling(ref.replace(registry.host, proxy.host, 1), progress=False) as pulled,
    ):
        handed = pulled.image.config
    gets = proxy.requests(f"/blobs/{config}", "GET")
    assert [g.status for g in gets] == [200, 200]  # the forged cut one, then the whole again
    assert handed == parse_config(other.content.read_bytes(config))


def test_corrupt_blob_refused_and_not_stored(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    push_layout(busybox_layout, registry, "faults/busybox")
    with (
        misbehaving_proxy(registry.host, Behaviour(corrupt_blobs=True)) as proxy,
        pytest.raises(BlobCorrupt, match="corrupt"),
    ):
        service.pull(f"{proxy.host}/faults/busybox", progress=False)
    assert list(service.content.list()) == []
    assert service.list() == []
    # a healthy registry afterwards: the pull succeeds, nothing stale is reused
    assert service.pull(f"{registry.host}/faults/busybox", progress=False).layers


def test_a_resumed_blob_that_fails_its_digest_is_fetched_again_whole(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    """What a pull cancelled mid-body by a corrupt registry keeps for a resume may be
    wrong itself: the next pull, from a healthy registry, used to resume it and fail
    as corrupt (once; then it started over).  It now starts over at once."""
    push_layout(busybox_layout, registry, "faults/resume-bad")
    ref = f"{registry.host}/faults/resume-bad"
    with service.pulling(ref, progress=False) as pulled:
        layers = pulled.image.layers
    big = max(layers, key=lambda x: x.size)
    assert service.content.delete(big.digest)
    with service.content.writer(big.digest, big.size) as writer:  # kept for a resume
        writer.write(b"not the blob" * 100)
    assert service.remove(ref)
    with misbehaving_proxy(registry.host, Behaviour()) as proxy:
        image = service.pull(f"{proxy.host}/faults/resume-bad", progress=False)
    assert big.digest in {x.digest for x in image.layers}
    gets = proxy.requests(f"/blobs/{big.digest}", "GET")
    assert [g.headers.get("range") for g in gets] == ["bytes=1200-", None]
    assert service.content.path(big.digest).read_bytes() == (
        busybox_layout / "blobs" / "sha256" / big.digest.hex
    ).read_bytes()


def test_retries_on_503(service: ImageService, registry: Registry, busybox_layout: Path) -> None:
    push_layout(busybox_layout, registry, "faults/flaky")
    with misbehaving_proxy(
        registry.host, Behaviour(fail_first={"/manifests/": 2, "/blobs/": 2})
    ) as proxy:
        image = service.pull(f"{proxy.host}/faults/flaky", progress=False)
    assert image.layers
    assert [s.status for s in proxy.requests("/manifests/")][:3] == [503, 503, 200]


def test_bearer_token_flow(service: ImageService, registry: Registry, busybox_layout: Path) -> None:
    push_layout(busybox_layout, registry, "faults/token")
    behaviour = Behaviour(bearer_user="alice", bearer_password="s3cret")
    with misbehaving_proxy(registry.host, behaviour) as proxy:
        ref = f"{proxy.host}/faults/token"
        with pytest.raises(AuthenticationFailed, match="requires authentication"):
            # the token service wants credentials; none are stored, so the token request fails
            service.pull(ref, progress=False)
        store = CredentialStore(service.home.credentials)
        store.save(proxy.host, Credentials("alice", "wrong"))
        with pytest.raises(AuthenticationFailed, match="refused the credentials"):
            service.pull(ref, progress=False)
        store.save(proxy.host, Credentials("alice", "s3cret"))
        image = service.pull(ref, progress=False)
        token_requests = [s for s in proxy.requests("/token?") if s.status == 200]
        # one token for the repository's pull scope, cached for every blob
        assert len(token_requests) == 1
        assert "scope=repository%3Afaults%2Ftoken%3Apull" in token_requests[0].path
        assert "service=proxy-test" in token_requests[0].path
        # a revoked token: 401, one fresh token, one retry
        proxy.revoke_tokens()
        service.content.delete(image.manifest_digest)
        ImageService(service.home).pull(ref, progress=False)
        assert len([s for s in proxy.requests("/token?") if s.status == 200]) == 2


def test_manifest_not_matching_its_digest(
    service: ImageService, registry: Registry, multiarch_layout: Path
) -> None:
    push_layout(multiarch_layout, registry, "faults/padded")
    with misbehaving_proxy(registry.host, Behaviour(pad_manifests=True)) as proxy:
        # the index (by tag) is taken as served; the child, asked by digest, must match it
        with pytest.raises(BlobCorrupt, match="does not match"):
            service.pull(f"{proxy.host}/faults/padded", progress=False)
        digest = service.pull(f"{registry.host}/faults/padded", progress=False).manifest_digest
        with pytest.raises(BlobCorrupt, match="does not match"):
            service.pull(f"{proxy.host}/faults/padded@{digest}", progress=False)
