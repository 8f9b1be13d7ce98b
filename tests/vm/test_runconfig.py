"""RunConfig: Docker's argv/env rules, the wire format round trip, hostile input refused."""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.oci.config import parse_config
from ember.vm.errors import InvalidRunConfig, NoCommand
from ember.vm.runconfig import (
    HostEntry,
    Interface,
    Mount,
    RootDevice,
    RunConfig,
    RunOverrides,
    escape,
    parse_signal,
    unescape,
)


@dataclass
class Cfg:
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] | None = None
    user: str | None = None
    working_dir: str | None = None
    stop_signal: str | None = None


def test_argv_is_entrypoint_plus_cmd() -> None:
    rc = RunConfig.from_image(Cfg(entrypoint=["/ep", "-x"], cmd=["a", "b"]))
    assert rc.argv == ("/ep", "-x", "a", "b")


def test_run_args_replace_cmd() -> None:
    rc = RunConfig.from_image(Cfg(entrypoint=["/ep"], cmd=["a"]), RunOverrides(args=["z"]))
    assert rc.argv == ("/ep", "z")


def test_entrypoint_override_clears_cmd() -> None:
    rc = RunConfig.from_image(Cfg(entrypoint=["/ep"], cmd=["a"]), RunOverrides(entrypoint=["/x"]))
    assert rc.argv == ("/x",)
    rc = RunConfig.from_image(
        Cfg(entrypoint=["/ep"], cmd=["a"]), RunOverrides(entrypoint=["/x"], args=["1"])
    )
    assert rc.argv == ("/x", "1")


def test_empty_entrypoint_override_runs_args_only() -> None:
    rc = RunConfig.from_image(
        Cfg(entrypoint=["/ep"], cmd=["a"]), RunOverrides(entrypoint=[], args=["/bin/true"])
    )
    assert rc.argv == ("/bin/true",)


def test_no_command_is_an_error() -> None:
    with pytest.raises(NoCommand, match="no command"):
        RunConfig.from_image(Cfg(entrypoint=["/ep"], cmd=["a"]), RunOverrides(entrypoint=[]))
    with pytest.raises(NoCommand):
        RunConfig.from_image(Cfg())


def test_env_user_replaces_image_keeping_order() -> None:
    rc = RunConfig.from_image(
        Cfg(cmd=["x"], env=["PATH=/bin", "A=1", "B=2"]),
        RunOverrides(env=["A=9", "C=3=4", "E="]),
    )
    assert rc.env == ("PATH=/bin", "A=9", "B=2", "C=3=4", "E=")
    rc = RunConfig.from_image(Cfg(cmd=["x"]), RunOverrides(env={"K": "v w"}))
    assert rc.env == ("K=v w",)


@pytest.mark.parametrize("bad", ["NOEQUALS", "=value", "A\x00B=1"])
def test_bad_env_refused(bad: str) -> None:
    with pytest.raises(InvalidRunConfig):
        RunConfig.from_image(Cfg(cmd=["x"]), RunOverrides(env=[bad]))


def test_mount_options_up_to_1023_bytes() -> None:
    rc = RunConfig(argv=("x",), mounts=(Mount("/dev/vdb", "/data", "ext4", "o" * 1023),))
    assert RunConfig.parse(rc.render()) == rc


