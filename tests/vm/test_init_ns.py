"""ember-init's config logic as PID 1 of fresh PID/mount/UTS/net/IPC namespaces,
chrooted into the busybox image (no VM): ``ember-init --test``.

Checks Docker's semantics as the guest applies them: argv and PATH lookup, env
(HOME from passwd, default PATH), users and groups from the image's own files,
workdir, exit codes and signals, stop requests (StopSignal, then SIGKILL after the
timeout), hostname / hosts / resolv.conf, pseudo file systems, zombie reaping.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.machines.execproto import (
    EXIT,
    REFUSED,
    STARTED,
    STDERR,
    STDIN,
    STDIN_END,
    STDOUT,
    ExecRequest,
    FrameReader,
    exit_code,
    frame,
    refusal,
    resize_frame,
    signal_frame,
    stdin_frames,
)
from ember.vm.errors import InvalidRunConfig
from ember.vm.runconfig import HostEntry, Interface, Mount, RunConfig, RunOverrides

pytestmark = pytest.mark.root


@dataclass
class Result:
    returncode: int
    stdout: str
    console: str  # init's own messages plus the program's stderr
    status: dict[str, object] | None


@pytest.fixture
def root(busybox_rootfs: Path, ember_init: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "root"
    subprocess.run(["cp", "-a", str(busybox_rootfs), str(dest)], check=True)
    shutil.copy2(ember_init, dest / ".ember-init")
    return dest


#: Run before init, in its new mount namespace: a private tmpfs on the root's /dev with
#: the host's usual device nodes bound in.  Init mounts devtmpfs on a /dev that is no
#: tmpfs, and devtmpfs is one instance for the whole kernel: its /dev/core and other
#: links landed in the host's own /dev.  (A VM's is devtmpfs: tests/vm/test_boot.py.)
_PRIVATE_DEV = (
    'mount -t tmpfs -o mode=0755 tmpfs "$0/dev" && '
    'for n in null zero full random urandom tty kmsg; do '
    ': > "$0/dev/$n" && mount --bind "/dev/$n" "$0/dev/$n" || exit 1; done && '
    'exec chroot "$0" "$@"'
)


def _argv(root: Path, control: bool, exec_socket: bool = False) -> list[str]:
    # --kill-child: a run that times out (init hung) must not leave its PID 1 behind,
    # holding the output pipes open.  --cgroup: init mounts cgroup2, and a mount from
    # the host's own cgroup namespace sets the host's cgroup2 options to init's.
    argv = [
        "unshare",
        "--pid",
        "--kill-child",
        "--mount",
        "--uts",
        "--net",
        "--ipc",
        "--cgroup",
        "sh",
        "-c",
        _PRIVATE_DEV,
        str(root),
        "/.ember-init",
        "--test",
        "--config",
        "/.ember-config",
        "--status",
        "/.ember-status",
    ]
    if control:
        argv += ["--control", "/.ember-control"]
    if exec_socket:
        argv += ["--exec", "/.ember-exec.sock"]
    return argv


def _result(root: Path, returncode: int, stdout: str, console: str) -> Result:
    status_file = root / ".ember-status"
    # bytes, as the host parses them: the report must be UTF-8 JSON whatever it quotes
    status = json.loads(status_file.read_bytes()) if status_file.exists() else None
    return Result(returncode, stdout, console, status)


def run_init(root: Path, rc: RunConfig | bytes, timeout: float = 60) -> Result:
    (root / ".ember-config").write_bytes(rc if isinstance(rc, bytes) else rc.render())
    p = subprocess.run(
        _argv(root, False),
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=timeout,
    )
    return _result(root, p.returncode, p.stdout, p.stderr)


def sh(script: str, **kw: object) -> RunConfig:
    return RunConfig(argv=("/bin/sh", "-c", script), **kw)  # type: ignore[arg-type]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---- argv, env, exit codes --------------------------------------------------------


def test_exit_zero_with_path_lookup_and_default_env(root: Path) -> None:
    r = run_init(root, RunConfig(argv=("echo", "hello", "a b", ""), env=("FOO=bar",)))
    assert r.stdout == "hello a b \n"
    assert r.returncode == 0
    assert last_line(r.console) == "ember-init: exit code 0"
    assert r.status == {"exit_code": 0, "signal": None, "oom_killed": False}


def test_env_home_from_passwd_default_path_and_hostname(root: Path) -> None:
    r = run_init(
        root, sh('echo "$FOO|$HOME|$PATH|$HOSTNAME"; env | sort', env=("FOO=x y",), hostname="box")
    )
    first = r.stdout.splitlines()[0]
    assert first == "x y|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|box"
    # an image's PATH and HOME are kept, not replaced
    r = run_init(root, sh('echo "$HOME|$PATH"', env=("PATH=/bin", "HOME=/custom")))
    assert r.stdout == "/custom|/bin\n"


def test_exit_code_seven(root: Path) -> None:
    r = run_init(root, sh("echo out; echo err >&2; exit 7"))
    assert (r.returncode, r.stdout) == (7, "out\n")
    assert "err" in r.console
    assert last_line(r.console) == "ember-init: exit code 7"
    assert r.status == {"exit_code": 7, "signal": None, "oom_killed": False}


def test_killed_by_signal_is_128_plus(root: Path) -> None:
    r = run_init(root, sh("kill -TERM $$; sleep 5"))
    assert r.returncode == 143
    assert last_line(r.console) == "ember-init: killed by signal 15"
    assert r.status == {"exit_code": 143, "signal": 15, "oom_killed": False}


def test_command_not_found_and_not_executable(root: Path) -> None:
    r = run_init(root, RunConfig(argv=("no-such-program",)))
    assert r.returncode == 127
    assert "executable file not found in $PATH" in r.console
    # the report says the program never ran (no restart policy runs it again), which a
    # program's own exit 127 does not
    assert r.status["error"] == "exec no-such-program: executable file not found in $PATH"
    assert r.status["not_started"] is True
    r = run_init(root, sh("exit 127"))
    assert r.returncode == 127 and "error" not in r.status and "not_started" not in r.status
    # an empty PATH searches nowhere (Docker), not the working directory as execvp would
    (root / "here").write_text("#!/bin/sh\necho ran\n")
    (root / "here").chmod(0o755)
    r = run_init(root, RunConfig(argv=("here",), env=("PATH=",)))
    assert (r.returncode, r.stdout) == (127, "")
    r = run_init(root, RunConfig(argv=("here",), env=("PATH=/nowhere:",)))
    assert (r.returncode, r.stdout) == (0, "ran\n")
    (root / "notexec").write_text("#!/bin/sh\n")
    r = run_init(root, RunConfig(argv=("/notexec",)))
    assert r.returncode == 126
    assert "permission denied" in r.console.lower()
    assert r.status["error"] == "exec /notexec: Permission denied"


def test_the_path_search_goes_on_past_entries_that_cannot_be_looked_in(root: Path) -> None:
    """Only ENOENT, ENOTDIR and EACCES let the search go on: a PATH entry that is a link
    loop (ELOOP) or has a name too long for the file system (ENAMETOOLONG) ended it with
    126, though a later entry had the program."""
    os.symlink("/loopdir", root / "loopdir")
    for path in ("/loopdir:/bin", "/" + "n" * 300 + ":/bin", "/loopdir:/" + "n" * 300 + ":/bin"):
        r = run_init(root, RunConfig(argv=("echo", "found"), env=(f"PATH={path}",)))
        assert (r.returncode, r.stdout) == (0, "found\n"), (path, r.console)
    # nothing found after them: not found, and a non-executable one seen is still 126
    r = run_init(root, RunConfig(argv=("nowhere",), env=("PATH=/loopdir:/bin",)))
    assert r.returncode == 127, r.console
    (root / "srv").mkdir()
    (root / "srv" / "nowhere").write_text("#!/bin/sh\n")
    r = run_init(root, RunConfig(argv=("nowhere",), env=("PATH=/srv:/loopdir:/bin",)))
    assert r.returncode == 126, r.console
    assert r.status is not None and r.status["error"] == "exec nowhere: Permission denied"


@pytest.mark.parametrize(
    ("argv", "code", "error", "not_started"),
    [
        (("/nothere",), 127, "exec /nothere: No such file or directory", True),
        (("/loop",), 126, "exec /loop: Symbolic link loop", True),  # (musl's words for ELOOP)
        (("/etc/passwd/x",), 127, "exec /etc/passwd/x: Not a directory", True),
        (("/garbage",), 126, "exec /garbage: Exec format error", True),
        # a name too long for the file system: the same command fails the same way
        (("/" + "n" * 300,), 126, f"exec /{'n' * 300}: Filename too long", True),
        # a single argument over the kernel's 128 KiB: E2BIG, which a smaller command
        # or a later version of the config passes; the host may try it again
        (("/bin/true", "a" * 200_000), 126, "exec /bin/true: Argument list too long", False),
    ],
)
def test_not_started_only_when_the_start_fails_the_same_way_again(
    root: Path, argv: tuple[str, ...], code: int, error: str, not_started: bool
) -> None:
    """Any start error said not_started (the host's restart policy gives up), transient
    ones too (ENOMEM, EAGAIN, ETXTBSY, E2BIG, setgroups/setuid): only ENOENT, ENOTDIR,
    EACCES, ENOEXEC and ELOOP (and an unknown user, a workdir) say so now."""
    os.symlink("/loop", root / "loop")
    (root / "garbage").write_bytes(b"\x7fELF not really")
    (root / "garbage").chmod(0o755)
    r = run_init(root, RunConfig(argv=argv))
    assert r.returncode == code, r.console
    assert r.status is not None and r.status["error"] == error
    assert r.status.get("not_started", False) is not_started


@pytest.mark.parametrize("program", ["/nonexistent/" + "x" * 3000, "y" * 3000])
def test_a_long_command_that_cannot_run_gives_one_bounded_line(root: Path, program: str) -> None:
    """The message's length came from snprintf's return value, not from what fit in its
    600-byte buffer: ~6 KB of init's stack (NULs and all) went to the console."""
    (root / ".ember-config").write_bytes(RunConfig(argv=(program,)).render())
    p = subprocess.run(_argv(root, False), capture_output=True, timeout=60)
    assert p.returncode in (126, 127)  # 126: a name too long for the kernel to look up (musl words it "Filename too long")
    assert b"\0" not in p.stderr and len(p.stderr) < 2000
    execs = [ln for ln in p.stderr.decode().splitlines() if ln.startswith("ember-init: exec ")]
    assert execs, p.stderr  # on stderr and on the console (both stderr here)
    for line in execs:
        assert len(line) < 600
        assert line.endswith(
            ("No such file or directory", "Filename too long", "executable file not found in $PATH")
        ), line


def test_a_long_error_keeps_the_exit_report_whole(root: Path) -> None:
    """An escape near the end of the 1 KB report left no room for its closing "}\\n":
    the host could not parse it and lost the error message."""
    r = run_init(root, sh("true", user="aaaaa" + "\x01" * 200))
    assert r.returncode == 125
    assert (root / ".ember-status").read_bytes().endswith(b"}\n")
    assert r.status is not None and r.status["exit_code"] == 125
    assert "unable to find user aaaaa\x01" in str(r.status["error"])


def test_the_exit_report_is_utf8_whatever_the_message_quotes(root: Path) -> None:
    """The image's bytes went into the report raw (a user name with 0xff), and a message
    cut at init's 512-byte buffer could end inside a character: the host's parser, which
    takes UTF-8 JSON only, dropped the whole report (and with it the exit code)."""
    r = run_init(root, sh("true", user="\udcffx"))  # the byte 0xff (surrogateescape)
    assert r.returncode == 125
    assert r.status is not None and r.status["exit_code"] == 125
    # a byte that is no UTF-8 is escaped as its Latin-1 reading
    assert r.status["error"] == "unable to find user \u00ffx: no matching entries in passwd file"
    # whole characters go through as they are
    r = run_init(root, sh("true", user="ünïcödé"))
    assert r.status is not None and r.status["exit_code"] == 125
    assert r.status["error"] == "unable to find user ünïcödé: no matching entries in passwd file"
    # what is UTF-8 and what is not, as Python's strict decoder sees it: overlong forms,
    # a surrogate, past U+10FFFF, a lone continuation byte, a character cut short
    name = (
        b"a\xe0\x80\x80\xed\xa0\x80\xf4\x90\x80\x80\xc0\xaf"  # invalid, byte by byte
        b"\x80\xe2\x82x\xf0\x9f\x98\x80\xe2\x82\xac"  # lone, cut short, valid 4 and 3 bytes
    )
    text = name.decode("utf-8", "surrogateescape")
    r = run_init(root, sh("true", user=text))
    assert r.status is not None and r.status["exit_code"] == 125
    latin1 = "".join(chr(ord(c) - 0xDC00) if "\udc80" <= c <= "\udcff" else c for c in text)
    expected = f"unable to find user {latin1}: no matching entries in passwd file"
    assert r.status["error"] == expected
    # too long a name for mkdir: the message is cut after 511 bytes, inside an "é"
    prefix = "cannot create working directory /a"
    r = run_init(root, sh("true", workdir="/a" + "é" * 250))
    assert r.returncode == 125
    assert r.status is not None and r.status["exit_code"] == 125
    error = str(r.status["error"])
    assert error.startswith(prefix + "é" * 200), error
    assert set(error[len(prefix) :]) == {"é"}, error  # the cut character left out


# ---- users --------------------------------------------------------------------------


def test_user_by_name_gets_passwd_gid_home_and_supplementary_groups(root: Path) -> None:
    r = run_init(root, sh('id -u; id -g; id -G; echo "$HOME"', user="app"))
    assert r.stdout.split("\n")[:4] == ["1000", "1000", "1000 2000", "/home/app"]


def test_user_uid_gid_numeric_has_no_supplementary_groups(root: Path) -> None:
    r = run_init(root, sh("id -u; id -g; id -G", user="1000:2000"))
    assert r.stdout.split() == ["1000", "2000", "2000"]


def test_user_name_and_group_name(root: Path) -> None:
    r = run_init(root, sh("id -u; id -g; id -G", user="app:extra"))
    assert r.stdout.split() == ["1000", "2000", "2000"]


def test_numeric_uid_without_passwd_entry(root: Path) -> None:
    r = run_init(root, sh('id -u; id -g; echo "$HOME"', user="4242"))
    assert r.stdout.split() == ["4242", "0", "/"]


def test_numeric_user_is_always_an_id(root: Path) -> None:
    # a user *named* 1000 must not win over uid 1000 (CVE-2016-3697)
    with open(root / "etc" / "passwd", "a") as f:
        f.write("1000:x:3333:3333::/nowhere:/bin/sh\n")
    r = run_init(root, sh("id -u", user="1000"))
    assert r.stdout.strip() == "1000"


def test_passwd_line_without_shell_and_group_line_without_members(root: Path) -> None:
    """Lines runc takes (missing trailing fields are empty) were skipped."""
    with open(root / "etc" / "passwd", "a") as f:
        f.write("short:x:1100:1100::/home/short\n")
    with open(root / "etc" / "group", "a") as f:
        f.write("bare:x:2100\n")
    r = run_init(root, sh('id -u; id -g; echo "$HOME"', user="short"))
    assert r.returncode == 0, r.console
    assert r.stdout.split() == ["1100", "1100", "/home/short"]
    r = run_init(root, sh("id -u; id -g", user="app:bare"))
    assert r.returncode == 0, r.console
    assert r.stdout.split() == ["1000", "2100"]


def test_crlf_passwd_and_group(root: Path) -> None:
    """A file with CRLF line endings left '\\r' on each line's last field: a member
    "crlf\\r" was never the user crlf, a 3-field group's gid was not a number."""
    (root / "etc" / "passwd").write_bytes(
        b"root:x:0:0:root:/root:/bin/sh\r\ncrlf:x:1200:1200::/home/crlf:/bin/sh\r\n"
    )
    (root / "etc" / "group").write_bytes(
        b"root:x:0:\r\ncrlf:x:1200:\r\nteam:x:2200:other,crlf\r\nbare:x:2300\r\n"
    )
    r = run_init(root, sh('id -u; id -g; id -G; echo "$HOME"', user="crlf"))
    assert r.returncode == 0, r.console
    assert r.stdout.split("\n")[:4] == ["1200", "1200", "1200 2200", "/home/crlf"]
    r = run_init(root, sh("id -g", user="crlf:bare"))
    assert (r.returncode, r.stdout) == (0, "2300\n"), r.console


def test_passwd_and_group_lines_are_read_as_runc_reads_them(root: Path) -> None:
    """runc trims the white space around each line (Go's unicode.IsSpace, NBSP too),
    splits a group line on every ':' (an extra field is not part of the member list)
    and reads NUL as a byte like any other; init kept the spaces, gave a group's extra
    field to its last member, and stopped reading at the first NUL."""
    with open(root / "etc" / "passwd", "ab") as f:
        f.write(b"  spacey:x:1300:1300::/home/spacey:/bin/sh \t\n")
        f.write(b"nul\0x:x:1400:1400::/:/bin/sh\n")  # everything after it was lost
        f.write(b"after:x:1500:1500::/home/after:/bin/sh\n")
        f.write(b"ap\0p:x:1600:1600::/:/bin/sh\n")  # no user "ap" here
    with open(root / "etc" / "group", "ab") as f:
        f.write(b" team:x:2400:other,spacey \r\n")
        f.write(b"uni:x:2500:spacey\xc2\xa0\n")  # U+00A0 at the end: white space too
        f.write(b"\xe3\x80\x80wide:x:2600:spacey:junk\n")  # U+3000 first; a fifth field
        f.write(b"odd:x:2700:sp\0acey,,spacey\0\n")  # NULs in names: no match
    r = run_init(root, sh('id -u; id -g; id -G; echo "$HOME"', user="spacey"))
    assert r.returncode == 0, r.console
    assert r.stdout.split("\n")[:4] == ["1300", "1300", "1300 2400 2500 2600", "/home/spacey"]
    r = run_init(root, sh('id -u; echo "$HOME"', user="after"))
    assert (r.returncode, r.stdout) == (0, "1500\n/home/after\n"), r.console
    r = run_init(root, sh("id -g", user="after:wide"))
    assert (r.returncode, r.stdout) == (0, "2600\n"), r.console
    r = run_init(root, sh("echo should-not-run", user="ap"))
    assert r.returncode == 125
    assert "unable to find user ap: no matching entries in passwd file" in r.console


def test_passwd_or_group_over_1_mib_is_refused(root: Path) -> None:
    """Up to 16 MiB were read into init's locked memory (a guest may have 128 MiB).  At
    most 1 MiB now; a larger file is refused (125) rather than read in part, which would
    miss the entries after the first MiB."""
    passwd = root / "etc" / "passwd"
    base = passwd.read_bytes()
    pad = (1 << 20) - len(base) - 2
    passwd.write_bytes(base + b"#" + b"x" * pad + b"\n")
    assert passwd.stat().st_size == 1 << 20
    r = run_init(root, sh("id -u", user="app"))
    assert (r.returncode, r.stdout) == (0, "1000\n"), r.console
    passwd.write_bytes(base + b"#" + b"x" * (pad + 1) + b"\n")
    for user in ("app", "4242", ""):
        r = run_init(root, sh("echo should-not-run", user=user))
        assert (r.returncode, r.stdout) == (125, ""), r.console
        message = "/etc/passwd is larger than 1 MiB: not reading it"
        assert f"ember-init: error: {message}" in r.console
        assert r.status is not None and r.status["error"] == message
        assert r.status["not_started"] is True
    passwd.write_bytes(base)
    group = root / "etc" / "group"
    group.write_bytes(group.read_bytes() + b"#" * (1 << 20) + b"\n")
    r = run_init(root, sh("echo should-not-run", user="app"))
    assert r.returncode == 125
    assert r.status is not None
    assert r.status["error"] == "/etc/group is larger than 1 MiB: not reading it"
    r = run_init(root, sh("id -g", user="app:4000"))  # a numeric group: no group file read
    assert (r.returncode, r.stdout) == (0, "4000\n"), r.console


@pytest.mark.parametrize(
    "line",
    [
        "evil:x:99999999999:0::/:/bin/sh",  # past 2^31-1
        "evil:x:-1:0::/:/bin/sh",
        "evil:x: 5:0::/:/bin/sh",
        "evil:x:5:0x10::/:/bin/sh",
        "evil:x::0::/:/bin/sh",
        "evil:x:5\r:0::/:/bin/sh",  # only a line's last '\\r' is its ending
    ],
)
def test_hostile_numeric_passwd_fields_are_still_refused(root: Path, line: str) -> None:
    with open(root / "etc" / "passwd", "a") as f:
        f.write(line + "\r\n")
    r = run_init(root, sh("id -u", user="evil"))
    assert r.returncode == 125
    assert "unable to find user evil" in r.console


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("ghost", "unable to find user ghost: no matching entries in passwd file"),
        ("app:nogroup-here", "unable to find group nogroup-here"),
    ],
)
def test_unknown_user_or_group_is_an_error(root: Path, user: str, message: str) -> None:
    r = run_init(root, sh("echo should-not-run", user=user))
    assert r.returncode == 125
    assert r.stdout == ""
    assert message in r.console
    assert r.status is not None and r.status["exit_code"] == 125
    assert message in str(r.status["error"])
    assert r.status["not_started"] is True  # the same run fails again: no restart


