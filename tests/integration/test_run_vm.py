"""``ember run`` for real: images booted under QEMU (TCG here, KVM where it works),
each test inside a network namespace it creates, driving the ``ember`` CLI as a user
would.  Each boot costs seconds, so several checks share one boot where they can."""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots.pool import close_pool
from tests.machines.vmkit import EMBER, Ember, delete_netns, fetch, make_vm_home, new_netns
from tests.snapshots.leaks import ours
from tests.support.images import layout_ref
from tests.support.proc import read_line
from tests.vm.vmm.kernelcache import cached_kernel

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.integration]


@pytest.fixture(scope="module")
def vm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    home = make_vm_home(tmp_path_factory.mktemp("vm") / "home")
    yield home
    close_pool(home)
    mounts, loops = ours(home.root)
    assert not mounts and not loops, (mounts, loops)


@pytest.fixture(scope="module")
def debian(debian_layout: Path) -> str:
    return layout_ref(debian_layout)


def leftovers(ember: Ember, machine_id: str = "") -> list[str]:
    """What machines (all, or the one with ``machine_id``) left on the host."""
    found = []
    tap = f"em-{machine_id[:12]}"
    for ln in ember.sh("ip", "-o", "link").stdout.splitlines():
        if tap in ln:
            found.append(f"link {ln.split(':')[1].strip()}")
    if ember.sh("nft", "list", "table", "inet", "ember").returncode == 0:
        found.append("nft table inet ember")
    found += [f"machine dir {p.name}" for p in ember.home.machines.glob(f"{machine_id}*")
              if not p.name.startswith(".")]  # fmt: skip
    pool = ember.home.snapshots / "pool"
    found += [f"snapshot {p}" for p in pool.rglob(f"machine%2F{machine_id}*")]
    for name in Path("/sys/block").iterdir():
        try:
            backing = (name / "loop" / "backing_file").read_text()
        except OSError:
            continue
        if f"machine%2F{machine_id}" in backing:
            found.append(f"loop device {name.name} {backing.strip()}")
    home = str(ember.home.root)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found += [f"process {ln.strip()}" for ln in ps.splitlines()
              if home in ln and machine_id in ln and "ps -eo" not in ln]  # fmt: skip
    return found


def test_debian_prints_env_value_exit_0(ember: Ember, debian: str) -> None:
    res = ember("run", "--rm", "-e", "EMBER_TEST_VALUE=from -e", "-e", "SECOND=2", debian,
                "bash", "-c", 'echo "value=$EMBER_TEST_VALUE $SECOND"; echo to-stderr >&2')  # fmt: skip
    assert res.returncode == 0, res.stderr
    # only the program's output: no kernel or init messages on stdout
    assert res.stdout == "value=from -e 2\n"
    assert "to-stderr" in res.stderr and "to-stderr" not in res.stdout


def test_user_by_name_workdir_exit_7_and_rm_leaves_nothing(ember: Ember, busybox: str) -> None:
    res = ember("run", "--rm", "--name", "u-name", "-u", "app", "-w", "/tmp", busybox,
                "sh", "-c", "id; pwd; echo $HOME; exit 7")  # fmt: skip
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines() == [
        "uid=1000(app) gid=1000(app) groups=2000(extra)",
        "/tmp",
        "/home/app",
    ]
    assert ember("ps", "-a", "-q").stdout == ""
    # --rm in the foreground: ember returns once everything is gone
    assert leftovers(ember) == []


def test_rm_leaves_nothing_behind(ember: Ember, busybox: str) -> None:
    # it ends by itself (exit 3), but only once told to (USR1): after the look below
    res = ember("run", "-d", "--rm", "--name", "short-lived", "-p", "8081:80", busybox,
                "sh", "-c", "trap 'exit 3' USR1; echo ready; while :; do sleep 0.1; done")  # fmt: skip
    assert res.returncode == 0, res.stderr
    machine_id = res.stdout.strip()
    assert len(machine_id) == 64
    assert leftovers(ember, machine_id)  # while it runs there is something to find
    deadline = time.monotonic() + 120
    while "ready" not in ember("logs", "short-lived").stdout:  # its trap is set
        assert time.monotonic() < deadline, ember("logs", "short-lived")
        time.sleep(0.1)
    assert ember("kill", "-s", "USR1", "short-lived").returncode == 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and leftovers(ember, machine_id):
        time.sleep(0.5)
    assert leftovers(ember, machine_id) == []


