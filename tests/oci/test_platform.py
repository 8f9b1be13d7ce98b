import platform as pyplatform

import pytest

from ember.oci import mediatypes as mt
from ember.oci.digest import Digest
from ember.oci.errors import InvalidPlatform, NoMatchingPlatform
from ember.oci.manifest import Descriptor, DescriptorPlatform, ImageIndex
from ember.oci.platform import Platform, host_platform, select_manifest


def desc(n: int, os: str | None, arch: str = "", variant: str | None = None) -> Descriptor:
    plat = DescriptorPlatform(architecture=arch, os=os, variant=variant) if os else None
    return Descriptor(mt.OCI_MANIFEST, Digest.of(str(n).encode()), 100 + n, platform=plat)


def test_parse() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "")
    assert Platform.parse("linux/arm64") == Platform("linux", "arm64", "")
    assert Platform.parse("linux/amd64") == Platform("linux", "amd64", "")
    assert Platform.parse("linux/arm") == Platform("linux", "arm", "v7")
    assert Platform.parse("linux/arm/v6") == Platform("linux", "arm", "v6")
    assert Platform.parse("Linux/x86_64") == Platform("linux", "amd64", "")
    assert Platform.parse("arm64") == Platform("linux", "arm64", "")
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    assert Platform.parse("aarch64") == Platform("linux", "arm64", "")
    assert Platform.parse("riscv64") == Platform("linux", "riscv64", "")
    # a lone word that is neither an OS nor an architecture: a typo, not linux/<word>
    # (which then read as "the image is for linux/amd64, not linux/bogus")
    for bad in ["", "a/b/c/d", "linux//amd64", "linux/am d64", "linux/../x" + "y" * 100,
                "bogus", "amd46"]:  # fmt: skip
        with pytest.raises(InvalidPlatform):
            Platform.parse(bad)


def test_host_platform() -> None:
    host = host_platform()
    assert host.os == "linux"
    if pyplatform.machine() == "x86_64":
        assert host.architecture == "amd64"


def test_select_exact_and_variant() -> None:
    idx = ImageIndex(
        mt.OCI_INDEX,
        [
            desc(1, "linux", "amd64"),
            desc(2, "linux", "arm", "v6"),
            desc(3, "linux", "arm", "v7"),
            desc(4, "linux", "arm64", "v8"),
        ],
    )
    assert select_manifest(idx, Platform.parse("linux/amd64")).size == 101
    assert select_manifest(idx, Platform.parse("linux/arm/v6")).size == 102
    assert select_manifest(idx, Platform.parse("linux/arm")).size == 103
    assert select_manifest(idx, Platform.parse("linux/arm64")).size == 104


def test_select_skips_attestations_and_lists_available() -> None:
    idx = ImageIndex(
        mt.OCI_INDEX,
        [desc(1, "linux", "amd64"), desc(2, "unknown", "unknown"), desc(3, "linux", "arm64")],
    )
    with pytest.raises(NoMatchingPlatform) as e:
        select_manifest(idx, Platform.parse("linux/s390x"))
    assert "linux/amd64" in str(e.value) and "linux/arm64" in str(e.value)
    assert "unknown" not in str(e.value)
    assert "linux/s390x" in str(e.value)


def test_select_single_entry_without_platform() -> None:
    idx = ImageIndex(mt.OCI_INDEX, [desc(1, None)])
    assert select_manifest(idx, Platform.parse("linux/amd64")).size == 101
    with pytest.raises(NoMatchingPlatform, match="none"):
        select_manifest(ImageIndex(mt.OCI_INDEX, []), Platform.parse("linux/amd64"))
    # two that do not say their platform (one tag given twice in a layout): not "none"
    two = ImageIndex(mt.OCI_INDEX, [desc(1, None), desc(2, None), desc(3, "linux", "arm64")])
    with pytest.raises(NoMatchingPlatform, match=r"available: linux/arm64, 2 images that do not say"):
        select_manifest(two, Platform.parse("linux/amd64"))


def test_select_default_is_host() -> None:
    host = host_platform()
    idx = ImageIndex(
        mt.OCI_INDEX, [desc(1, "linux", "mips64"), desc(2, host.os, host.architecture)]
    )
    assert select_manifest(idx).size == 102
