import json
from typing import Any

import pytest

from ember.oci.config import parse_config
from ember.oci.digest import Digest
from ember.oci.errors import InvalidConfig

D = "sha256:" + "3" * 64


def config(**over: Any) -> bytes:
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
            "Env": ["PATH=/usr/bin", "A=b=c"],
            "User": "1000:1000",
            "WorkingDir": "/app",
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
            "StopSignal": "SIGINT",
            "Volumes": {"/data": {}},
            "Labels": {"org.example": "yes"},
        },
        "rootfs": {"type": "layers", "diff_ids": [D]},
        "history": [{"created_by": "x"}],
    }
    doc.update(over)
    return json.dumps(doc).encode()


def test_parse_full() -> None:
    c = parse_config(config())
    assert (c.architecture, c.os, c.variant) == ("amd64", "linux", None)
    assert c.entrypoint == ["/bin/sh", "-c"]
    assert c.cmd == ["echo hi"]
    assert c.env == ["PATH=/usr/bin", "A=b=c"]
    assert c.user == "1000:1000"
    assert c.working_dir == "/app"
    assert c.exposed_ports == ["53/udp", "8080/tcp"]
    assert c.stop_signal == "SIGINT"
    assert c.volumes == ["/data"]
    assert c.labels == {"org.example": "yes"}
    assert c.diff_ids == [Digest.parse(D)]
    assert c.as_dict()["diff_ids"] == [D]


def test_docker_nulls_are_empty() -> None:
    c = parse_config(
        config(
            config={
                "Entrypoint": None,
                "Cmd": None,
                "Env": None,
                "ExposedPorts": None,
                "Labels": None,
                "Volumes": None,
            }
        )
    )
    assert c.entrypoint is None and c.cmd is None
    assert c.env == [] and c.exposed_ports == [] and c.labels == {} and c.volumes == []
    assert parse_config(config(config=None)).cmd is None


def test_empty_diff_ids_allowed() -> None:
    assert parse_config(config(rootfs={"type": "layers", "diff_ids": []})).diff_ids == []


@pytest.mark.parametrize(
    "over",
    [
        {"architecture": None},
        {"os": ""},
        {"architecture": 5},
        {"rootfs": None},
        {"rootfs": {"type": "other", "diff_ids": []}},
        {"rootfs": {"type": "layers"}},
        {"rootfs": {"type": "layers", "diff_ids": ["sha256:bad"]}},
        {"rootfs": {"type": "layers", "diff_ids": [5]}},
        {"config": {"Cmd": 5}},
        {"config": {"Entrypoint": ["sh", 1]}},
        {"config": {"Env": [1]}},
        {"config": {"Labels": {"a": 1}}},
        {"config": {"ExposedPorts": ["80/tcp"]}},
        {"config": {"User": 0}},
        {"config": []},
        # printed in listings and messages: a newline made a row of its own in image ls
        {"architecture": "amd64\nfake-row"},
        {"os": "\x1b[31mlinux"},
        {"variant": "v1/extra"},
        {"architecture": "x" * 65},
    ],
)
def test_invalid(over: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfig):
        parse_config(config(**over))


def test_string_cmd_and_entrypoint_read_as_one_argument() -> None:
    # Docker's strslice: a string is a list of one, not split and not given to a shell
    parsed = parse_config(config(config={"Entrypoint": "/bin/echo a b", "Cmd": "c d"}))
    assert parsed.entrypoint == ["/bin/echo a b"]
    assert parsed.cmd == ["c d"]


def test_platform_names_in_any_case_and_an_empty_variant_pass() -> None:
    parsed = parse_config(config(architecture="AMD64", os="Linux", variant=""))
    assert (parsed.architecture, parsed.os) == ("AMD64", "Linux")


def test_not_json() -> None:
    with pytest.raises(InvalidConfig):
        parse_config(b"\xff\xfe")
    with pytest.raises(InvalidConfig):
        parse_config(b"null")


def test_history() -> None:
    steps = [
        {"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c make", "comment": "c"},
        {"created_by": "ENV A=b", "empty_layer": True, "author": "me"},
        {},
    ]
    parsed = parse_config(config(history=steps)).history
    assert [h.as_dict() for h in parsed] == [
        {"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c make", "author": None,
         "comment": "c", "empty_layer": False},
        {"created": None, "created_by": "ENV A=b", "author": "me", "comment": None,
         "empty_layer": True},
        {"created": None, "created_by": None, "author": None, "comment": None,
         "empty_layer": False},
    ]  # fmt: skip
    assert parse_config(config(history=None)).history == []  # Docker's null
    without = json.loads(config())
    del without["history"]
    assert parse_config(json.dumps(without).encode()).history == []


def test_history_is_read_leniently() -> None:
    """Nothing needs the history to run an image: a config is never refused over it (Go
    takes null entries; ember read them as an error and the image became unreadable)."""
    odd = ["make", None, ["x"], {"created_by": 5, "empty_layer": "true", "comment": "ok"}]
    parsed = parse_config(config(history=odd)).history
    assert [h.as_dict() for h in parsed] == [
        {"created": None, "created_by": None, "author": None, "comment": None, "empty_layer": False},
    ] * 3 + [
        {"created": None, "created_by": None, "author": None, "comment": "ok", "empty_layer": False},
    ]  # fmt: skip
    assert parse_config(config(history="make")).history == []