# ---- workdir, files, mounts -----------------------------------------------------------


def test_workdir_is_created_like_docker(root: Path) -> None:
    r = run_init(root, sh("pwd; id -u", workdir="/srv/new dir", user="app"))
    assert r.stdout.split("\n")[:2] == ["/srv/new dir", "1000"]
    r = run_init(root, sh("pwd"))
    assert r.stdout == "/\n"


def test_workdir_only_root_can_enter(root: Path) -> None:
    """`USER app` with `WORKDIR /root/app` (/root is 0700): init changed to the user
    before the directory and failed with 126; runc changes directory as root first."""
    assert (root / "root").stat().st_mode & 0o777 == 0o700
    script = "pwd; id -u; ls /root 2>/dev/null || echo cannot-list-root"
    r = run_init(root, sh(script, workdir="/root/app", user="app"))
    assert r.returncode == 0, r.console
    assert r.stdout.split("\n")[:3] == ["/root/app", "1000", "cannot-list-root"]


def _assert_created_like_docker(path: Path) -> None:
    st = path.lstat()
    assert path.is_dir() and not path.is_symlink(), path
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, 0, 0), oct(st.st_mode)


@pytest.mark.parametrize(
    ("link", "target", "created"),
    [
        ("app", "/srv/app", "srv/app"),  # absolute: from the image's root
        ("app", "srv/app", "srv/app"),  # relative: from the link's directory
        ("home/app/data", "../../srv/data", "srv/data"),
        ("home/up", "../../../../../srv/up", "srv/up"),  # ".." above "/" stays at "/"
        ("home/abs-up", "/../../srv/abs-up", "srv/abs-up"),
    ],
)
def test_workdir_that_is_a_dangling_symlink_gets_its_target_created(
    root: Path, link: str, target: str, created: str
) -> None:
    """`WORKDIR /app` with `/app -> /srv/app` (or `srv/app`) and no /srv/app: mkdir_p's
    mkdir gave EEXIST, its stat ENOENT, and the machine failed with 125. Docker resolves
    the link inside the container's root and creates the target (and /srv on the way)."""
    os.symlink(target, root / link)
    r = run_init(root, sh("pwd; id -u", workdir="/" + link, user="app"))
    assert r.returncode == 0, r.console
    assert r.stdout.split("\n")[:2] == ["/" + created, "1000"]
    assert os.readlink(root / link) == target  # the link itself is left as it is
    _assert_created_like_docker(root / created)
    _assert_created_like_docker(root / "srv")


