"""What the entry point makes of failures: one line on stderr, never a traceback for
something the host refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import EMBER, ember_env, run_ember
from tests.support.images import copy_layout


def ember(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, env=ember_env(home, EMBER_AGENT="0"), cwd=cwd, timeout=60)


def test_a_path_the_host_refuses_is_one_line(tmp_path: Path, busybox_layout: Path) -> None:
    """A state directory or an unpack target under a file: tracebacks before."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    image = f"oci:{busybox_layout}:latest"
    for home, args in (
        (a_file / "home", ["image", "pull", image]),
        (tmp_path / "home", ["image", "unpack", image, str(a_file / "root")]),
    ):
        res = ember(home, *args)
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith(f"ember: Not a directory: {a_file}"), res.stderr
        assert res.stderr.count("\n") == 1, res.stderr


def test_empty_and_invalid_names_are_said_so(tmp_path: Path, busybox_layout: Path) -> None:
    """An empty DIRECTORY unpacked into the working directory; an empty --platform meant
    "any"; an invalid or empty reference was "not in the local store (pull it: ...)"."""
    home = tmp_path / "home"
    image = f"oci:{busybox_layout}:latest"
    cases = [
        (["image", "unpack", image, ""], "DIRECTORY is empty"),
        (["image", "pull", "--platform", "", image], "invalid platform ''"),
        (["image", "prepare", "--platform", "", image], "invalid platform ''"),
        (["image", "inspect", ""], "reference"),
        (["image", "inspect", "Debian"], "repository names must be lowercase"),
        (["image", "rm", "a@sha256:zz"], "invalid"),
        (["image", "pull", "oci:" + os.fsdecode(b"/tmp/lay\xff") + ":latest"], "is not valid UTF-8"),
    ]
    workdir = tmp_path / "workdir"  # empty: an unpack into it would have succeeded
    workdir.mkdir()
    for args, message in cases:
        res = ember(home, *args, cwd=workdir)
        assert res.returncode != 0, (args, res.stdout)
        assert res.stderr.startswith("ember: ") and res.stderr.count("\n") == 1, res.stderr
        assert message in res.stderr, (args, res.stderr)
        assert "pull it" not in res.stderr
    assert not any(workdir.iterdir())  # nothing unpacked into the working directory


def test_gc_grace_must_be_a_finite_number(tmp_path: Path) -> None:
    """click.FloatRange(min=0) took "nan", a grace period that protects nothing."""
    for value in ("nan", "inf", "-1", "soon"):
        res = ember(tmp_path / "home", "gc", "--dry-run", "--content-grace", value)
        assert res.returncode == 2 and "is not a number of seconds" in res.stderr, res.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_an_error_quoting_a_huge_argument_stays_bounded(tmp_path: Path) -> None:
    """Messages quote what they refuse: a 100 KB machine name came back whole."""
    res = ember(tmp_path / "home", "run", "--name", "/" * 100_000, "oci:/nowhere:latest")
    assert res.returncode != 0
    assert res.stderr.startswith("ember: invalid machine name '///")
    assert re.search(r"\.\.\. \(9\d{4} more characters\)$", res.stderr.rstrip())
    assert len(res.stderr) < 2100 and res.stderr.count("\n") == 1


def test_what_a_message_quotes_cannot_drive_the_terminal(tmp_path: Path, busybox_layout: Path) -> None:
    """An OCI layout's tags are quoted in the error for a missing tag: an escape sequence
    (OSC: retitle the terminal) and a newline (a line ember did not write) went out raw."""
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    tagged = index["manifests"][0]
    index["manifests"] = [
        {**tagged, "annotations": {"org.opencontainers.image.ref.name": name}}
        for name in ("v1\x1b]0;PWNED\x07", "v2\nember: pulled fine")
    ]
    (layout / "index.json").write_text(json.dumps(index))
    res = ember(tmp_path / "home", "image", "pull", f"oci:{layout}:nope")
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and "\x1b" not in res.stderr and "\x07" not in res.stderr, res.stderr
    assert "(tags: v1\\x1b]0;PWNED\\x07, v2\\nember: pulled fine)" in res.stderr, res.stderr


