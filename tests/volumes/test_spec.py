from __future__ import annotations

import pytest

from ember.volumes.errors import InvalidVolumeSpec
from ember.volumes.spec import (
    MAX_VOLUMES,
    VolumeMount,
    check_volume_name,
    parse_volume,
    parse_volumes,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data:/data", VolumeMount("data", "/data")),
        ("data:/srv/db/:rw", VolumeMount("data", "/srv/db")),
        ("my.vol_1-x:/a//b/./c:ro", VolumeMount("my.vol_1-x", "/a/b/c", read_only=True)),
        ("db://var/lib", VolumeMount("db", "/var/lib")),
        ("data:/data:nocopy", VolumeMount("data", "/data", copy=False)),
        ("data:/data:ro,nocopy", VolumeMount("data", "/data", read_only=True, copy=False)),
        ("data:/data:nocopy,rw", VolumeMount("data", "/data", copy=False)),
    ],
)
def test_named_volumes(text: str, expected: VolumeMount) -> None:
    got = parse_volume(text)
    assert (got, got.copy) == (expected, expected.copy)
    assert parse_volume(str(got)) == got  # what a record keeps reads back the same
    assert ":nocopy" not in str(got) and "," not in str(got)  # copy-up is done at run only


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("/srv:/data", "a host directory cannot be mounted"),
        ("./here:/data", "a host directory cannot be mounted"),
        ("~/x:/data", "a host directory cannot be mounted"),
        ("/data", "expected NAME:TARGET"),
        ("data", "expected NAME:TARGET"),
        ("data:/x:ro:z", "expected NAME:TARGET"),
        ("data:/x:z", "unknown option 'z'"),
        ("data:/x:ro,rw", "ro and rw both given"),
        ("data:/x:nocopy,nocopy", "nocopy is given twice"),
        ("data:/x:ro,", "unknown option ''"),
        ("data:relative", "must be an absolute path"),
        ("data:/a/../etc", "must not contain '..'"),
        ("data:/", "cannot be mounted over /"),
        ("data:/./", "cannot be mounted over /"),
        ("d:/x", "invalid volume name"),
        ("-data:/x", "invalid volume name"),
        ("da ta:/x", "invalid volume name"),
        ("data:/x\ny", "control characters"),
    ],
)
def test_what_is_not_a_named_volume_is_refused_saying_why(text: str, said: str) -> None:
    with pytest.raises(InvalidVolumeSpec, match=said):
        parse_volume(text)


def test_a_machines_volumes() -> None:
    got = parse_volumes(["a1:/a", "b1:/b:ro"])
    assert [m.device(i) for i, m in enumerate(got)] == ["/dev/vdb", "/dev/vdc"]
    with pytest.raises(InvalidVolumeSpec, match="given twice"):
        parse_volumes(["a1:/a", "a1:/b"])
    with pytest.raises(InvalidVolumeSpec, match="two volumes are mounted at /a"):
        parse_volumes(["a1:/a", "b1:/a/"])
    with pytest.raises(InvalidVolumeSpec, match=f"at most {MAX_VOLUMES}"):
        parse_volumes([f"v{i:02}:/v{i}" for i in range(MAX_VOLUMES + 1)])


def test_volume_names() -> None:
    assert check_volume_name("ab") == "ab"
    assert check_volume_name("x" * 128) == "x" * 128
    for bad in ("a", "x" * 129, "_x", "a/b", "a:b", ""):
        with pytest.raises(InvalidVolumeSpec):
            check_volume_name(bad)