def test_uid_gid_and_killed_137(ember: Ember, busybox: str) -> None:
    res = ember("run", "--rm", "-u", "1234:5678", busybox, "sh", "-c",
                "id -u; id -g; kill -9 $$")  # fmt: skip
    assert res.returncode == 137, res.stderr
    assert res.stdout.splitlines() == ["1234", "5678"]


def test_unknown_user_is_a_clear_error(ember: Ember, busybox: str) -> None:
    res = ember("run", "--rm", "-u", "nosuchuser", busybox, "true")
    assert res.returncode != 0
    assert "nosuchuser" in res.stderr
    assert res.stdout == ""


def test_entrypoint_override_clears_cmd(ember: Ember, busybox: str) -> None:
    res = ember("run", "--rm", "--entrypoint", "/bin/echo", busybox, "one", "two")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "one two\n"
    res = ember("run", "--rm", "--entrypoint", "/bin/echo", busybox)
    assert res.stdout == "\n"  # the image's Cmd is gone


BIND = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(1)
    print("bound")
except OSError as e:
    print(e.errno)
"""


def bind_on_host(ember: Ember, port: int) -> str:
    """What a server on the machines' host gets when it binds ``port``."""
    return ember.sh(sys.executable, "-c", BIND, str(port)).stdout.strip()


SERVER = (
    'mkdir -p /www && echo "hello over -p" > /www/index.html && httpd -p 80 -h /www && '
    'trap "echo got TERM; exit 42" TERM; echo ready; while :; do sleep 0.1; done'
)


def test_hostname_add_host_and_dns_reach_the_guest_again_at_each_start(
    ember: Ember, busybox: str
) -> None:
    show = ("hostname; grep ember /etc/hosts | grep -v localhost; cat /etc/resolv.conf; "
            "ip route | grep ^default")
    res = ember("run", "--name", "named", "--hostname", "web-1",
                "--add-host", "db:10.1.2.3", "--add-host", "host.docker.internal:host-gateway",
                "--add-host", "v6=[2001:db8::1]", "--dns", "10.0.0.53", "--dns-search", "example.com",
                busybox, "sh", "-c", show)  # fmt: skip
    try:
        assert res.returncode == 0, res.stderr
        record = ember.inspect("named")
        assert record["config"]["extra_hosts"] == [
            "db:10.1.2.3", "host.docker.internal:host-gateway", "v6:2001:db8::1"
        ]
        assert (record["config"]["dns"], record["config"]["dns_search"]) == (
            ["10.0.0.53"], ["example.com"]
        )
        # `ember start` makes the run config again, with that start's network
        for out in (res.stdout, ember("start", "-a", "named").stdout):
            lines = out.splitlines()
            gateway = lines[-1].split()[2]  # "default via ADDR dev eth0"
            guest_ip = ember.inspect("named")["network"]["guest_ip"]
            assert lines[:-1] == [
                "web-1",
                f"{guest_ip}\tweb-1 named\t# ember",
                "10.1.2.3\tdb\t# ember",
                f"{gateway}\thost.docker.internal\t# ember",
                "2001:db8::1\tv6\t# ember",
                "search example.com",
                "nameserver 10.0.0.53",
            ], out
    finally:
        ember("rm", "-f", "named")


def test_a_volume_keeps_what_one_machine_wrote_for_the_next(ember: Ember, busybox: str) -> None:
    write = ember("run", "--rm", "-v", "vdata:/data/sub", busybox, "sh", "-c",
                  "echo kept > /data/sub/f && grep ' /data/sub ' /proc/mounts")  # fmt: skip
    assert write.returncode == 0, write.stderr
    assert write.stdout.startswith("/dev/vdb /data/sub ext4 rw,"), write.stdout
    read = ember("run", "--rm", "-v", "vdata:/srv:ro", busybox, "sh", "-c",
                 "cat /srv/f; touch /srv/x 2>/dev/null || echo read-only")  # fmt: skip
    assert (read.returncode, read.stdout) == (0, "kept\nread-only\n"), read.stderr
    # (that the guest leaves a volume clean: tests/vm/test_boot.py)
    assert json.loads(ember("volume", "inspect", "vdata").stdout)[0]["machines"] == []
    holder = ember("run", "-d", "--name", "holder", "-v", "vdata:/data", busybox, "sleep", "600")
    try:
        assert holder.returncode == 0, holder.stderr
        second = ember("run", "--rm", "-v", "vdata:/data", busybox, "true")
        assert second.returncode == 125
        assert "ember: volume vdata is in use by machine holder, which is running" in second.stderr
        removal = ember("volume", "rm", "vdata")
        assert removal.returncode != 0 and "in use by machine holder" in removal.stderr
    finally:
        ember("rm", "-f", "holder")
    assert ember("volume", "rm", "vdata").stdout == "vdata\n"
    assert ember("volume", "ls", "-q").stdout == ""