@pytest.mark.root  # a snapshot pool: loop device, mount
@pytest.mark.integration
@pytest.mark.parametrize(
    ("signum", "status", "said"),
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")],
)
def test_sigterm_and_sighup_clean_up_as_ctrl_c_does(
    tmp_path: Path, debian_layout: Path, signum: int, status: int, said: str
) -> None:
    """``timeout``/``kill`` during a prepare, or its terminal closed (an ssh session
    dropped; through the agent, its client gone): the build's mount, loop device and
    lease were left (the process died at once) until the next command's recovery."""
    from tests.snapshots.conftest import make_home, teardown_home

    home = make_home(tmp_path / "home").root
    try:
        _terminate_a_prepare(home, debian_layout, signum, status, said)
    finally:
        teardown_home(make_home(home))  # and no mount or loop device of the build is left


def _terminate_a_prepare(home: Path, debian_layout: Path, signum: int, status: int, said: str) -> None:
    image = f"oci:{debian_layout}:latest"
    assert ember(home, "image", "pull", image).returncode == 0
    env = ember_env(home, EMBER_AGENT="0")
    mounts = home / "snapshots" / "mnt"
    proc = subprocess.Popen([EMBER, "image", "prepare", image], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (mounts.is_dir() and any(mounts.iterdir())):  # the layer is being applied
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert err.endswith(f"ember: {said}\n") and "" not in err.splitlines(), err  # no blank line
    assert str(home / "snapshots" / "mnt") not in Path("/proc/self/mounts").read_text()
    leases = json.loads(ember(home, "snapshot", "leases", "--json").stdout)
    assert leases == []
    snapshots = json.loads(ember(home, "snapshot", "ls", "--json").stdout)
    assert snapshots == []  # the half-built layer discarded


def test_a_hang_up_stops_the_registry_server_as_sigterm_does(tmp_path: Path) -> None:
    """SIGHUP raised the CLI's HungUp inside uvicorn's loop: two tracebacks, exit 0."""
    from tests.support.registry import free_port

    codes = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        port = free_port()
        server = subprocess.Popen(
            [EMBER, "server", "--listen", f"127.0.0.1:{port}"],
            env=ember_env(tmp_path / "home", EMBER_AGENT="0"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                 text=True).stdout.strip() == "":  # fmt: skip
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            server.send_signal(signum)
            _, err = server.communicate(timeout=60)
        finally:
            server.kill()
        assert "Traceback" not in err, err
        codes[signum] = server.returncode
    assert codes[signal.SIGHUP] == codes[signal.SIGTERM]


def test_a_reader_gone_is_sigpipes_status_quietly(tmp_path: Path) -> None:
    """`ember ... | head -1`: click turned EPIPE into exit status 1."""
    proc = subprocess.Popen([EMBER, "image", "ls"], env=ember_env(tmp_path / "home", EMBER_AGENT="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes anything: it starts in tens of ms
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and err == b"", err


def test_a_closed_stdout_is_no_traceback(tmp_path: Path) -> None:
    """`ember image ls >&-`: AttributeError: 'NoneType' object has no attribute 'isatty'."""
    proc = subprocess.run([EMBER, "image", "ls"], env=ember_env(tmp_path / "home", EMBER_AGENT="0"),
                          stderr=subprocess.PIPE, text=True, timeout=60,
                          preexec_fn=lambda: os.close(1))  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_tilde_in_ember_home_is_the_home_directory(tmp_path: Path) -> None:
    """EMBER_HOME='~/x' made ./~/x for the commands and ~/x for the client (homedir.py)."""
    work = tmp_path / "work"
    work.mkdir()
    env = ember_env(tmp_path / "unused", EMBER_AGENT="0", EMBER_HOME="~/state", HOME=str(tmp_path / "me"))
    res = run_ember("admin", "org", "create", "zed", env=env, cwd=work, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "me" / "state" / "ember.db").exists()
    assert not (work / "~").exists()


def test_a_signal_at_a_prompt_says_which(tmp_path: Path) -> None:
    """click turns an interrupt at a prompt into Abort() from None: SIGTERM and SIGHUP
    there said "interrupted", exit 130."""
    import pty

    for signum, code, said in ((signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")):
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [EMBER, "registry", "login", "127.0.0.1:1", "-u", "bob"],
            env=ember_env(tmp_path / "home", EMBER_AGENT="0"),
            stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        os.close(follower)
        try:
            assert proc.stderr is not None
            seen = ""
            while "Password" not in seen:  # (getpass says it on stderr without a terminal)
                chunk = proc.stderr.read(1)
                assert chunk, seen
                seen += chunk
            proc.send_signal(signum)
            rest = proc.stderr.read()
            assert proc.wait(60) == code, seen + rest
            assert f"ember: {said}" in rest
        finally:
            proc.kill()
            os.close(leader)


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    """click printed its usage, a hint and the error: three lines, not ember's one."""
    for args, status in ((["image", "pul"], 2), (["image", "pull"], 2), (["run", "--bogus", "x"], 125)):
        res = ember(tmp_path / "home", *args)
        assert res.returncode == status, res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("ember: "), res.stderr
        assert "--help)" in res.stderr


def test_a_group_without_a_command_prints_its_help(tmp_path: Path) -> None:
    """`ember` alone printed its help as one line of escaped newlines, as an error."""
    for group in ([], ["image"], ["snapshot"]):
        res = ember(tmp_path / "home", *group)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"Usage: {' '.join(['ember', *group])} [OPTIONS] COMMAND")
        assert "\nCommands:\n" in res.stdout and "\\n" not in res.stdout


def test_an_empty_home_on_the_command_line_is_refused(tmp_path: Path) -> None:
    """`ember --home "$DIR" rm -f ...` with DIR unset acted on the host's own state
    directory."""
    res = ember(tmp_path / "home", "--home", "", "ps")
    assert res.returncode == 2
    assert res.stderr.startswith("ember: Invalid value for --home: is empty"), res.stderr


def test_each_machines_error_is_bounded_and_printable(tmp_path: Path) -> None:
    """The errors of commands that go on past one machine (stop, rm, inspect, wait...)
    were printed raw: an escape sequence in an argument reached the terminal, and a
    120 KB argument came back whole."""
    for command in (["stop"], ["rm"], ["inspect"], ["wait"], ["kill"], ["start"]):
        res = ember(tmp_path / "home", *command, "x\x1b]0;pwned\x07", "y" * 120_000)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.splitlines()
        assert len(lines) == 2 and "\x1b" not in res.stderr, res.stderr[:300]
        assert "x\\x1b]0;pwned\\x07" in lines[0]
        assert len(lines[1]) < 2100


def test_a_reference_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (the shell passes them as they are) reached the image
    table's query: a traceback from image rm, inspect, tag, and from run."""
    bad = os.fsdecode(b"\xff")
    for args in (["image", "rm", bad], ["image", "inspect", bad], ["image", "tag", bad, "x"],
                 ["run", "--rm", bad]):  # fmt: skip
        res = ember(tmp_path / "home", *args)
        assert res.returncode == (125 if args[0] == "run" else 1), (args, res.stderr)
        assert "Traceback" not in res.stderr and "is not valid UTF-8" in res.stderr, res.stderr


def test_a_token_label_must_be_printable_text(tmp_path: Path) -> None:
    for label in (os.fsdecode(b"t\xff"), "x" * 201, "two\nlines"):
        res = ember(tmp_path / "home", "admin", "token", "create", "--org", "acme", "--name", label)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and "token label" in res.stderr, res.stderr


def test_an_ambiguous_machine_prefix_fails_alike_everywhere(tmp_path: Path) -> None:
    """As a usage error it was status 2 from `logs` and `port`, 1 from `rm`."""
    from ember.home import Home
    from ember.machines.store import MachineStore
    from tests.machines.test_store import make_state

    home = tmp_path / "home"
    store = MachineStore(Home(home))
    for prefix in ("ab", "ac"):  # (records made without a VM: exited machines)
        store.create(make_state(prefix + "0" * 62), None)
    for command in (["logs"], ["port"], ["rm"], ["inspect"], ["stop"], ["wait"]):
        res = ember(home, *command, "a")
        assert res.returncode == 1, (command, res.stderr)
        assert "'a' matches 2 machines" in res.stderr, res.stderr