def test_dangling_symlink_inside_the_workdir_path(root: Path) -> None:
    """`WORKDIR /app/sub` with `/app -> /srv/app`: an intermediate component, and a
    chain of links (/lnk -> app -> /srv/app) through a relative one."""
    os.symlink("/srv/app", root / "app")
    r = run_init(root, sh("pwd", workdir="/app/sub"))
    assert (r.returncode, r.stdout) == (0, "/srv/app/sub\n"), r.console
    _assert_created_like_docker(root / "srv" / "app")
    _assert_created_like_docker(root / "srv" / "app" / "sub")
    os.symlink("app", root / "lnk")
    os.symlink("sub/more", root / "srv" / "app" / "deeper")
    # ".." after a link goes up from where the link led (/srv/app/sub), not back to
    # /srv/app: the kernel's reading, which the program's chdir then agrees with
    r = run_init(root, sh("pwd", workdir="/lnk/./deeper/../y"))
    assert (r.returncode, r.stdout) == (0, "/srv/app/sub/y\n"), r.console
    _assert_created_like_docker(root / "srv" / "app" / "sub" / "more")
    _assert_created_like_docker(root / "srv" / "app" / "sub" / "y")
    assert not (root / "srv" / "app" / "y").exists()


def test_workdir_symlink_chain_limit_and_loops(root: Path) -> None:
    """A loop fails with 125 and says so (no hang); 40 links are followed, as the
    kernel does, the 41st is refused."""
    for i in range(40):  # /c0 -> /c1 -> ... -> /c39 -> /srv/end (missing)
        os.symlink(f"/c{i + 1}" if i < 39 else "/srv/end", root / f"c{i}")
    r = run_init(root, sh("pwd", workdir="/c0"), timeout=20)
    assert (r.returncode, r.stdout) == (0, "/srv/end\n"), r.console
    os.symlink("/c0", root / "c-1")
    r = run_init(root, sh("echo should-not-run", workdir="/c-1/x"), timeout=20)
    assert (r.returncode, r.stdout) == (125, ""), r.console
    assert not (root / "srv" / "end" / "x").exists()
    assert r.status is not None and r.status["error"] == (
        "cannot create working directory /c-1/x: /c39: "
        "too many levels of symbolic links (more than 40 followed)"
    )
    os.symlink("/b", root / "a")
    os.symlink("a", root / "b")
    os.symlink("/self/x", root / "self")  # grows with each turn
    # the message says where the walk stopped when that is not the workdir itself
    for workdir, stop in [("/a", ""), ("/b/sub", "/b: "), ("/self", "")]:
        r = run_init(root, sh("echo should-not-run", workdir=workdir), timeout=20)
        assert (r.returncode, r.stdout) == (125, ""), r.console
        message = (
            f"cannot create working directory {workdir}: {stop}"
            "too many levels of symbolic links (more than 40 followed)"
        )
        assert f"ember-init: error: {message}" in r.console
        assert r.status is not None and r.status["error"] == message
    assert not (root / "sub").exists() and not (root / "x").exists()