def test_a_new_volume_gets_the_image_files_at_its_target_unless_nocopy(
    ember: Ember, busybox: str
) -> None:
    """Docker's copy-up: a new volume over the image's /bin holds its busybox and applet
    links (the shell the program runs is the volume's); one over /etc with ``nocopy``
    stays empty."""
    res = ember("run", "--rm", "-v", "vbin:/bin", "-v", "vetc:/etc:nocopy", busybox, "sh", "-c",
                "grep -E ' /(bin|etc) ' /proc/mounts | cut -d' ' -f1,2; readlink /bin/sh; "
                "test -e /etc/passwd || echo no-passwd")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "/dev/vdb /bin\n/dev/vdc /etc\nbusybox\nno-passwd\n", res.stdout
    assert ember("volume", "rm", "vbin", "vetc").returncode == 0


def test_a_volume_left_mounted_by_a_killed_machine_mounts_read_only(
    ember: Ember, busybox: str
) -> None:
    """Its journal needs replaying: from a read-only disk the guest's kernel refused to
    mount it ("cannot mount /dev/vdb on /data: Read-only file system", exit 125)."""
    res = ember("run", "-d", "--name", "dies", "-v", "vrec:/data", busybox, "sh", "-c",
                "echo x > /data/f && sync && echo ready && sleep 600")  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 120
        while "ready" not in ember("logs", "dies").stdout:
            assert time.monotonic() < deadline, ember("logs", "dies")
            time.sleep(0.2)
    finally:
        assert ember("rm", "-f", "dies").returncode == 0  # its VMM killed, /data mounted
    read = ember("run", "--rm", "-v", "vrec:/data:ro", busybox, "sh", "-c",
                 "cat /data/f; touch /data/y 2>/dev/null || echo read-only")  # fmt: skip
    assert (read.returncode, read.stdout) == (0, "x\nread-only\n"), read.stderr
    assert ember("volume", "rm", "vrec").returncode == 0


def _read_until(fd: int, token: bytes, timeout: float = 60) -> bytes:
    """Read a terminal's master until ``token`` comes, answering cursor position queries
    as a terminal does."""
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while token not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], seen
        data = os.read(fd, 4096)
        if b"\x1b[6n" in data:  # busybox's line editing asks where the cursor is
            os.write(fd, b"\x1b[1;1R")
        seen += data
    return seen