def test_image_env_entries_without_a_value_or_a_name_are_dropped_like_docker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An image's Env entry without '=' (or with an empty name) made `ember run` refuse
    the image; Docker runs it.  A bare KEY sets nothing, and does not unset a value the
    same list set before it (Docker's ReplaceOrAppendEnvValues only unsets keys of its
    defaults); an empty name is skipped with a warning."""
    image_env = ["A=1", "BARE", "A", "=nameless", "", "B=2=3", "C="]
    with caplog.at_level("WARNING", logger="ember.vm"):
        rc = RunConfig.from_image(Cfg(cmd=["x"], env=image_env))
    assert rc.env == ("A=1", "B=2=3", "C=")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "'=nameless'" in warnings[0], warnings
    # the user's -e after it sets the key as usual
    rc = RunConfig.from_image(Cfg(cmd=["x"], env=image_env), RunOverrides(env=["BARE=u"]))
    assert rc.env == ("A=1", "B=2=3", "C=", "BARE=u")
    # what cannot be passed at all is still refused
    with pytest.raises(InvalidRunConfig):
        RunConfig.from_image(Cfg(cmd=["x"], env=["A\x00B=1"]))


def test_user_workdir_and_signal_from_image_then_overrides() -> None:
    cfg = Cfg(cmd=["x"], user="nobody", working_dir="/srv", stop_signal="SIGQUIT")
    rc = RunConfig.from_image(cfg)
    assert (rc.user, rc.workdir, rc.stop_signal) == ("nobody", "/srv", int(signal.SIGQUIT))
    rc = RunConfig.from_image(
        cfg, RunOverrides(user="1:2", workdir="/tmp", stop_signal="INT", stop_timeout=3)
    )
    assert (rc.user, rc.workdir, rc.stop_signal, rc.stop_timeout) == ("1:2", "/tmp", 2, 3)
    # empty options are no options, as docker merges them: `-u ""` ran as root
    rc = RunConfig.from_image(cfg, RunOverrides(user="", workdir="", stop_signal=""))
    assert (rc.user, rc.workdir, rc.stop_signal) == ("nobody", "/srv", int(signal.SIGQUIT))


def test_relative_workdir_refused() -> None:
    with pytest.raises(InvalidRunConfig, match="absolute"):
        RunConfig.from_image(Cfg(cmd=["x"]), RunOverrides(workdir="rel"))


@pytest.mark.parametrize(
    ("text", "num"),
    [("SIGTERM", 15), ("term", 15), ("9", 9), ("SIGRTMIN+3", int(signal.SIGRTMIN) + 3), (10, 10),
     ("RTMIN", int(signal.SIGRTMIN)), ("SIGRTMAX", int(signal.SIGRTMAX)),
     ("SIGRTMAX-1", int(signal.SIGRTMAX) - 1), ("rtmax-14", int(signal.SIGRTMAX) - 14)],
)  # fmt: skip
def test_parse_signal(text: str | int, num: int) -> None:
    assert parse_signal(text) == num


@pytest.mark.parametrize(
    "bad", ["SIGNOPE", "0", "999", "", "\u0669", "SIGRTMIN-1", "SIGRTMAX+1", "SIGRTMAX-40",
            "SIGRTMIN+99", "SIGRTMIN+\u0663", "RTMAX-\u0661"],
)  # fmt: skip
def test_parse_signal_refuses(bad: str) -> None:
    with pytest.raises(InvalidRunConfig):
        parse_signal(bad)


@pytest.mark.parametrize("bad", ["9" * 5000, "SIGRTMIN+" + "9" * 5000])
def test_a_huge_stop_signal_from_an_image_is_refused_not_a_crash(bad: str) -> None:
    """Python refuses to convert more than 4300 digits: a ValueError traceback."""
    with pytest.raises(InvalidRunConfig, match="unknown stop signal") as e:
        RunConfig.from_image(Cfg(cmd=["x"], stop_signal=bad))
    assert len(str(e.value)) < 100


@pytest.mark.parametrize("value", ["", "a b", "tab\there", "nl\nx", "back\\slash", "ünï", " \\s "])
def test_escape_round_trip(value: str) -> None:
    enc = escape(value)
    assert b" " not in enc and b"\n" not in enc and b"\t" not in enc
    assert unescape(enc) == value


def full_config() -> RunConfig:
    return RunConfig(
        argv=("/bin/sh", "-c", "echo 'a b'\n", ""),
        env=("PATH=/bin", "X=a\\b c"),
        user="app:staff",
        workdir="/srv/my dir",
        hostname="web-1",
        hosts=(HostEntry("10.0.0.1", ("gw", "gateway.local")),),
        nameservers=("10.0.0.1", "2001:db8::1"),
        search=("example.com",),
        network=(Interface("eth0", "10.0.0.2", 30, "10.0.0.1", 1420),),
        mounts=(Mount("/dev/vdb", "/data", "ext4", "rw,noatime"),),
        stop_signal=3,
        stop_timeout=5,
        modules=("vsock",),
        open_stdin=True,
        tty=(30, 100),
    )


def test_lists_are_stored_as_tuples() -> None:
    rc = RunConfig(
        argv=["/x", "y"],  # type: ignore[arg-type]
        network=[Interface("eth0", "10.0.0.2", 24)],  # type: ignore[arg-type]
        hosts=(HostEntry("10.0.0.1", ["a", "b"]),),  # type: ignore[arg-type]
    )
    assert rc.argv == ("/x", "y") and isinstance(rc.network, tuple)
    assert RunConfig.parse(rc.render()) == rc


def test_hostname_up_to_64_bytes() -> None:
    assert RunConfig(argv=("/x",), hostname="h" * 64).hostname == "h" * 64


def test_render_parse_round_trip() -> None:
    rc = full_config()
    data = rc.render()
    assert data.startswith(b"ember-run-config 1\n") and data.endswith(b"\nend\n")
    assert b"arg echo\\s'a\\sb'\\n\n" in data
    assert b"arg \n" in data  # the empty argument is one empty field
    assert RunConfig.parse(data) == rc


def test_minimal_defaults_round_trip() -> None:
    rc = RunConfig(argv=("/hello",))
    assert RunConfig.parse(rc.render()) == rc
    assert b"stdin" not in rc.render() and b"tty" not in rc.render()


def test_stdin_and_terminal_records() -> None:
    rc = RunConfig(argv=("/bin/sh",), open_stdin=True, tty=(0, 0))
    data = rc.render()
    assert b"\nstdin\n" in data and b"\ntty 0 0\n" in data
    assert RunConfig.parse(data) == rc
    assert RunConfig(argv=("/x",), tty=[24, 80]).tty == (24, 80)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-4],  # no end record
        lambda d: d[:-1],  # no final newline
        lambda d: d.replace(b"ember-run-config 1", b"ember-run-config 2"),
        lambda d: d.replace(b"end\n", b"bogus x\nend\n"),
        lambda d: d.replace(b"end\n", b"user a\nend\n"),  # duplicate single record
        lambda d: d.replace(b"end\n", b"arg a\\q\nend\n"),  # unknown escape
        lambda d: d.replace(b"end\n", b"arg a\tb\nend\n"),  # raw tab
        lambda d: d.replace(b"end\n", b"arg a\x00\nend\n"),
        lambda d: d.replace(b"end\n", b"net eth1 10.0.0.3 - 1500\nend\n"),  # no prefix
        lambda d: d.replace(b"end\n", b"stop_timeout -1\nend\n"),
        lambda d: d.replace(b"end\n", b"host 10.0.0.9\nend\n"),  # too few fields
        lambda d: d.replace(b"nofile 1048576", b"nofile 99999999999999"),
        lambda d: d.replace(b"stdin\n", b"stdin 1\n"),
        lambda d: d.replace(b"end\n", b"stdin\nend\n"),  # twice
        lambda d: d.replace(b"tty 30 100", b"tty 30"),
        lambda d: d.replace(b"tty 30 100", b"tty 30 x"),
    ],
)
def test_parse_refuses_malformed(mutate) -> None:  # type: ignore[no-untyped-def]
    data = full_config().render()
    with pytest.raises(InvalidRunConfig):
        RunConfig.parse(mutate(data))


@pytest.mark.parametrize(
    "kw",
    [
        {"hostname": "-bad"},
        {"hostname": "a" * 65},
        {"hostname": "web\n"},
        {"modules": ("virtio_net\n",)},
        {"network": (Interface("eth0", "10.0.0.2", 24, "10.1.0.1"),)},  # gateway off-net
        {"network": (Interface("eth0", "::1", 64),)},
        {"network": (Interface("eth0", "10.0.0.2", 33),)},
        {"network": (Interface("eth0", "10.0.0.2", 24, mtu=20),)},
        {"mounts": (Mount("/dev/vdb", "/"),)},
        {"mounts": (Mount("/dev/vdb", "/a/../b"),)},
        {"mounts": (Mount("/dev/vdb", "//"),)},  # the root too, once normalized
        {"mounts": (Mount("/dev/vdb", "/."),)},
        {"mounts": (Mount("/dev/vdb", "/./"),)},
        {"mounts": (Mount("/dev/vdb", "///./."),)},
        # longer than the guest's 1023 bytes: it cut them (a trailing "ro" was lost)
        {"mounts": (Mount("/dev/vdb", "/data", "ext4", "rw," * 341 + "ro"),)},
        {"mounts": (Mount("/dev/vdb", "/data", "ext4", "\udcff" * 1024),)},
        {"root": RootDevice(options="noatime," * 128)},
        {"mounts": (Mount("vdb", "/data"),)},
        {"nameservers": ("not-an-ip",)},
        {"hosts": (HostEntry("10.0.0.1", ()),)},
        {"user": "a:b:c"},
        {"user": "u" * 256},  # ember-init's limit: refused before a boot
        {"user": "\udcff" * 256},  # counted in the bytes it is rendered as
        {"modules": ("../evil",)},
        {"stop_timeout": -1},
        {"tty": (70000, 80)},
        {"tty": (24, -1)},
    ],
)
def test_invalid_fields_refused(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidRunConfig):
        RunConfig(argv=("/x",), **kw)  # type: ignore[arg-type]


def _layout_config(layout: Path) -> bytes:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return (
        layout / "blobs" / "sha256" / manifest["config"]["digest"].split(":", 1)[1]
    ).read_bytes()


def test_from_a_real_image_config(multilayer_layout: Path) -> None:
    """buildah's config for the multilayer image, through ember.oci.config.parse_config."""
    config = parse_config(_layout_config(multilayer_layout))
    rc = RunConfig.from_image(config)
    assert rc.argv == ("/bin/echo", "entrypoint", "default-cmd")
    assert "GREETING=hello" in rc.env
    assert (rc.user, rc.workdir, rc.stop_signal) == ("app", "/home/app", int(signal.SIGTERM))
    rc = RunConfig.from_image(config, RunOverrides(args=["x"], env=["GREETING=bye"]))
    assert rc.argv == ("/bin/echo", "entrypoint", "x")
    assert "GREETING=bye" in rc.env and "GREETING=hello" not in rc.env
    assert RunConfig.parse(rc.render()) == rc


