"""Without --platform, using an image means this host's (the commands' help says so).

``image prepare``/``image unpack``/``ember run`` (all through ``ensure``/``ensuring``)
used whatever platform was last pulled under the name."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ember.images import ImageService
from ember.oci.errors import NoMatchingPlatform
from ember.oci.platform import Platform, host_platform
from tests.support.cli import ember_env, run_ember
from tests.support.images import _busybox, layout_ref

ARM64 = Platform.parse("linux/arm64")

pytestmark = pytest.mark.skipif(
    host_platform() != Platform.parse("linux/amd64"), reason="the test images' host is amd64"
)


def test_an_image_pulled_for_another_platform_is_refused_not_used(
    service: ImageService, multiarch_layout: Path
) -> None:
    ref = layout_ref(multiarch_layout)
    service.pull(ref, ARM64, progress=False)
    with pytest.raises(NoMatchingPlatform) as refused:
        service.ensure(ref)
    message = str(refused.value)
    assert "is for linux/arm64, not for this host (linux/amd64)" in message
    assert f"ember image pull --platform linux/amd64 {ref}" in message
    assert "take --platform linux/arm64" in message and "ember run" not in message
    with pytest.raises(NoMatchingPlatform), service.ensuring(ref):
        pass
    assert [r.platform for r in service.list()] == ["linux/arm64"]  # nothing pulled

    # asked for by name, it is used
    assert service.ensure(ref, ARM64).platform == ARM64
    # a pull without --platform takes this host's, moving the name (as docker pull does)
    assert service.pull(ref, progress=False).platform == Platform.parse("linux/amd64")
    assert [r.platform for r in service.list()] == ["linux/amd64"]
    assert service.ensure(ref).platform == Platform.parse("linux/amd64")


def test_a_single_platform_image_for_another_platform_needs_platform(
    service: ImageService,
) -> None:
    """Nothing to choose from: refused when used without --platform (first and every
    time alike), pulled as it is by ``pull``."""
    ref = layout_ref(_busybox("arm64"))
    with pytest.raises(NoMatchingPlatform, match=r"is for linux/arm64, not for this host") as e:
        service.ensure(ref)
    assert "take --platform linux/arm64" in str(e.value)
    assert service.list() == []
    assert service.ensure(ref, ARM64).platform == ARM64
    with pytest.raises(NoMatchingPlatform, match=r"is for linux/arm64, not for this host"):
        service.ensure(ref)
    assert service.pull(ref, progress=False).platform == ARM64


def test_unpack_without_platform_refuses_the_other_platforms_image(
    tmp_path: Path, multiarch_layout: Path
) -> None:
    env = ember_env(tmp_path / "home", EMBER_AGENT="0")
    ref = layout_ref(multiarch_layout)

    def ember(*args: str) -> subprocess.CompletedProcess[str]:
        return run_ember(*args, env=env, timeout=120)

    assert ember("image", "pull", "--platform", "linux/arm64", ref).returncode == 0
    refused = ember("image", "unpack", ref, str(tmp_path / "root"))
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("ember: image oci:")
    assert "linux/arm64" in refused.stderr and "linux/amd64" in refused.stderr
    assert not (tmp_path / "root").exists()
    chosen = ember("image", "unpack", "--platform", "linux/arm64", ref, str(tmp_path / "arm"))
    assert chosen.returncode == 0, chosen.stderr


def test_pulling_another_platforms_image_warns_as_docker_does(tmp_path: Path) -> None:
    env = ember_env(tmp_path / "home", EMBER_AGENT="0")
    ref = layout_ref(_busybox("arm64"))
    pulled = run_ember("image", "pull", ref, env=env, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert f"warning: {ref} is for linux/arm64, not this host (linux/amd64)" in pulled.stderr
    # run has no --platform (it boots this host's images): it is not sent there
    assert "unpack and prepare need --platform linux/arm64" in pulled.stderr
    asked = run_ember("image", "pull", "--platform", "linux/arm64", ref, env=env, timeout=120)
    assert "warning" not in asked.stderr  # asked for by name: nothing to warn about