def test_exec_runs_commands_beside_the_program(ember: Ember, busybox: str, tmp_path: Path) -> None:
    res = ember("run", "-d", "--name", "host", "-e", "FROM_RUN=run", busybox, "sleep", "600")
    assert res.returncode == 0, res.stderr
    try:
        out = ember("exec", "host", "sh", "-c", 'echo "out $FROM_RUN $(id -u) $(pwd)"; echo err >&2; exit 3')
        assert (out.returncode, out.stdout, out.stderr) == (3, "out run 0 /\n", "err\n")
        (tmp_path / "env").write_text("# comment\nFROM_RUN=file\nF=from file\n")
        filed = ember("exec", "--env-file", str(tmp_path / "env"), "-e", "F=flag", "host", "sh", "-c",
                      'echo "$FROM_RUN $F"')  # fmt: skip
        assert (filed.returncode, filed.stdout) == (0, "file flag\n"), filed.stderr
        unreadable = ember("exec", "--env-file", str(tmp_path / "none"), "host", "true")
        assert unreadable.returncode == 2 and "cannot read env file" in unreadable.stderr
        piped = ember("exec", "-i", "-e", "X=1", "-u", "app", "-w", "/tmp", "host", "sh", "-c",
                      'cat; echo "$X $(id -un) $(pwd)"', input="through stdin\n")  # fmt: skip
        assert (piped.returncode, piped.stdout) == (0, "through stdin\n1 app /tmp\n"), piped.stderr
        # a terminal (its size the client's: 24 x 80 when it has none), output on stdout
        # (its CRLFs read back as newlines by the text-mode capture)
        term = ember("exec", "-t", "host", "sh", "-c", "tty; stty size; echo e >&2")
        assert (term.returncode, term.stdout) == (0, "/dev/pts/0\n24 80\ne\n"), term.stderr
        # on a real terminal: raw while it runs, Ctrl-C a key for the command's terminal
        master, slave = os.openpty()
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", ember.netns, EMBER, "exec", "-it", "host", "sh"],
                                    stdin=slave, stdout=slave, stderr=slave, env=ember.env())  # fmt: skip
            _read_until(master, b"# ")  # its prompt: busybox's sh has a terminal
            os.write(master, b"echo go; sleep 100\n")
            _read_until(master, b"\r\ngo\r\n")  # (the line itself is echoed first)
            time.sleep(0.5)  # the sleep runs
            os.write(master, b"\x03")  # SIGINT for it, by its terminal in the guest
            os.write(master, b"echo after-$?; exit 7\n")
            _read_until(master, b"after-130")
            assert proc.wait(60) == 7
            assert termios.tcgetattr(slave)[3] & termios.ECHO  # the terminal restored
        finally:
            os.close(master)
            os.close(slave)
        not_tty = ember("exec", "-it", "host", "true", input="")
        assert not_tty.returncode == 2 and "not a terminal" in not_tty.stderr
        missing = ember("exec", "host", "no-such-command")
        assert missing.returncode == 127 and "executable file not found" in missing.stderr
        refused = ember("exec", "-u", "nobody-here", "host", "true")
        assert refused.returncode == 126 and "nobody-here" in refused.stderr
        # ember top: the guest's processes, read by its ember-init; the program's parent is PID 1
        top = ember("top", "host", check=True).stdout.splitlines()
        assert top[0].split() == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
        rows = [line.split(None, 7) for line in top[1:]]
        assert ["root", "1", "sleep 600"] in [[r[0], r[2], r[7]] for r in rows], top
        assert not any("--ps" in r[7] for r in rows)  # not the tool itself
        assert ember("exec", "-d", "host", "sh", "-c", "echo later > /tmp/d").returncode == 0
        deadline = time.monotonic() + 30
        while ember("exec", "host", "cat", "/tmp/d").stdout != "later\n":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        ember("rm", "-f", "host")
    gone = ember("exec", "host", "true")
    assert gone.returncode == 1 and "no such machine" in gone.stderr


def test_run_with_stdin_or_a_terminal_and_attach(ember: Ember, busybox: str) -> None:
    # -i: our stdin, to its end, is the program's
    piped = ember("run", "-i", "--rm", busybox, "sh", "-c", "cat; echo done", input="through stdin\n")
    assert (piped.returncode, piped.stdout) == (0, "through stdin\ndone\n"), piped.stderr
    # more than init holds for a program that reads slowly: nothing lost or reordered
    big = base64.b64encode(os.urandom(3 << 20)).decode()
    summed = ember("run", "-i", "--rm", busybox, "sh", "-c", "sleep 1; md5sum", input=big)
    assert summed.stdout.split()[:1] == [hashlib.md5(big.encode()).hexdigest()], summed.stderr
    # kept open for its next run: start -i passes ours again
    first = ember("run", "-i", "--name", "again", busybox, "sh", "-c", 'read x; echo "got $x"', input="one\n")
    assert (first.returncode, first.stdout) == (0, "got one\n"), first.stderr
    again = ember("start", "-i", "again", input="two\n")
    assert (again.returncode, again.stdout) == (0, "got two\n"), again.stderr
    ember("rm", "again", check=True)
    not_tty = ember("run", "-it", "--rm", busybox, "true", input="")
    assert not_tty.returncode == 125 and "not a terminal" in not_tty.stderr
    # -it on a real terminal: its size, what is typed, Ctrl-P Ctrl-Q lets go of it
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", ember.netns, EMBER, "run", "-it", "--name", "term",
                                 busybox, "sh"], stdin=slave, stdout=slave, stderr=slave, env=ember.env())  # fmt: skip
        _read_until(master, b"# ")
        os.write(master, b"stty size; echo hi-$((6*7))\n")
        _read_until(master, b"33 101\r\nhi-42")
        os.write(master, b"\x10\x11")
        assert proc.wait(60) == 0
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # the terminal restored
        assert ember("ps", "-q", "--filter", "name=term").stdout.strip(), "it runs on"
        # attached again: the program's exit code is attach's
        proc = subprocess.Popen(["ip", "netns", "exec", ember.netns, EMBER, "attach", "term"],
                                stdin=slave, stdout=slave, stderr=slave, env=ember.env())  # fmt: skip
        time.sleep(1)  # (attached: what is typed before that waits in our terminal anyway)
        os.write(master, b"echo again-$((1+1)); exit 5\n")
        _read_until(master, b"again-2")
        assert proc.wait(60) == 5
    finally:
        os.close(master)
        os.close(slave)
        logs = ember("logs", "term").stdout
        ember("rm", "-f", "term")
    assert "hi-42" in logs and "again-2" in logs  # what the terminal showed is the log
    # attach to a machine whose program has no stdin: its output only
    res = ember("run", "-d", "--name", "plain", busybox, "sh", "-c", 'sleep 3; read x; echo "read $? [$x]"')
    assert res.returncode == 0, res.stderr
    try:
        attached = ember("attach", "plain", input="ignored\n")
        assert (attached.returncode, attached.stdout) == (0, "read 1 []\n"), attached.stderr
    finally:
        ember("rm", "-f", "plain")