_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))


@settings(max_examples=200, deadline=None)
@given(
    argv=st.lists(_text, min_size=1, max_size=5),
    env=st.lists(st.tuples(st.text(st.characters(blacklist_characters="=\x00",
                                                 blacklist_categories=("Cs",)), min_size=1),
                           _text), max_size=4),
    user=st.sampled_from(["", "app", "1000", "app:staff", "1:2"]),
    workdir=st.one_of(st.just(""), _text.map(lambda t: "/" + t)),
)  # fmt: skip
def test_render_parse_round_trip_any_text(
    argv: list[str], env: list[tuple[str, str]], user: str, workdir: str
) -> None:
    rc = RunConfig(
        argv=tuple(argv), env=tuple(f"{k}={v}" for k, v in env), user=user, workdir=workdir
    )
    data = rc.render()
    assert b"\x00" not in data and b"\t" not in data
    assert RunConfig.parse(data) == rc


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_random_bytes_only_raises_invalid(data: bytes) -> None:
    with contextlib.suppress(InvalidRunConfig):
        RunConfig.parse(b"ember-run-config 1\n" + data)


def test_a_config_must_leave_room_for_what_the_host_adds() -> None:
    """An image's environment near the guest's 1 MiB passed `ember run` (the size was
    checked only once rendered with the network, after the disk clone), and the same
    machine restored from a template (clock and seed added) failed in the guest."""
    from ember.vm.runconfig import HOST_RECORDS_ROOM, MAX_CONFIG_SIZE, restore_message

    near = RunConfig.from_image(Cfg(cmd=["x"], env=["A=" + "x" * (MAX_CONFIG_SIZE - 400)]))
    assert len(near.render()) <= MAX_CONFIG_SIZE  # it renders...
    with pytest.raises(InvalidRunConfig, match="kept for the machine's network"):
        near.check_room()  # ...but leaves no room
    with pytest.raises(InvalidRunConfig, match="with the clock and seed"):
        restore_message(near.render(), 1, bytes(256))
    fits = RunConfig.from_image(
        Cfg(cmd=["x"], env=["A=" + "x" * (MAX_CONFIG_SIZE - HOST_RECORDS_ROOM - 200)])
    )
    fits.check_room()
    assert len(restore_message(fits.render(), 1, bytes(256))) <= MAX_CONFIG_SIZE
