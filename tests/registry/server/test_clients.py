"""Real clients against a real ember server: skopeo, podman, buildah, oras."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry.server.support import Tenant
from tests.support.images import buildah_storage, inspect_raw, layout_ref, podman_storage

pytestmark = pytest.mark.integration


def skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def raw_manifest(t: Tenant, ref: str) -> bytes:
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", t.creds, f"docker://{t.host}/{ref}"],
        capture_output=True, check=True,
    )
    return out.stdout


def layout_manifest(layout: Path) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--raw", layout_ref(layout)], capture_output=True, check=True).stdout


def push(t: Tenant, layout: Path, ref: str, *extra: str) -> None:
    skopeo("copy", "--quiet", "--dest-tls-verify=false", "--dest-creds", t.creds, *extra,
           layout_ref(layout), f"docker://{t.host}/{ref}")


def pull_to_layout(t: Tenant, ref: str, dest: Path, *extra: str) -> None:
    skopeo("copy", "--quiet", "--src-tls-verify=false", "--src-creds", t.creds, *extra,
           f"docker://{t.host}/{ref}", f"oci:{dest}:latest")


def _blobs(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


@pytest.mark.parametrize("fixture", ["busybox_layout", "multilayer_layout", "zstd_layout"])
def test_skopeo_roundtrip_byte_identical(request: pytest.FixtureRequest, acme: Tenant, tmp_path: Path, fixture: str) -> None:
    layout: Path = request.getfixturevalue(fixture)
    ref = f"skopeo/{fixture.replace('_', '-')}:v1"
    push(acme, layout, ref, "--preserve-digests")
    assert raw_manifest(acme, ref) == layout_manifest(layout)
    out = tmp_path / "out"
    pull_to_layout(acme, ref, out, "--preserve-digests")
    assert layout_manifest(out) == layout_manifest(layout)
    original = _blobs(layout)
    for name, data in _blobs(out).items():
        assert original[name] == data


def test_skopeo_all_multiarch_index(acme: Tenant, multiarch_layout: Path, tmp_path: Path) -> None:
    push(acme, multiarch_layout, "multi/arch:v1", "--all", "--preserve-digests")
    index = raw_manifest(acme, "multi/arch:v1")
    assert index == layout_manifest(multiarch_layout)
    for child in json.loads(index)["manifests"]:
        assert raw_manifest(acme, f"multi/arch@{child['digest']}")
    out = tmp_path / "out"
    pull_to_layout(acme, "multi/arch:v1", out, "--all", "--preserve-digests")
    assert layout_manifest(out) == index
    assert inspect_raw(out)["mediaType"] == "application/vnd.oci.image.index.v1+json"


def test_skopeo_docker_format(acme: Tenant, multilayer_layout: Path, tmp_path: Path) -> None:
    push(acme, multilayer_layout, "dockerfmt:v1", "--format", "v2s2")
    manifest = raw_manifest(acme, "dockerfmt:v1")
    assert json.loads(manifest)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    out = tmp_path / "out"
    pull_to_layout(acme, "dockerfmt:v1", out, "--preserve-digests", "--format", "v2s2")
    # docker-archive style round trip through a second ember repository keeps the bytes
    skopeo("copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", acme.creds,
           "--dest-creds", acme.creds, "--preserve-digests",
           f"docker://{acme.host}/dockerfmt:v1", f"docker://{acme.host}/dockerfmt-copy:v1")
    assert raw_manifest(acme, "dockerfmt-copy:v1") == manifest
    tags = json.loads(skopeo("list-tags", "--tls-verify=false", "--creds", acme.creds, f"docker://{acme.host}/dockerfmt"))
    assert tags["Tags"] == ["v1"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """podman refuses a runroot longer than 50 characters: pytest's tmp_path is too deep."""
    path = Path(tempfile.mkdtemp(prefix="ep", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_podman_login_push_pull(acme: Tenant, busybox_layout: Path, short_tmp: Path) -> None:
    with podman_storage(short_tmp) as podman:
        podman("login", "--tls-verify=false", "--username", "anyone", "--password", acme.token, acme.host)
        podman("pull", layout_ref(busybox_layout))
        image_id = podman("images", "--quiet", "--no-trunc").split()[0]
        podman("tag", image_id, f"{acme.host}/podman/busybox:1")
        podman("push", "--tls-verify=false", f"{acme.host}/podman/busybox:1")
        podman("rmi", "--all", "--force")
        podman("pull", "--tls-verify=false", f"{acme.host}/podman/busybox:1")
        assert image_id in podman("images", "--quiet", "--no-trunc")


def test_podman_wrong_token_refused(acme: Tenant, short_tmp: Path) -> None:
    with podman_storage(short_tmp) as podman, pytest.raises(Exception, match="401|nauthorized|invalid username/password"):
        podman("login", "--tls-verify=false", "--username", "x", "--password", "ember_wrong", acme.host)


def test_buildah_push(acme: Tenant, multilayer_layout: Path, tmp_path: Path) -> None:
    with buildah_storage(tmp_path) as buildah:
        buildah("login", "--tls-verify=false", "--username", "x", "--password", acme.token, acme.host)
        buildah("pull", layout_ref(multilayer_layout))
        image_id = buildah("images", "--quiet", "--no-trunc").split()[0]
        buildah("push", "--tls-verify=false", image_id, f"docker://{acme.host}/buildah/multi:1")
    config = json.loads(skopeo("inspect", "--config", "--tls-verify=false", "--creds", acme.creds,
                               f"docker://{acme.host}/buildah/multi:1"))
    assert config["config"]["Labels"]["org.ember.test"] == "multilayer"


def test_oras_artifact_with_subject(acme: Tenant, busybox_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import oras.client
    import oras.oci

    push(acme, busybox_layout, "oras/app:v1", "--preserve-digests")
    subject_bytes = layout_manifest(busybox_layout)
    subject = oras.oci.Subject(
        mediaType=json.loads(subject_bytes).get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
        digest="sha256:" + hashlib.sha256(subject_bytes).hexdigest(),
        size=len(subject_bytes),
    )
    client = oras.client.OrasClient(hostname=acme.host, insecure=True)
    client.login(username="x", password=acme.token, hostname=acme.host, tls_verify=False)
    (tmp_path / "sbom.json").write_text('{"packages": ["busybox"]}')
    monkeypatch.chdir(tmp_path)  # oras names a layer by its relative path
    # a pull first: the client then holds a pull-only token and must widen it to push
    assert client.get_tags(f"{acme.host}/oras/app") == ["v1"]
    resp = client.push(target=f"{acme.host}/oras/app:sbom", files=["sbom.json"], subject=subject)
    assert resp.status_code == 201, resp.text
    assert resp.headers["OCI-Subject"] == subject.digest
    files = client.pull(target=f"{acme.host}/oras/app:sbom", outdir=str(tmp_path / "pulled"))
    assert [Path(f).read_text() for f in files] == ['{"packages": ["busybox"]}']
    # the registry lists it as a referrer of the image
    with acme.client() as c:
        refs = c.get(f"/v2/oras/app/referrers/{subject.digest}").json()["manifests"]
    assert len(refs) == 1 and refs[0]["digest"] == resp.headers["Docker-Content-Digest"]


def test_docker_format_matches_the_reference_registry(acme: Tenant, registry: object, multilayer_layout: Path) -> None:
    """The same Docker v2s2 image in Debian's docker-registry and, copied from there, in
    ember: byte-identical manifests and configs, same digests."""
    go_host = registry.host  # type: ignore[attr-defined]
    skopeo("copy", "--quiet", "--dest-tls-verify=false", "--format", "v2s2",
           layout_ref(multilayer_layout), f"docker://{go_host}/ref/multi:v1")
    skopeo("copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false", "--dest-creds", acme.creds,
           "--preserve-digests", f"docker://{go_host}/ref/multi:v1", f"docker://{acme.host}/ref/multi:v1")
    theirs = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{go_host}/ref/multi:v1"],
                            capture_output=True, check=True).stdout
    ours = raw_manifest(acme, "ref/multi:v1")
    assert ours == theirs
    assert json.loads(ours)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    config_theirs = skopeo("inspect", "--config", "--raw", "--tls-verify=false", f"docker://{go_host}/ref/multi:v1")
    config_ours = skopeo("inspect", "--config", "--raw", "--tls-verify=false", "--creds", acme.creds,
                         f"docker://{acme.host}/ref/multi:v1")
    assert config_ours == config_theirs