def test_pause_freezes_a_machine_until_unpause(ember: Ember, busybox: str) -> None:
    res = ember("run", "-d", "--name", "frozen", busybox, "sh", "-c",
                'trap "" HUP; i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done')  # fmt: skip
    assert res.returncode == 0, res.stderr

    def lines() -> int:
        return len(ember("logs", "frozen", check=True).stdout.splitlines())

    def grows_by(n: int) -> None:
        start, deadline = lines(), time.monotonic() + 60
        while lines() < start + n:
            assert time.monotonic() < deadline, "the machine's program does not run"
            time.sleep(0.2)

    def status() -> str:
        (row,) = json.loads(ember("ps", "-a", "--json", check=True).stdout)
        return str(row["status"])

    try:
        grows_by(3)
        assert ember("pause", "frozen", check=True).stdout == "frozen\n"
        (row,) = json.loads(ember("ps", "--json", check=True).stdout)  # listed without -a
        assert row["status"] == "paused"
        assert "(Paused)" in ember("ps", "--format", "{{.Status}}", check=True).stdout
        assert ember("ps", "-q", "--filter", "status=paused", check=True).stdout.strip() == row["id"][:12]
        frozen_at = lines()
        time.sleep(1.5)  # ~15 lines, were it running
        assert lines() <= frozen_at + 1
        for refused in (["exec", "frozen", "true"], ["top", "frozen"]):
            out = ember(*refused)
            assert out.returncode != 0 and "paused" in out.stderr and "ember unpause frozen" in out.stderr, refused
        again = ember("pause", "frozen")
        assert again.returncode == 1 and "already paused" in again.stderr
        # a signal is queued, as docker queues it: the machine stays paused
        assert ember("kill", "-s", "HUP", "frozen").returncode == 0 and status() == "paused"
        assert ember("unpause", "frozen", check=True).stdout == "frozen\n"
        grows_by(3)
        assert status() == "running"
        not_paused = ember("unpause", "frozen")
        assert not_paused.returncode == 1 and "not paused" in not_paused.stderr
        # stop of a paused machine: it runs on to take the stop (docker since 17.07)
        ember("pause", "frozen", check=True)
        assert ember("stop", "-t", "5", "frozen").returncode == 0
        assert status() == "exited"
        # and rm -f of a paused one removes it as a running one (its VMM killed)
        ember("start", "frozen", check=True)
        ember("pause", "frozen", check=True)
        assert ember("rm", "-f", "frozen").returncode == 0
        assert ember("ps", "-aq", check=True).stdout == ""
    finally:
        ember("rm", "-f", "frozen")