def test_workdir_symlink_to_a_file_still_fails(root: Path) -> None:
    """A link to a file is no directory: 125, and the message names the file the link
    led to (it named only the link, with nothing to say where the file was)."""
    passwd = (root / "etc" / "passwd").read_bytes()
    os.symlink("/etc/passwd", root / "app")
    (root / "srv").mkdir()
    os.symlink("file", root / "srv" / "rel")
    (root / "srv" / "file").write_text("a file\n")
    os.symlink("/srv/via/x", root / "dangling")  # /srv/via is a link to the file
    os.symlink("rel", root / "srv" / "via")
    cases = [
        ("/app", "/etc/passwd: Not a directory"),
        ("/app/sub", "/etc/passwd: Not a directory"),
        ("/srv/rel", "/srv/file: Not a directory"),
        ("/dangling", "/srv/file: Not a directory"),
        ("/etc/passwd", "Not a directory"),  # no link: as before
    ]
    for workdir, error in cases:
        r = run_init(root, sh("echo should-not-run", workdir=workdir))
        assert (r.returncode, r.stdout) == (125, ""), r.console
        message = f"cannot create working directory {workdir}: {error}"
        assert f"ember-init: error: {message}" in r.console
        assert r.status is not None and r.status["error"] == message
    assert (root / "etc" / "passwd").read_bytes() == passwd
    assert (root / "srv" / "file").read_text() == "a file\n"
    assert sorted(p.name for p in (root / "srv").iterdir()) == ["file", "rel", "via"]


@pytest.mark.parametrize(("user", "home"), [("app", "/home/app"), ("4242", "/"), ("", "/root")])
def test_empty_home_is_replaced_like_runc(root: Path, user: str, home: str) -> None:
    """`ENV HOME=` is no home: runc sets the passwd one (or "/"); init kept it empty."""
    r = run_init(root, sh('echo "[$HOME]"; env | grep -c ^HOME=', env=("HOME=",), user=user))
    assert r.returncode == 0, r.console
    assert r.stdout.split() == [f"[{home}]", "1"]


def test_hostname_hosts_and_resolv_conf(root: Path) -> None:
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost")  # no final newline
    os.symlink("/run/elsewhere/resolv.conf", root / "etc" / "resolv.conf")
    rc = sh(
        "hostname; cat /etc/hostname; cat /etc/hosts; cat /etc/resolv.conf",
        hostname="web-1",
        hosts=(HostEntry("10.0.0.1", ("gateway", "gw")), HostEntry("10.0.0.2", ("web-1",))),
        nameservers=("10.0.0.1", "1.1.1.1"),
        search=("example.com",),
    )
    r = run_init(root, rc)
    assert r.stdout == (
        "web-1\nweb-1\n"
        "127.0.0.1\tlocalhost\n10.0.0.1\tgateway gw\t# ember\n10.0.0.2\tweb-1\t# ember\n"
        "search example.com\nnameserver 10.0.0.1\nnameserver 1.1.1.1\n"
    )
    assert not (root / "etc" / "resolv.conf").is_symlink()


def test_a_restart_replaces_the_host_records_of_the_run_before(root: Path) -> None:
    """The root disk outlives a run: each start appended its records, and a machine
    restarted with a new address found its own name on the old one first."""
    hosts = root / "etc" / "hosts"
    hosts.write_text("10.9.9.9 image-own\r\n")
    hosts.chmod(0o640)
    for addr in ("10.0.0.5", "10.0.0.9", "10.0.0.9"):
        r = run_init(root, sh("cat /etc/hosts", hosts=(HostEntry(addr, ("abc123", "web")),)))
        assert r.returncode == 0, r.console
    assert hosts.read_bytes() == (
        b"10.9.9.9 image-own\r\n"
        b"127.0.0.1\tlocalhost\t# ember\n::1\tlocalhost ip6-localhost ip6-loopback\t# ember\n"
        b"10.0.0.9\tabc123 web\t# ember\n"
    )
    assert hosts.stat().st_mode & 0o777 == 0o640  # the image's mode kept
    assert not list((root / "etc").glob("hosts.*"))


def test_fifo_passwd_group_and_hosts_do_not_hang_init(root: Path) -> None:
    """An image's /etc/passwd, /etc/group or /etc/hosts that is a FIFO (or a symlink to
    one) hung init in its open or read before the program ran: anything but a regular
    file now counts as absent, and hosts is replaced without being read."""
    etc = root / "etc"
    for name in ("passwd", "hosts"):
        (etc / name).unlink(missing_ok=True)
        os.mkfifo(etc / name)
    os.mkfifo(root / "group.fifo")
    (etc / "group").unlink()
    os.symlink("/group.fifo", etc / "group")
    # (busybox's id would itself block on the FIFO passwd: the IDs from /proc)
    ids = 'grep -E "^(Uid|Gid):" /proc/self/status | cut -f2; echo "$HOME"'
    rc = sh(
        ids,
        user="4242",
        hostname="box",
        hosts=(HostEntry("10.0.0.1", ("gateway",)),),
    )
    r = run_init(root, rc, timeout=20)
    assert r.returncode == 0, r.console
    assert r.stdout.split() == ["4242", "0", "/"]
    assert "ember-init: /etc/hosts is not a regular file: replaced without reading it" in r.console
    assert "ember-init: /etc/passwd is not a regular file: ignored" in r.console
    assert (etc / "passwd").is_fifo()
    assert (etc / "hosts").read_text().endswith("10.0.0.1\tgateway\t# ember\n")
    # as root (no user), and with names to look up: absent files, no hang
    r = run_init(root, sh(ids), timeout=20)
    assert (r.returncode, r.stdout) == (0, "0\n0\n/\n"), r.console
    r = run_init(root, sh("true", user="4242:staff"), timeout=20)
    assert r.returncode == 125
    assert "ember-init: /etc/group is not a regular file: ignored" in r.console
    assert "unable to find group staff" in r.console


@pytest.mark.parametrize("link", ["/secret", "../secret", "/missing"])
def test_a_symlinked_hosts_file_is_replaced_without_reading_it(root: Path, link: str) -> None:
    """Init read /etc/hosts as root through the image's links: `/etc/hosts -> /proc/modules`
    (or any file only root may read) was copied into the new /etc/hosts, with its mode."""
    secret = root / "secret"
    secret.write_text("10.6.6.6 only-root-may-read-this\n")
    secret.chmod(0o600)
    hosts = root / "etc" / "hosts"
    hosts.unlink(missing_ok=True)
    os.symlink(link, hosts)
    r = run_init(root, sh("cat /etc/hosts", hosts=(HostEntry("10.0.0.1", ("gw",)),)))
    assert r.returncode == 0, r.console
    expected = (
        "127.0.0.1\tlocalhost\t# ember\n::1\tlocalhost ip6-localhost ip6-loopback\t# ember\n"
        "10.0.0.1\tgw\t# ember\n"
    )
    assert r.stdout == expected
    assert "ember-init: /etc/hosts is not a regular file: replaced without reading it" in r.console
    assert not hosts.is_symlink() and hosts.read_text() == expected
    assert hosts.stat().st_mode & 0o7777 == 0o644
    assert secret.read_text() == "10.6.6.6 only-root-may-read-this\n"
    assert secret.stat().st_mode & 0o7777 == 0o600
    assert not (root / "missing").exists()


def test_pseudo_filesystems_symlinks_and_nofile(root: Path) -> None:
    (root / "run" / "keep").write_text("shipped by the image")
    r = run_init(root, sh("cat /proc/mounts; ls -l /dev/fd /dev/stdin; ulimit -n; cat /run/keep"))
    mounts = {
        line.split()[1]: line.split()[2]
        for line in r.stdout.splitlines()
        if " " in line
        and line.startswith(
            ("proc", "sysfs", "devtmpfs", "devpts", "shm", "mqueue", "cgroup2", "tmpfs")
        )
    }
    assert mounts.get("/proc") == "proc"
    assert mounts.get("/sys") == "sysfs"
    assert mounts.get("/dev") == "tmpfs"  # the harness's (_PRIVATE_DEV): not mounted over
    assert mounts.get("/dev/pts") == "devpts"
    assert mounts.get("/dev/shm") == "tmpfs"
    assert mounts.get("/dev/mqueue") == "mqueue"
    assert mounts.get("/sys/fs/cgroup") == "cgroup2"
    assert "/run" not in mounts  # the image ships files in /run: not hidden
    assert "/dev/fd -> /proc/self/fd" in r.stdout
    assert "/dev/stdin -> /proc/self/fd/0" in r.stdout
    nofile = int(r.stdout.splitlines()[-2])
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    # raised to min(1 MiB, nr_open); where the sandbox lacks CAP_SYS_RESOURCE, the hard limit
    assert nofile in (min(1 << 20, nr_open), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert r.stdout.splitlines()[-1] == "shipped by the image"


def test_orphans_are_reaped(root: Path) -> None:
    r = run_init(root, sh("(sleep 0.2 &); (sleep 0.2 &); sleep 1; ps -o pid,ppid,stat,comm"))
    assert r.returncode == 0
    lines = r.stdout.splitlines()[1:]
    assert lines, r.stdout
    assert not [line for line in lines if line.split()[2].startswith("Z")], r.stdout


def test_malformed_config_refused_with_message(root: Path) -> None:
    data = sh("echo should-not-run").render().replace(b"end\n", b"")
    r = run_init(root, data)
    assert r.returncode == 125
    assert r.stdout == ""
    assert "ember-init: error: run config is truncated" in r.console
    assert r.status is not None and "truncated" in str(r.status["error"])
    assert "not_started" not in r.status  # init's own failures may not come again
    r = run_init(root, b"garbage\x00\n")
    assert r.returncode == 125 and "NUL" in r.console


# ---- supervision: signals and stop requests -------------------------------------------


class Running:
    """ember-init running in the background with a control FIFO."""

    def __init__(self, root: Path, rc: RunConfig, exec_socket: bool = False) -> None:
        self.root = root
        (root / ".ember-config").write_bytes(rc.render())
        os.mkfifo(root / ".ember-control")
        self.proc = subprocess.Popen(
            _argv(root, True, exec_socket), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def wait_for_line(self, expected: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == expected + "\n"

    def control(self, request: str) -> None:
        fd = os.open(self.root / ".ember-control", os.O_WRONLY)
        try:
            os.write(fd, request.encode())
        finally:
            os.close(fd)

    def init_pid(self) -> int:
        """Host PID of ember-init: the only child of `unshare --fork`."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        (pid,) = children.split()
        return int(pid)

    def finish(self) -> Result:
        out, err = self.proc.communicate(timeout=60)
        return _result(self.root, self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def running(root: Path) -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.kill()


TRAP_LOOP = "echo ready; while :; do sleep 0.1; done"


def test_stop_sends_stop_signal_and_exit_code_comes_back(
    root: Path, running: list[Running]
) -> None:
    r = Running(root, sh(f"trap 'echo got-term; exit 3' TERM; {TRAP_LOOP}"))
    running.append(r)
    r.wait_for_line("ready")
    r.control("stop\n")
    res = r.finish()
    assert res.returncode == 3
    assert res.stdout.splitlines()[-1] == "got-term"
    assert "stop requested: sending signal 15" in res.console


def test_stop_uses_the_images_stop_signal(root: Path, running: list[Running]) -> None:
    rc = sh(
        f"trap 'exit 4' TERM; trap 'echo got-usr1; exit 5' USR1; {TRAP_LOOP}",
        stop_signal=int(signal.SIGUSR1),
    )
    r = Running(root, rc)
    running.append(r)
    r.wait_for_line("ready")
    r.control("stop\n")
    res = r.finish()
    assert (res.returncode, res.stdout.splitlines()[-1]) == (5, "got-usr1")


def test_program_ignoring_stop_signal_is_killed_after_timeout(
    root: Path, running: list[Running]
) -> None:
    r = Running(root, sh(f"trap '' TERM; {TRAP_LOOP}", stop_timeout=1))
    running.append(r)
    r.wait_for_line("ready")
    r.control("stop\n")
    res = r.finish()
    assert res.returncode == 137
    assert "stop timeout: sending SIGKILL" in res.console
    assert last_line(res.console) == "ember-init: killed by signal 9"
    assert res.status == {"exit_code": 137, "signal": 9, "oom_killed": False}


def test_kill_request(root: Path, running: list[Running]) -> None:
    r = Running(root, sh(f"trap '' TERM; {TRAP_LOOP}"))
    running.append(r)
    r.wait_for_line("ready")
    r.control("bogus\nkill\n")
    res = r.finish()
    assert res.returncode == 137
    assert "unknown control request 'bogus'" in res.console


def test_signals_to_init_are_forwarded(root: Path, running: list[Running]) -> None:
    r = Running(root, sh(f"trap 'echo got-hup' HUP; trap 'echo got-34' 34; "
                         f"trap 'echo got-int; exit 6' INT; {TRAP_LOOP}"))  # fmt: skip
    running.append(r)
    r.wait_for_line("ready")
    pid = r.init_pid()
    os.kill(pid, signal.SIGHUP)
    r.wait_for_line("got-hup")
    # 32-34 are musl's own: its sigfillset leaves them out, and PID 1 dropped them
    os.kill(pid, 34)
    r.wait_for_line("got-34")
    os.kill(pid, signal.SIGINT)
    res = r.finish()
    assert res.returncode == 6
    assert res.stdout.splitlines()[-1] == "got-int"


def test_refuses_to_run_when_not_pid_1(ember_init: Path) -> None:
    p = subprocess.run(
        [str(ember_init), "--test", "--config", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert p.returncode == 2
    assert "must run as PID 1" in p.stderr


# ---- the C parser agrees with the Python renderer ------------------------------------

TRICKY = ["", " ", "a b", "tab\there", "new\nline", "back\\slash", "\\s", "ünïcödé", "x" * 5000,
          "end", "arg x", "=", "$HOME", "'\"`"]  # fmt: skip


def test_arguments_and_env_arrive_byte_exact(root: Path) -> None:
    (root / "out").mkdir()
    script = (
        'i=0; for a; do i=$((i+1)); printf %s "$a" > /out/$i; done; printf %s "$TRICKY" > /out/env'
    )
    rc = RunConfig(argv=("/bin/sh", "-c", script, "sh", *TRICKY), env=("TRICKY=a b\\c\nd\te=f",))
    r = run_init(root, rc)
    assert r.returncode == 0, r.console
    for i, expected in enumerate(TRICKY, start=1):
        assert (root / "out" / str(i)).read_text() == expected
    assert (root / "out" / "env").read_text() == "a b\\c\nd\te=f"


@pytest.mark.parametrize(
    "data",
    [
        b"ember-run-config 2\narg /bin/true\nend\n",
        b"ember-run-config 1\nend\n",  # no command
        b"ember-run-config 1\narg /bin/true\nbogus x\nend\n",
        b"ember-run-config 1\narg /bin/true\narg a\\qb\nend\n",  # unknown escape
        b"ember-run-config 1\narg /bin/true\narg a\tb\nend\n",  # raw tab
        b"ember-run-config 1\narg /bin/true\nuser a\nuser b\nend\n",
        b"ember-run-config 1\narg /bin/true\nenv NOVALUE\nend\n",
        b"ember-run-config 1\narg /bin/true\nworkdir relative\nend\n",
        b"ember-run-config 1\narg /bin/true\nstop_timeout -1\nend\n",
        b"ember-run-config 1\narg /bin/true\nnet eth0 10.0.0.2 - 1500\nend\n",
        b"ember-run-config 1\narg /bin/true\nnet eth0 10.0.0.2/24 - 20\nend\n",
        b"ember-run-config 1\narg /bin/true\nmount /dev/vdb / ext4 defaults\nend\n",
        # the root as well: the volume was mounted over "/"
        b"ember-run-config 1\narg /bin/true\nmount /dev/vdb // ext4 defaults\nend\n",
        b"ember-run-config 1\narg /bin/true\nmount /dev/vdb /. ext4 defaults\nend\n",
        b"ember-run-config 1\narg /bin/true\nmount /dev/vdb /./ ext4 defaults\nend\n",
        b"ember-run-config 1\narg /bin/true\nmount /dev/vdb /a/.. ext4 defaults\nend\n",
        b"ember-run-config 1\narg /bin/true\nmodule ../x\nend\n",
        b"ember-run-config 1\narg /bin/true\nend\narg /bin/false\n",  # data after end
        b"ember-run-config 1\narg /bin/true\narg\nend\n",  # arg without a field
        b"ember-run-config 1\narg /bin/true\nend",  # no final newline
        b"",
        b"ember-run-config 1\narg /bin/true\nstdin x\nend\n",
        b"ember-run-config 1\narg /bin/true\nstdin\nstdin\nend\n",
        b"ember-run-config 1\narg /bin/true\ntty 24\nend\n",
        b"ember-run-config 1\narg /bin/true\ntty 24 70000\nend\n",
        b"ember-run-config 1\narg /bin/true\ntty -1 80\nend\n",
        b"ember-run-config 1\narg /bin/true\ntty 24 80\ntty 24 80\nend\n",
    ],
)
def test_c_parser_refuses_what_python_refuses(root: Path, data: bytes) -> None:
    with pytest.raises(InvalidRunConfig):
        RunConfig.parse(data)
    r = run_init(root, data)
    assert r.returncode == 125, r.console
    assert "ember-init: error: " in r.console
    assert r.status is not None and r.status["exit_code"] == 125


@pytest.mark.parametrize("target", [b"/", b"//", b"/.", b"/./", b"///./.", b"/a/..", b"/a/../b"])
def test_c_parser_refuses_a_volume_over_the_root(root: Path, target: bytes) -> None:
    """Only "/" itself was refused: "//", "/." and "/./" passed, and the volume was
    mounted over the image's root."""
    data = b"ember-run-config 1\narg /bin/true\nmount /dev/vdb " + target + b" ext4 ro\nend\n"
    r = run_init(root, data)
    assert r.returncode == 125, r.console
    assert "ember-init: error: run config line 3: bad mount paths" in r.console


def _tmpfs_volume(target: str, options: str) -> bytes:
    """A config with a tmpfs volume (its source need not be a device), rendered by hand:
    RunConfig refuses what ember-init is tested against here."""
    ok = sh("grep ' /vol ' /proc/mounts", mounts=(Mount("/none", "/vol", "tmpfs", "x"),))
    record = f"mount /none {target} tmpfs {options}".encode()
    return ok.render().replace(b"mount /none /vol tmpfs x", record)


@pytest.mark.parametrize("name", ["proc", "sys"])
def test_a_symlinked_pseudo_filesystem_mount_point_is_refused(root: Path, name: str) -> None:
    """mkdir and mount followed an image's `/proc -> /elsewhere` (in a VM, `/dev` and
    `/sys` were followed relative to the initramfs's root before switch_root): the start
    fails now, as runc's does for a symlinked /proc or /sys.  (/dev is the harness's
    own mount here, so it cannot be a link in this test; the check is the same.)"""
    shutil.rmtree(root / name)
    (root / "elsewhere").mkdir()
    os.symlink("/elsewhere", root / name)
    r = run_init(root, sh("echo should-not-run"))
    assert (r.returncode, r.stdout) == (125, ""), r.console
    message = (
        f"the image's /{name} is a symbolic link: it must be a directory (/{name} is mounted there)"
    )
    assert f"ember-init: error: {message}" in r.console
    assert r.status is not None and r.status["error"] == message
    assert r.status["not_started"] is True  # the image: the same run fails again
    assert not list((root / "elsewhere").iterdir())


def test_a_symlinked_run_is_left_as_the_image_has_it(root: Path) -> None:
    """Docker mounts nothing at /run: an image with a link there runs, and ember's tmpfs
    (for an empty /run) is not mounted through the link."""
    shutil.rmtree(root / "run")
    (root / "var" / "run").mkdir(parents=True, exist_ok=True)
    os.symlink("/var/run", root / "run")
    r = run_init(root, sh("echo ran; grep -c ' /var/run ' /proc/mounts || true"))
    assert r.returncode == 0, r.console
    assert r.stdout == "ran\n0\n"
    assert os.path.islink(root / "run")


def test_a_missing_run_gets_its_tmpfs(root: Path) -> None:
    shutil.rmtree(root / "run")
    r = run_init(root, sh("grep ' /run ' /proc/mounts | cut -d' ' -f3"))
    assert (r.returncode, r.stdout) == (0, "tmpfs\n"), r.console


def test_volume_targets_are_resolved_inside_the_root_and_created(root: Path) -> None:
    """A volume target that is a dangling link failed with 125 (Docker creates its
    target); one through links was mounted wherever they led.  Resolved inside the
    image's root now, as the WorkingDir is, and mounted on what was resolved."""
    os.symlink("/srv/vol", root / "vol")  # dangling
    os.symlink("../../srv/deep", root / "home" / "rel")  # relative, ".." clamped at /
    (root / "out").mkdir()
    vols = (
        Mount("/none", "/vol", "tmpfs", "size=1m"),
        Mount("/none", "/home/rel/sub", "tmpfs", "ro"),
    )
    r = run_init(root, sh("grep tmpfs /proc/mounts | cut -d' ' -f2,4 | cut -d, -f1", mounts=vols))
    assert r.returncode == 0, r.console
    assert r.stdout.splitlines()[-2:] == ["/srv/vol rw", "/srv/deep/sub ro"], r.stdout
    _assert_created_like_docker(root / "srv" / "vol")
    _assert_created_like_docker(root / "srv" / "deep" / "sub")
    assert os.readlink(root / "vol") == "/srv/vol"


def test_volume_targets_that_cannot_be_used_fail_the_start(root: Path) -> None:
    os.symlink("../..", root / "up")  # the root itself
    os.symlink("/etc/passwd", root / "file")
    os.symlink("loop", root / "loop")
    cases = [
        ("/up", "volume target /up resolves to /: not mounting over the root"),
        ("/up/.", "volume target /up/. resolves to /: not mounting over the root"),
        ("/file/x", "cannot create volume target /file/x: /etc/passwd: Not a directory"),
        ("/loop", "cannot create volume target /loop: "
                  "too many levels of symbolic links (more than 40 followed)"),
    ]  # fmt: skip
    for target, message in cases:
        r = run_init(root, sh("echo should-not-run", mounts=(Mount("/none", target, "tmpfs"),)))
        assert (r.returncode, r.stdout) == (125, ""), r.console
        assert r.status is not None and r.status["error"] == message
        # the image is why: the same start fails again, no restart policy applies
        assert r.status.get("not_started") is True, target


def test_mount_options_too_long_are_refused_not_cut(root: Path) -> None:
    """Options past 1023 bytes were cut by snprintf: a trailing "ro" was lost and the
    volume mounted read-write.  Refused now (125); 1023 bytes still work."""
    fits = "," + "rw," * 340 + "ro"  # 1023 bytes (an empty option is skipped)
    assert len(fits) == 1023
    r = run_init(root, _tmpfs_volume("/vol", fits))
    assert r.returncode == 0, r.console
    assert r.stdout.split()[3].split(",")[0] == "ro", r.stdout
    too_long = "rw," * 341 + "ro"  # 1025 bytes
    r = run_init(root, _tmpfs_volume("/vol", too_long))
    assert (r.returncode, r.stdout) == (125, ""), r.console
    assert "ember-init: error: run config line" in r.console
    assert "mount options longer than 1023 bytes" in r.console
    rc = RunConfig.parse(_tmpfs_volume("/vol", fits))
    assert rc.mounts[0].options == fits  # the host takes what the guest takes
    with pytest.raises(InvalidRunConfig):
        RunConfig.parse(_tmpfs_volume("/vol", too_long))


# ---- network over rtnetlink, in a network namespace with a dummy eth0 ------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ember-init-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # a veth pair (the dummy driver is not always there); the peer up gives eth0 carrier
        subprocess.run(
            ["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
            check=True,
        )
        subprocess.run(["ip", "-n", name, "link", "set", "peer0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in_netns(root: Path, netns: str, rc: RunConfig) -> Result:
    (root / ".ember-config").write_bytes(rc.render())
    argv = ["ip", "netns", "exec", netns] + [a for a in _argv(root, False) if a != "--net"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return _result(root, p.returncode, p.stdout, p.stderr)


def test_network_configured_over_netlink(root: Path, netns: str) -> None:
    rc = sh(
        "ip -4 addr show eth0; ip link show lo; ip route; "
        "echo unprivileged from $(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)",
        network=(Interface("eth0", "172.30.5.2", 24, "172.30.5.1", 1400),),
    )
    r = run_in_netns(root, netns, rc)
    assert r.returncode == 0, r.console
    assert "inet 172.30.5.2/24 brd 172.30.5.255" in r.stdout
    assert "mtu 1400" in r.stdout
    assert "default via 172.30.5.1 dev eth0" in r.stdout
    assert "LOOPBACK,UP" in r.stdout
    # as Docker sets it: a non-root image user may bind port 80
    assert "unprivileged from 0\n" in r.stdout


def test_missing_interface_is_an_error(root: Path, netns: str) -> None:
    rc = sh("echo should-not-run", network=(Interface("eth1", "172.30.6.2", 24),))
    r = run_in_netns(root, netns, rc)
    assert r.returncode == 125
    assert "network interface eth1 does not exist" in r.console
    assert r.stdout == ""


@dataclass
class ImageCfg:
    entrypoint: list[str] | None
    cmd: list[str] | None
    env: list[str] | None = None
    user: str | None = None
    working_dir: str | None = None
    stop_signal: str | None = None


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (RunOverrides(), "ep default-cmd\n"),
        (RunOverrides(args=["run", "args"]), "ep run args\n"),
        (RunOverrides(entrypoint=["/bin/echo", "new-ep"]), "new-ep\n"),
        (RunOverrides(entrypoint=["/bin/echo"], args=["x"]), "x\n"),
        (RunOverrides(entrypoint=[], args=["echo", "only", "args"]), "only args\n"),
    ],
)
def test_docker_argv_rules_end_to_end(root: Path, overrides: RunOverrides, expected: str) -> None:
    image = ImageCfg(entrypoint=["/bin/echo", "ep"], cmd=["default-cmd"], env=["A=1"])
    r = run_init(root, RunConfig.from_image(image, overrides))
    assert (r.returncode, r.stdout) == (0, expected)


# ---- a real distribution's passwd/group: Debian (debootstrap minbase) ----------------------


@pytest.fixture(scope="module")
def debian_root(
    debian_rootfs: Path, ember_init: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy for this module (the session's tree stays as umoci left it); the tests
    only read it (no hostname/hosts records)."""
    root = tmp_path_factory.mktemp("debian") / "root"
    subprocess.run(["cp", "-a", str(debian_rootfs), str(root)], check=True)
    shutil.copy2(ember_init, root / ".ember-init")
    return root


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", "0 0 0 /root"),
        ("nobody", "65534 65534 65534 /nonexistent"),
        ("www-data", "33 33 33 /var/www"),
        ("daemon:tty", "1 5 5 /usr/sbin"),
        ("33:0", "33 0 0 /var/www"),
    ],
)
def test_debian_users(debian_root: Path, user: str, expected: str) -> None:
    r = run_init(debian_root, sh('echo $(id -u) $(id -g) $(id -G) "$HOME"', user=user))
    assert r.returncode == 0, r.console
    assert r.stdout.strip() == expected


def _mutations(data: bytes, count: int, seed: int) -> list[bytes]:
    """One small edit per case, mostly inside the body's records (so that not every
    case dies on the header or the end record)."""
    rng = random.Random(seed)
    alphabet = [b" ", b"\\", b"\n", b"\t", b"x", b"0", b"-", b"/", b"=", b"s", b"1"]
    lines = data.split(b"\n")  # [header, records..., b"end", b""]
    out = []
    for _ in range(count):
        ls = list(lines)
        j = rng.randrange(len(ls) - 1) if rng.random() < 0.1 else rng.randrange(1, len(ls) - 2)
        line = bytearray(ls[j])
        i = rng.randrange(len(line) + 1)
        op = rng.randrange(4)
        if op == 0 and line:
            del line[min(i, len(line) - 1)]
        elif op == 1:
            line[i:i] = rng.choice(alphabet)
        elif op == 2:
            ls.insert(j, ls[j])  # a repeated record
        else:
            line = line[:i]
        if op != 2:
            ls[j] = bytes(line)
        out.append(b"\n".join(ls))
    return out


def test_mutated_configs_c_refuses_only_what_python_refuses(root: Path) -> None:
    """Differential: whatever ember-init's parser refuses, RunConfig.parse refuses too
    (Python may be stricter: it also checks meanings, like a gateway's subnet)."""
    base = RunConfig(
        argv=("/bin/true", "a b"),
        env=("A=1",),
        user="0:0",
        workdir="/tmp",
        stop_timeout=3,
        nameservers=("10.0.0.1",),
        open_stdin=True,
        tty=(24, 80),
    ).render()
    outcomes = []
    for data in _mutations(base, 60, seed=5):
        try:
            RunConfig.parse(data)
            py_refused = False
        except InvalidRunConfig:
            py_refused = True
        r = run_init(root, data)
        c_refused = r.returncode == 125 and "run config" in r.console
        assert not c_refused or py_refused, (data, r.console)
        outcomes.append((py_refused, c_refused))
    # not vacuous: both sides refused some mutations and accepted others
    assert (True, True) in outcomes and (False, False) in outcomes, outcomes


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, "127.0.0.1\tlocalhost\t# ember\n::1\tlocalhost ip6-localhost ip6-loopback\t# ember\n"),
        ("# localhost here is only a comment\n10.1.1.1 notlocalhost\n",
         "# localhost here is only a comment\n10.1.1.1 notlocalhost\n"
         "127.0.0.1\tlocalhost\t# ember\n::1\tlocalhost ip6-localhost ip6-loopback\t# ember\n"),
        ("127.0.0.1 localhost.localdomain localhost\n",
         "127.0.0.1 localhost.localdomain localhost\n"),
    ],
)  # fmt: skip
def test_localhost_always_resolves(root: Path, existing: str | None, expected: str) -> None:
    hosts = root / "etc" / "hosts"
    if existing is None:
        hosts.unlink(missing_ok=True)
    else:
        hosts.write_text(existing)
    r = run_init(root, sh("cat /etc/hosts"))
    assert r.stdout == expected


def test_signal_request(root: Path, running: list[Running]) -> None:
    r = Running(root, sh(f"trap 'echo got-usr2' USR2; trap 'exit 9' HUP; {TRAP_LOOP}"))
    running.append(r)
    r.wait_for_line("ready")
    r.control(f"signal {int(signal.SIGUSR2)}\nsignal 0\nsignal x\n")
    r.wait_for_line("got-usr2")
    r.control(f"signal {int(signal.SIGHUP)}\n")
    res = r.finish()
    assert res.returncode == 9
    assert "bad control request 'signal 0'" in res.console
    assert "bad control request 'signal x'" in res.console


# ---- exec sessions (``ember exec``'s guest side, over a socket instead of a port) -----


class ExecHost:
    """The host end of init's exec port: a unix socket init connects to (``--exec``),
    again after each hang-up, as a virtio port sees host connections come and go."""

    def __init__(self, root: Path) -> None:
        import socket

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(root / ".ember-exec.sock"))
        self.listener.listen(1)
        self.listener.settimeout(30)

    def session(self, request: ExecRequest, stdin: bytes = b"", hang_up: bool = False,
                first: bytes = b"") -> tuple[list[tuple[bytes, bytes]], bytes, bytes, int | None]:  # fmt: skip
        """Frames, stdout, stderr and exit code of one session (None: none came);
        ``first``: frames sent after the request, before its stdin."""
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(30)
            conn.sendall(request.encode() + first)
            if request.stdin:
                for f in stdin_frames(stdin):
                    conn.sendall(f)
                conn.sendall(frame(STDIN_END))
            reader = FrameReader()
            frames: list[tuple[bytes, bytes]] = []
            while not frames or (frames[-1][0] not in (EXIT, REFUSED) and not hang_up):
                data = conn.recv(65536)
                if not data:
                    break
                frames += reader.feed(data)
                if hang_up and any(k == STARTED for k, _ in frames):
                    break
        out = b"".join(p for k, p in frames if k == STDOUT)
        err = b"".join(p for k, p in frames if k == STDERR)
        code = exit_code(frames[-1][1]) if frames and frames[-1][0] == EXIT else None
        return frames, out, err, code

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def init_with_exec(root: Path, running: list[Running], rc: RunConfig) -> Iterator[tuple[ExecHost, Running]]:
    """ember-init running ``rc`` (it waits for /stop), its exec port at an ``ExecHost``;
    stopped afterwards, and it must end cleanly."""
    host = ExecHost(root)
    r = Running(root, rc, exec_socket=True)
    running.append(r)
    try:
        r.wait_for_line("ready")
        yield host, r
    finally:
        (root / "stop").touch()
        host.close()
    res = r.finish()
    assert res.returncode == 0 and res.stdout.endswith("stopped\n"), res.console


WAIT_FOR_STOP = "echo ready; while [ ! -e /stop ]; do sleep 0.05; done; echo stopped"


def test_exec_sessions_run_beside_the_program(root: Path, running: list[Running]) -> None:
    host = ExecHost(root)
    r = Running(root, sh(WAIT_FOR_STOP, env=("FOO=image", "KEEP=1"), user="app", workdir="/home"),
                exec_socket=True)  # fmt: skip
    running.append(r)
    try:
        r.wait_for_line("ready")
        # the program's user, environment and directory, the request's over them
        script = 'read line; echo "got $line"; echo "$FOO $KEEP $(id -u) $(pwd) $HOME" ; echo oops >&2; exit 3'
        frames, out, err, code = host.session(
            ExecRequest(["sh", "-c", script], env=["FOO=exec"], stdin=True, nonce="n1"),
            stdin=b"hello\n",
        )
        assert frames[0] == (STARTED, b"n1")
        assert (out, err, code) == (b"got hello\nexec 1 1000 /home /home/app\n", b"oops\n", 3)
        # another user and directory; HOME is that user's
        _, out, _, code = host.session(
            ExecRequest(["sh", "-c", "echo $(id -un) $(pwd) $HOME"], user="root", workdir="/tmp")
        )
        assert (out, code) == (b"root /tmp /root\n", 0)
        # a command that is not there: the program's words and code
        _, _, err, code = host.session(ExecRequest(["no-such-command"]))
        assert code == 127 and b"executable file not found in $PATH" in err
        frames, _, _, code = host.session(ExecRequest(["true"], user="nobody-here", nonce="n2"))
        assert frames[-1][0] == REFUSED and code is None
        nonce, why = refusal(frames[-1][1])
        assert nonce == "n2" and "nobody-here" in why
        # a host that hangs up takes its command with it; a detached one stays
        host.session(ExecRequest(["sleep", "1000"]), hang_up=True)
        host.session(ExecRequest(["sh", "-c", "sleep 0.3; touch /detached"], user="root", detach=True),
                     hang_up=True)  # fmt: skip
        _, out, _, _ = host.session(ExecRequest(["sh", "-c", "sleep 0.6; ps -o comm,args"]))
        assert b"sleep 1000" not in out, out
        assert (root / "detached").exists()
        # a terminal: its size, then another one; input echoed, output on stdout only
        _, out, err, code = host.session(
            ExecRequest(["sh", "-c", "tty; stty size; read x; stty size; echo $x >&2; exit 4"],
                        user="root", stdin=True, tty=(30, 100)),
            stdin=b"typed\n", first=resize_frame(40, 120),
        )  # fmt: skip
        assert code == 4 and err == b"", (out, err)
        assert b"/dev/pts/0\r\n" in out and out.count(b"40 120\r\n") == 2, out
        assert out.count(b"typed\r\n") == 2, out  # the terminal's echo, then the command's
        _, out, _, code = host.session(ExecRequest(["stty", "size"], tty=(30, 100)))
        assert (out, code) == (b"30 100\r\n", 0)
        # a malformed request is refused, and the port works again after the hang-up
        frames, _, _, _ = host.session(ExecRequest([], env=["A=1"], nonce="n3"))
        assert frames == [(REFUSED, b"n3\0no command")]
    finally:
        (root / "stop").touch()
        host.close()
    res = r.finish()
    assert res.returncode == 0 and res.stdout.endswith("stopped\n"), res.console


def _frames_until(conn: socket.socket, reader: FrameReader, done: Callable[[list[tuple[bytes, bytes]]], bool]
                  ) -> list[tuple[bytes, bytes]]:  # fmt: skip
    frames: list[tuple[bytes, bytes]] = []
    while not done(frames):
        data = conn.recv(1 << 16)
        assert data, frames
        frames += reader.feed(data)
    return frames


def test_exec_sessions_hold_up_against_odd_hosts(root: Path, running: list[Running]) -> None:
    """A second request on one connection, a host that does not read, stdin the command
    never reads, signals: nothing lost, nothing left running, init not stalled."""
    with init_with_exec(root, running, sh(WAIT_FOR_STOP)) as (host, _):
        # a new request on a port whose session runs: the old command goes, the new runs
        conn, _ = host.listener.accept()
        with conn:
            conn.settimeout(30)
            conn.sendall(ExecRequest(["sleep", "1000"], nonce="a").encode())
            conn.sendall(ExecRequest(["echo", "second"], nonce="b").encode())
            frames = _frames_until(conn, FrameReader(), lambda f: bool(f) and f[-1][0] == EXIT)
        assert [f for f in frames if f[0] != STARTED] == [(STDOUT, b"second\n"), (EXIT, b"\0\0\0\0")]
        # a host that reads nothing for a while: the output waits, whole
        conn, _ = host.listener.accept()
        with conn:
            conn.settimeout(30)
            conn.sendall(ExecRequest(["sh", "-c", "yes 0123456789 | head -c 3000000; exit 7"]).encode())
            time.sleep(1.5)
            frames = _frames_until(conn, FrameReader(), lambda f: bool(f) and f[-1][0] == EXIT)
        out = b"".join(p for k, p in frames if k == STDOUT)
        assert (len(out), out[:11], exit_code(frames[-1][1])) == (3000000, b"0123456789\n", 7)
        # a signal for the command
        conn, _ = host.listener.accept()
        with conn:
            conn.settimeout(30)
            conn.sendall(ExecRequest(["sh", "-c", "trap 'echo got-usr1; exit 9' USR1; echo up; "
                                      "while :; do sleep 0.05; done"]).encode())  # fmt: skip
            reader = FrameReader()
            _frames_until(conn, reader, lambda f: (STDOUT, b"up\n") in f)
            conn.sendall(signal_frame(signal.SIGUSR1))
            frames = _frames_until(conn, reader, lambda f: bool(f) and f[-1][0] == EXIT)
        assert frames == [(STDOUT, b"got-usr1\n"), (EXIT, b"\0\0\0\x09")]
        # 1.5 MB of stdin a command never reads, then a hang-up: the command goes, and
        # the port takes the next session
        conn, _ = host.listener.accept()
        with conn:
            conn.sendall(ExecRequest(["sleep", "1001"], stdin=True).encode())
            conn.settimeout(5)
            try:
                for f in stdin_frames(b"x" * 1_500_000):
                    conn.sendall(f)
            except TimeoutError:
                pass  # (init stopped reading: the command reads its stdin first)
        _, out, _, code = host.session(ExecRequest(["sh", "-c", "sleep 0.3; ps -o args"]))
        assert code == 0 and b"sleep 100" not in out, out


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_exec_sessions_leave_nothing_behind(root: Path, running: list[Running]) -> None:
    """A stdin end that comes late does not close the next session's stdin; a background
    child of a command goes with its session; a host that floods requests and reads
    nothing does not grow init."""
    with init_with_exec(root, running, sh(WAIT_FOR_STOP)) as (host, r):
        conn, _ = host.listener.accept()
        with conn:
            conn.settimeout(30)
            reader = FrameReader()
            conn.sendall(ExecRequest(["true"], stdin=True, nonce="a").encode())
            _frames_until(conn, reader, lambda f: bool(f) and f[-1][0] == EXIT)
            conn.sendall(frame(STDIN_END))  # late: that session is over
            conn.sendall(ExecRequest(["cat"], stdin=True, nonce="b").encode()
                         + frame(STDIN, b"data\n") + frame(STDIN_END))  # fmt: skip
            frames = _frames_until(conn, reader, lambda f: bool(f) and f[-1][0] == EXIT)
        assert (STDOUT, b"data\n") in frames, frames
        # a command's background child, holding its output: gone with the session
        host.session(ExecRequest(["sh", "-c", "sleep 1002 & echo up"]), hang_up=True)
        _, out, _, _ = host.session(ExecRequest(["sh", "-c", "sleep 0.3; ps -o args"]))
        assert b"sleep 1002" not in out, out
        # a request sent again (a client that had no answer): a detached command once
        for _ in range(2):
            host.session(ExecRequest(["sh", "-c", "echo run >> /ran"], user="root", detach=True,
                                     nonce="same"), hang_up=True)  # fmt: skip
        time.sleep(0.5)
        assert (root / "ran").read_text() == "run\n"
        # 6 MB of requests, none of whose answers is read
        pid = r.init_pid()
        before = _rss_kib(pid)
        conn, _ = host.listener.accept()
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(TimeoutError):  # (init stops reading: its answers wait)
                conn.sendall(b"O\0\0\0\x01\0" * 1_000_000)
            assert _rss_kib(pid) - before < 2048


# ---- the program's own stdin and terminal (``run -i``/``-t``, ``ember attach``) -------


def _attach(nonce: str, tty: tuple[int, int] | None = None, stdin: bool = True) -> ExecRequest:
    return ExecRequest([], attach=True, stdin=stdin, nonce=nonce, tty=tty)


def test_an_attached_host_writes_the_programs_stdin(root: Path, running: list[Running]) -> None:
    host = ExecHost(root)
    script = 'echo ready; read a; echo "got $a"; read b; echo "then $b"; cat; echo end; exit 4'
    r = Running(root, sh(script, open_stdin=True), exec_socket=True)
    running.append(r)
    try:
        r.wait_for_line("ready")
        # a host that hangs up leaves the program's stdin open (no end of it was sent)
        frames, _, _, code = host.session(_attach("a1", stdin=False), first=frame(STDIN, b"one\n"),
                                          hang_up=True)  # fmt: skip
        assert frames[0] == (STARTED, b"a1") and code is None
        r.wait_for_line("got one")
        # the next one's stdin, and its end: the program's ends (cat returns)
        frames, out, err, code = host.session(_attach("a2"), stdin=b"two\nrest\n")
        assert frames[0] == (STARTED, b"a2")
        assert (out, err, code) == (b"", b"", None)  # its output is the machine's, not the session's
    finally:
        host.close()
    res = r.finish()
    assert res.stdout == "then two\nrest\nend\n", res.console
    assert res.status is not None and res.status["exit_code"] == 4


def test_attach_is_refused_when_the_programs_stdin_is_not_open(root: Path, running: list[Running]) -> None:
    with init_with_exec(root, running, sh(WAIT_FOR_STOP)) as (host, _):
        frames, _, _, code = host.session(_attach("a1"), stdin=b"x\n")
        assert frames[-1][0] == REFUSED and code is None
        nonce, why = refusal(frames[-1][1])
        assert nonce == "a1" and "not run with -i" in why
        # an attach request names no command
        frames, _, _, _ = host.session(ExecRequest(["true"], attach=True, nonce="a2"))
        assert frames[-1][0] == REFUSED and "names no command" in refusal(frames[-1][1])[1]


class _Terminal:
    """What init's stdout shows of a program on a terminal, as bytes (lines end in CR LF,
    which the text mode of ``Running``'s pipe would turn into LF)."""

    def __init__(self, r: Running) -> None:
        assert r.proc.stdout is not None
        self.out = r.proc.stdout.buffer
        self.seen = b""

    def wait_for(self, text: bytes) -> None:
        while text not in self.seen:
            line = self.out.readline()
            assert line, f"init's output ended before {text!r}: {self.seen!r}"
            self.seen += line

    def read_to_end(self) -> bytes:
        self.seen += self.out.read()
        return self.seen


def test_a_program_on_a_terminal(root: Path, running: list[Running]) -> None:
    host = ExecHost(root)
    script = ('[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo "tty $(stty size)"; read line; '
              'echo "got [$line] $(stty size)"; echo oops >&2; '
              'head -c 300000 /dev/zero | tr "\\0" x; exit 3')
    r = Running(root, sh(script, open_stdin=True, tty=(30, 100)), exec_socket=True)
    running.append(r)
    term = _Terminal(r)
    try:
        term.wait_for(b"tty 30 100\r\n")  # its size from the run config, CR LF from the terminal
        # a new size, then a line typed: echoed by the terminal, as typed on one
        frames, _, _, _ = host.session(_attach("t1", tty=(40, 120)), stdin=b"hello\n",
                                       hang_up=True)  # (its output is read below: not to wait here)
        assert frames[0] == (STARTED, b"t1")
    finally:
        host.close()
    out = term.read_to_end()
    res = r.finish()
    assert b"hello\r\n" in out  # the echo
    assert b"got [hello] 40 120\r\noops\r\n" in out  # stderr on the terminal too
    # the last of its output reaches the port before the exit report: all of it
    assert out.endswith(b"x" * 300000), out[-200:]
    assert res.status is not None and res.status["exit_code"] == 3


def test_a_terminal_without_stdin_has_no_input(root: Path, running: list[Running]) -> None:
    script = '[ -t 0 ] && echo "a terminal"; echo ready; while [ ! -e /stop ]; do sleep 0.05; done'
    host = ExecHost(root)
    r = Running(root, sh(script, tty=(24, 80)), exec_socket=True)
    running.append(r)
    term = _Terminal(r)
    try:
        term.wait_for(b"ready")
        frames, _, _, _ = host.session(_attach("t1"), stdin=b"x\n")
        assert frames[-1][0] == REFUSED and "not run with -i" in refusal(frames[-1][1])[1]
    finally:
        (root / "stop").touch()
        host.close()
    assert term.read_to_end().startswith(b"a terminal\r\nready\r\n")
    r.finish()