def test_http_through_published_port_then_stop(ember: Ember, busybox: str) -> None:
    # -p 80: a host port left for ember to choose, as docker does
    res = ember("run", "-d", "--name", "web", "-p", "8080:80", "-p", "80", "-l", "app=web",
                "--label", "tier", busybox, "sh", "-c", SERVER)  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "ready" not in ember("logs", "web").stdout:
            time.sleep(0.3)
        ps = ember("ps", "--json", check=True)
        (row,) = json.loads(ps.stdout)
        assert row["name"] == "web" and row["status"] == "running"
        assert {k: v for k, v in row["labels"].items() if not k.startswith("ember.")} == {
            "app": "web", "tier": ""
        }  # fmt: skip
        for matching in (["label=app=web", "label=tier"], ["status=running"], ["ancestor=" + busybox]):
            got = ember("ps", "-q", *(f"--filter={f}" for f in matching), check=True).stdout
            assert got == row["id"][:12] + "\n", matching
        assert ember("ps", "-q", "--filter=status=exited", check=True).stdout == ""
        gateway = row["network"]["gateway"]
        chosen = next(p["host_port"] for p in row["network"]["ports"] if p["host_port"] != 8080)
        # from the host itself: loopback and the host's own address on the TAP
        assert fetch(ember, "http://127.0.0.1:8080/index.html") == "hello over -p\n"
        assert fetch(ember, f"http://{gateway}:8080/index.html") == "hello over -p\n"
        assert fetch(ember, f"http://127.0.0.1:{chosen}/index.html") == "hello over -p\n"
        assert ember("port", "web", "80", check=True).stdout.split() == [
            "0.0.0.0:8080", f"0.0.0.0:{chosen}"
        ]
        assert f"80/tcp -> 0.0.0.0:{chosen}" in ember("port", "web", check=True).stdout
        missing = ember("port", "web", "81")
        assert missing.returncode == 1 and "no public port 81/tcp" in missing.stderr
        # what it used: the VMM's memory against the guest's, the bytes of those requests
        used = json.loads(ember("stats", "--no-stream", "--format", "json", "web", check=True).stdout)
        assert used["Name"] == "web" and used["CPUPerc"].endswith("%")
        assert used["MemUsage"].endswith(" / 512MiB") and not used["MemUsage"].startswith("0B")
        received, sent = used["NetIO"].split(" / ")
        assert received != "0B" and sent != "0B", used
        # the machine's monitor holds its host ports: a host program cannot take one
        assert bind_on_host(ember, 8080) == str(errno.EADDRINUSE)
        assert ember("rm", "web").returncode != 0  # running: needs -f
        res = ember("stop", "web")
        assert res.returncode == 0, res.stderr
        st = ember.inspect("web")
        assert (st["status"], st["exit_code"]) == ("exited", 42)
        assert "got TERM" in ember("logs", "web").stdout
        assert ember("ps", "-q").stdout == ""
        assert "web" in ember("ps", "-a").stdout
        exited = ember("ps", "-q", "--no-trunc", "--filter=status=exited", "--filter=exited=42")
        assert exited.stdout == row["id"] + "\n"
        assert fetch(ember, "http://127.0.0.1:8080/index.html").startswith("FAIL")
        assert bind_on_host(ember, 8080) == "bound"  # let go with the machine
    finally:
        ember("rm", "-f", "web")
    assert ember("inspect", "web").returncode != 0


def test_sigterm_ignoring_guest_is_killed_after_timeout(ember: Ember, busybox: str) -> None:
    res = ember("run", "-d", "--name", "stubborn", busybox, "sh", "-c",
                'trap "" TERM; echo ready; while :; do sleep 0.1; done')  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "ready" not in ember("logs", "stubborn").stdout:
            time.sleep(0.3)
        # `ember wait` blocks until the machine has stopped, then prints its exit code
        waiting = subprocess.Popen(
            ["ip", "netns", "exec", ember.netns, EMBER, "wait", "stubborn"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ember.env(),
        )  # fmt: skip
        time.sleep(0.5)
        assert waiting.poll() is None  # still running: still waiting
        res = ember("stop", "-t", "2", "stubborn")
        assert res.returncode == 0, res.stderr
        out, err = waiting.communicate(timeout=60)
        assert (waiting.returncode, out) == (0, "137\n"), err
        st = ember.inspect("stubborn")
        assert (st["status"], st["exit_code"]) == ("exited", 137)
        assert ember("wait", "stubborn", check=True).stdout == "137\n"  # exited: at once
    finally:
        ember("rm", "-f", "stubborn")


def test_kill(ember: Ember, busybox: str) -> None:
    res = ember("run", "-d", "--name", "victim", "--kernel-arg", "loglevel=7", busybox,
                "sh", "-c", "echo ready; while :; do sleep 0.1; done")  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "ready" not in ember("logs", "victim").stdout:
            time.sleep(0.3)
        follow = subprocess.Popen(
            ["ip", "netns", "exec", ember.netns, EMBER, "logs", "-f", "victim"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ember.env(),
            text=True,
        )
        assert ember("kill", "victim").returncode == 0
        # logs -f ends by itself once the machine has ended
        out, _ = follow.communicate(timeout=60)
        assert follow.returncode == 0 and out == "ready\n"
        st = ember.inspect("victim")
        assert (st["status"], st["exit_code"]) == ("exited", 137)
        # --kernel-arg reached the guest kernel: info messages are on the console now
        console = (Path(st["dir"]) / "console.log").read_text(errors="replace")
        assert "Run /init as init process" in console
        assert ember("run", "--name", "victim", "--rm", busybox, "true").returncode != 0
    finally:
        ember("rm", "-f", "victim")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_gracefully(ember: Ember, busybox: str, signum: int) -> None:
    """Ctrl-C, and SIGTERM as ``docker run`` passes it on: a graceful stop."""
    script = 'trap "echo stopping; exit 42" TERM; echo ready; while :; do sleep 0.1; done'
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ember.netns, EMBER, "run", "--rm", busybox, "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ember.env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)  # `ip netns exec` execs ember: same process
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 42, err
    assert out == "stopping\n"
    assert ("Ctrl-C again" if signum == signal.SIGINT else "the signal again") in err
    assert leftovers(ember) == []


def test_a_stop_the_guest_cannot_act_on_ends_in_a_kill(ember: Ember, busybox: str) -> None:
    """A guest too busy to act on the stop (thrashing, hung): the attached run waited for
    ever after a `timeout`'s one SIGTERM, where `ember stop` kills the VMM once the stop
    timeout and a grace period have passed.  Here the VMM is frozen with SIGSTOP."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ember.netns, EMBER, "run", "--rm", "--name", "frozen",
         "--stop-timeout", "1", busybox, "sh", "-c", "echo ready; sleep 1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ember.env(), text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        os.kill(ember.inspect("frozen")["vmm_pid"], signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 137, err
    assert "frozen did not stop within 1 s: killing it" in err
    assert leftovers(ember) == []


def test_a_guest_kernel_panic_is_said(ember: Ember, busybox: str) -> None:
    """A guest whose kernel panics gives no exit report: the reason was only "no exit
    report (see console.log)", where the kernel had said why."""
    res = ember("run", "--rm", busybox, "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert res.returncode == 255, res.stderr
    assert "the guest's kernel panicked: sysrq triggered crash" in res.stderr
    assert leftovers(ember) == []


def test_a_hang_up_reaches_the_program_as_sighup(ember: Ember, busybox: str) -> None:
    """Its terminal closed (or, through the agent, its client gone): the program gets
    SIGHUP, as docker's sig-proxy passes it on; not a stop."""
    script = 'trap "echo hung up; exit 7" HUP; trap "echo stopped; exit 9" TERM; echo ready; while :; do sleep 0.1; done'
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ember.netns, EMBER, "run", "--rm", busybox, "sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ember.env(), text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 7, err
    assert out == "hung up\n"
    assert leftovers(ember) == []


def test_lost_monitor_is_noticed(ember: Ember, busybox: str) -> None:
    res = ember("run", "-d", "--name", "orphan", busybox, "sleep", "1000")
    assert res.returncode == 0, res.stderr
    machine_id = res.stdout.strip()
    st = ember.inspect("orphan")
    assert st["status"] == "running"
    os.kill(st["monitor_pid"], signal.SIGKILL)
    # QEMU dies with its monitor (PR_SET_PDEATHSIG); the next look repairs the record
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{st['vmm_pid']}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{st['vmm_pid']}/cmdline").exists() or (
        machine_id not in Path(f"/proc/{st['vmm_pid']}/cmdline").read_text(errors="replace")
    )
    rows = json.loads(ember("ps", "-a", "--json", check=True).stdout)
    (row,) = [r for r in rows if r["name"] == "orphan"]
    assert row["status"] == "exited" and "monitor" in row["end_reason"]
    assert f"em-{machine_id[:12]}" not in ember.sh("ip", "-o", "link").stdout
    assert ember("rm", "orphan").returncode == 0
    assert leftovers(ember, machine_id) == []


def test_an_rm_machine_whose_run_and_monitor_were_killed_is_removed(
    ember: Ember, busybox: str
) -> None:
    """Nobody was left to remove it: it stayed "Exited (255)" with its disk and a lease
    that never expires, until someone ran ember rm (dockerd removes it when it is back)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ember.netns, EMBER, "run", "--rm", "--name", "doomed", busybox,
         "sh", "-c", "echo up; sleep 1000"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ember.env(), text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        st = ember.inspect("doomed")
        proc.kill()  # `ip netns exec` execs ember: the run itself
        proc.wait(30)
        os.kill(st["monitor_pid"], signal.SIGKILL)
    finally:
        proc.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{st['vmm_pid']}").exists():
        time.sleep(0.1)
    ember("ps", "-a", check=True)  # the next look notices, and removes it
    assert ember("inspect", "doomed").returncode != 0
    assert leftovers(ember, st["id"]) == []


def test_own_kernel_memory_cpus_disk_size(ember: Ember, busybox: str) -> None:
    """--kernel with a bzImage (ember boots its extracted ELF) and its modules dir."""
    kernel = cached_kernel()
    assert kernel.vmlinuz is not None and kernel.modules_dir is not None
    res = ember("run", "--rm", "--kernel", str(kernel.vmlinuz), "--kernel-modules",
                str(kernel.modules_dir), "--memory", "256", "--cpus", "2", "--disk-size", "3G",
                busybox, "sh", "-c",
                "uname -r; nproc; grep MemTotal /proc/meminfo; df -k / | tail -1")  # fmt: skip
    assert res.returncode == 0, res.stderr
    release, cpus, mem, df = res.stdout.splitlines()
    assert release == kernel.version and cpus == "2"
    assert 128 * 1024 < int(mem.split()[1]) <= 256 * 1024
    assert 2.5 * (1 << 20) < int(df.split()[1]) <= 3 * (1 << 20)  # KiB of the root fs


def test_machines_reach_each_other_only_within_a_network(ember: Ember, busybox: str) -> None:
    serve = "mkdir /www && echo from-a > /www/index.html && echo ready && httpd -f -p 80 -h /www"
    res = ember("run", "-d", "--name", "srv-a", busybox, "sh", "-c", serve)
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "ready" not in ember("logs", "srv-a").stdout:
            time.sleep(0.3)
        ip = ember.inspect("srv-a")["network"]["guest_ip"]
        # (busybox-static's wget segfaults with -T, so the blocked case uses nc -w)
        url = f"http://{ip}:80/index.html"
        probe = f"echo | nc -w 3 {ip} 80 >/dev/null && echo connected || echo blocked"
        same = ember("run", "--rm", busybox, "sh", "-c", f"wget -q -O - {url}; {probe}")
        assert (same.returncode, same.stdout) == (0, "from-a\nconnected\n"), same.stderr
        other = ember("run", "--rm", "--network", "tenant_b", busybox, "sh", "-c", probe)
        assert other.stdout == "blocked\n", other.stderr
    finally:
        ember("rm", "-f", "srv-a")


WHOAMI = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode() + b"\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer((sys.argv[1], 8000), H)
print("ready", flush=True)  # bound and listening
server.serve_forever()
"""


def test_egress_is_masqueraded(ember: Ember, busybox: str) -> None:
    """The host's uplink leads to another namespace ("the internet") that has no route
    back to the machine subnet: replies only arrive if ember's NAT rewrote the source."""
    internet = new_netns()
    try:
        subprocess.run(["ip", "-n", ember.netns, "link", "add", "uplink", "type", "veth",
                        "peer", "name", "eth0", "netns", internet], check=True)  # fmt: skip
        subprocess.run(["ip", "-n", ember.netns, "addr", "add", "10.99.0.1/24", "dev", "uplink"],
                       check=True)  # fmt: skip
        subprocess.run(["ip", "-n", ember.netns, "link", "set", "uplink", "up"], check=True)
        subprocess.run(["ip", "-n", internet, "addr", "add", "10.99.0.2/24", "dev", "eth0"],
                       check=True)  # fmt: skip
        subprocess.run(["ip", "-n", internet, "link", "set", "eth0", "up"], check=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", internet, sys.executable, "-c", WHOAMI, "10.99.0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert server.stdout is not None
            assert read_line(server.stdout) == "ready\n"  # it listens before the guest asks
            res = ember("run", "--rm", busybox, "wget", "-q", "-O", "-",
                        "http://10.99.0.2:8000/")  # fmt: skip
        finally:
            server.kill()
            server.wait()
        assert (res.returncode, res.stdout) == (0, "10.99.0.1\n"), res.stderr
    finally:
        delete_netns(internet)
