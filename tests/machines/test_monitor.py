"""Pure parts of the monitor: its control relay (against a one-client socket like QEMU's)
and the VMM's last words in the end reason."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ember.machines.control import ControlRelay
from ember.machines.controllines import stop_request
from ember.machines.monitor import MAX_VMM_ERROR, vmm_last_error
from ember.vm.vmm.base import open_control


class OneClientServer:
    """Serves like QEMU's socket chardev: one client at a time, the next one only once
    the first hung up; records what each connection brought."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.received.append(b"")
            with conn:
                while data := conn.recv(4096):
                    self.received[-1] += data

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_bye_reaches_the_guest_while_a_client_holds_its_connection(tmp_path: Path) -> None:
    """``ember stop`` keeps its connection until the machine ends: the monitor's bye went
    over a second one, which QEMU never read (the guest waited out its exit_ack)."""
    vmm = OneClientServer(tmp_path / "vmm-control.sock")
    relay = ControlRelay(tmp_path / "control.sock", tmp_path / "vmm-control.sock")
    try:
        relay.send(b"stop")  # before the connection: queued
        relay.connect()
        stopper = open_control(tmp_path / "control.sock")  # held open, like ember stop
        stopper.sendall(b"kill\nnonsense\nsignal 10\nsignal 99\n")
        _until(lambda: vmm.received and vmm.received[0].count(b"\n") >= 3)
        relay.send(b"bye")
        _until(lambda: vmm.received[0].endswith(b"bye\n"))
        assert vmm.received == [b"stop\nkill\nsignal 10\nbye\n"]
        # a client may hang up at once: its line is passed on all the same
        quick = open_control(tmp_path / "control.sock")
        quick.sendall(b"signal 1\n")
        quick.close()
        _until(lambda: vmm.received[0].endswith(b"signal 1\n"))
        stopper.close()
    finally:
        relay.close()
        vmm.close()
    assert not (tmp_path / "control.sock").exists()


def test_a_stop_carries_its_timeout_to_the_guest(tmp_path: Path) -> None:
    """``ember stop -t N``: the guest printed (and armed) the run config's 10 s whatever
    -t was.  The timeout goes on a line of its own before ``stop``, which the relay
    passes on (-1: no SIGKILL), and out-of-range ones it drops."""
    assert stop_request(3) == b"stop_timeout 3\nstop\n"
    assert stop_request(None) == b"stop_timeout -1\nstop\n"
    assert stop_request(0) == b"stop_timeout 0\nstop\n"
    for bad in (-1, 86401):
        with pytest.raises(ValueError):
            stop_request(bad)
    vmm = OneClientServer(tmp_path / "vmm-control.sock")
    relay = ControlRelay(tmp_path / "control.sock", tmp_path / "vmm-control.sock")
    try:
        relay.connect()
        c = open_control(tmp_path / "control.sock")
        c.sendall(b"stop_timeout -2\nstop_timeout 007\nstop_timeout 999999\n")
        c.sendall(stop_request(None) + stop_request(86400))
        _until(lambda: vmm.received and vmm.received[0].count(b"\n") >= 4)
        assert vmm.received == [b"stop_timeout -1\nstop\nstop_timeout 86400\nstop\n"]
        c.close()
    finally:
        relay.close()
        vmm.close()


def test_a_long_machine_dir_is_served_too(tmp_path: Path) -> None:
    d = tmp_path / ("x" * 120)
    d.mkdir()
    vmm = OneClientServer(tmp_path / "v.sock")
    relay = ControlRelay(d / "control.sock", tmp_path / "v.sock")
    try:
        relay.connect()
        c = open_control(d / "control.sock")
        c.sendall(b"stop\n")
        _until(lambda: vmm.received == [b"stop\n"])
        c.close()
    finally:
        relay.close()
        vmm.close()


def test_the_vmms_last_error_line() -> None:
    log = (
        b"qemu-system-x86_64: warning: something harmless\n"
        b"qemu-system-x86_64: cannot set up guest memory 'microvm.ram': Cannot allocate memory\n"
        b"\n"
    )
    assert vmm_last_error(log) == (
        "qemu-system-x86_64: cannot set up guest memory 'microvm.ram': Cannot allocate memory"
    )
    assert vmm_last_error(b"") is None
    assert vmm_last_error(b"\n \n") is None
    hostile = vmm_last_error(b"x\x1b[2J\x07 \xff" + b"y" * 1000 + b"\n")
    assert hostile is not None and len(hostile) == MAX_VMM_ERROR
    assert hostile.isprintable() and "\x1b" not in hostile


#: a monitor's SIGTERM handler, in a process of its own: the signal comes while the main
#: thread holds the relay's lock (as inside ``relay.send(b"bye")`` or ``relay.close()``)
TERM_WHILE_LOCKED = r"""
import os, signal, socket, sys, threading, time
from pathlib import Path
from ember.machines.control import ControlRelay
from ember.machines.monitor import stop_on_term
from ember.machines.state import MachineState, VMConfig

d = Path(sys.argv[1])
vmm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
vmm.bind(str(d / "vmm.sock"))
vmm.listen(1)
got = []
def serve():
    conn, _ = vmm.accept()
    while data := conn.recv(4096):
        got.append(data)
threading.Thread(target=serve, daemon=True).start()
relay = ControlRelay(d / "control.sock", d / "vmm.sock")
relay.connect()
st = MachineState(id="0" * 64, name="m", image="i", image_digest="d", created_at="",
                  command=[], config={"stop_timeout": -1},
                  vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1))
stop_on_term(relay, st, d)
with relay._lock:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs meanwhile, on this thread
deadline = time.monotonic() + 5
while b"".join(got) != b"stop_timeout -1\nstop\n" and time.monotonic() < deadline:
    time.sleep(0.01)
relay.close()
os.kill(os.getpid(), signal.SIGTERM)  # after close: nothing to do, nothing written
import ember.machines.monitor as monitor
assert monitor._terminated  # and no restart after it
print(repr(b"".join(got)))
"""


def test_a_sigterm_while_the_relay_is_locked_stops_the_machine(tmp_path: Path) -> None:
    """The monitor's SIGTERM handler called ``relay.send``, which takes the relay's lock:
    a SIGTERM while the main thread was inside ``send(b"bye")`` or ``close()`` waited
    for ever on its own thread's lock (the monitor hung, its VMM ran on).  The handler
    now leaves the lines to the relay's thread; with the machine's own stop timeout."""
    res = subprocess.run(
        [sys.executable, "-c", TERM_WHILE_LOCKED, str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "b'stop_timeout -1\\nstop\\n'\n", res.stderr


def test_a_vmm_that_cannot_be_made_is_a_failed_start_not_a_dead_monitor(tmp_path: Path) -> None:
    """A kernel given with --kernel and moved since (or a spec out of range) failed
    before the guarded VMM start: the monitor died with a traceback, the record stayed
    "created" and the machine's network allocated.  Now the start fails and says why."""
    from ember.home import Home
    from ember.machines import monitor
    from ember.machines import state as mstate
    from ember.machines.events import EventWriter
    from ember.machines.store import MachineStore
    from tests.machines.test_store import make_state

    home = Home(tmp_path)
    st = make_state()
    st.vm.kernel = str(tmp_path / "moved-away" / "vmlinux")
    store = MachineStore(home)
    store.create(st, None)
    assert monitor.run(home, st.id, EventWriter(None)) == 1
    cur = mstate.read_state(store.dir(st.id))
    assert (cur.status, cur.exit_code) == (mstate.EXITED, 125)
    assert "moved-away/vmlinux does not exist" in (cur.error or ""), cur


def test_a_sigterm_stops_the_machine_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: `kill MONITOR` stopped the run but not the restart policy (the
    record never said stopped by the user): --restart always ran the machine again,
    and a SIGTERM between two runs was lost."""
    import time

    from ember.home import Home
    from ember.machines import monitor
    from ember.machines import state as mstate
    from ember.machines.store import MachineStore
    from tests.machines.test_store import make_state

    store = MachineStore(Home(tmp_path))
    st = make_state()
    st.status, st.exit_code, st.restart_policy = mstate.EXITED, 143, "always"
    store.create(st, None)
    d = store.dir(st.id)
    final = mstate.read_state(d)
    assert monitor._stopped_by_term(d, final) is final  # no SIGTERM: as it was
    assert monitor._wait_unless_stopped(d, 0.3) is True
    monkeypatch.setattr(monitor, "_terminated", True)
    marked = monitor._stopped_by_term(d, final)
    assert marked.stopped_by_user and mstate.read_state(d).stopped_by_user
    # between two runs: the backoff ends at once, and the record says so
    with mstate.update(d) as cur:
        cur.stopped_by_user = False
    began = time.monotonic()
    assert monitor._wait_unless_stopped(d, 30) is False
    assert time.monotonic() - began < 5
    # and run() records it as a stop, as after the run
    assert monitor._stopped_by_term(d, mstate.read_state(d)).stopped_by_user
    assert mstate.read_state(d).stopped_by_user


def test_handing_a_machine_to_a_monitor_that_has_exited_is_said() -> None:
    """The monitor gone before it took the id (killed, crashed at import): the write's
    BrokenPipeError reached main as a closed stdout, and ember run exited 141 without a
    word."""
    import os

    from ember.machines import state as mstate
    from ember.machines.errors import MachineError
    from ember.machines.lifecycle import MonitorHandle
    from ember.machines.state import MachineState, VMConfig

    go_r, go_w = os.pipe()
    sync_r, sync_w = os.pipe()
    os.close(go_r)  # the monitor's end, gone with it
    os.close(sync_w)
    handle = MonitorHandle(os.getpid(), go_w, sync_r, log=Path("/x/monitor.log"))
    st = MachineState(
        id="a" * 64, name="m", image="oci:/x:latest", image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(), command=["true"], config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
    )  # fmt: skip
    with pytest.raises(MachineError, match="exited before it took the machine") as caught:
        handle.hand_over(st)
    assert not handle.handed and handle.go_w is None
    assert "/x/monitor.log" in (caught.value.hint or "")
    handle.close()


class _Process:
    """A VM stand-in: a real process, killed as ``VM.kill`` kills a VMM."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["sleep", "60"])
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()


def test_a_sigterm_the_guest_does_not_end_by_is_a_host_kill_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill MONITOR` asked the guest to stop and nothing more: a hung guest never ended
    (ember stop kills the VMM once the stop timeout and KILL_GRACE are over)."""
    from ember.home import Home
    from ember.machines import monitor
    from ember.machines import state as mstate
    from ember.machines.store import MachineStore
    from tests.machines.test_store import make_state

    monkeypatch.setattr(monitor, "KILL_GRACE", 0.3)
    home = Home(tmp_path)
    st = make_state()
    MachineStore(home).create(st, "hung")
    d = MachineStore(home).dir(st.id)
    hung, prompt = _Process(), _Process()
    try:
        stopper = monitor.TermStop(d, 0)
        stopper.vm = hung  # type: ignore[assignment]
        stopper.ask()
        stopper.ask()  # a second SIGTERM (systemd, then someone) took the kill back
        assert hung.proc.wait(timeout=10) == -9
        assert mstate.read_state(d).stopped_by_user  # the end is the host's kill: 137
        # one that ends in time is left alone; so is one whose stop timeout is -1
        for timeout, vm in ((0, prompt), (None, prompt)):
            stopper = monitor.TermStop(d, timeout)
            stopper.vm = vm  # type: ignore[assignment]
            stopper.ask()
            if timeout is not None:
                stopper.end()
            stopper.watcher.join(10)  # done with this run, without a kill
            assert not stopper.watcher.is_alive() and vm.proc.poll() is None
            stopper.end()
        stopper.end()  # twice, and a late ask: nothing happens
        stopper.ask()
    finally:
        for p in (hung, prompt):
            p.proc.kill()
            p.proc.wait()


def test_a_sigterm_while_the_monitor_starts_does_not_kill_it(tmp_path: Path) -> None:
    """Before its handler was installed (in the first run), a SIGTERM killed the monitor
    outright: its machine ended as "the machine's monitor disappeared" (255) instead of
    being stopped.  It starts with SIGTERM blocked and notes it."""
    import os
    import signal

    from ember.home import Home
    from ember.machines import lifecycle

    def sigterm_blocked() -> bool:
        status = Path(f"/proc/{handle.pid}/status").read_text().splitlines()
        blocked = int(next(line.split()[1] for line in status if line.startswith("SigBlk:")), 16)
        return bool(blocked & (1 << (signal.SIGTERM - 1)))

    home = Home(tmp_path)
    handle = lifecycle.start_monitor(home)
    try:
        os.kill(handle.pid, signal.SIGTERM)  # while its interpreter starts
        deadline = time.monotonic() + 60
        # until its handler takes over (unblocking delivers the pending one to it)
        while sigterm_blocked():
            assert os.waitpid(handle.pid, os.WNOHANG) == (0, 0), "the SIGTERM killed it"
            assert time.monotonic() < deadline, "the monitor never unblocked SIGTERM"
            time.sleep(0.02)
        time.sleep(0.1)  # (a default action would have ended it by now)
        assert os.waitpid(handle.pid, os.WNOHANG) == (0, 0), "the SIGTERM killed it"
    finally:
        handle.abandon()  # no machine: it exits
        handle.close()
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, set()) & {signal.SIGTERM}


def test_a_template_gone_before_its_restore_boots_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template was looked at when the machine was made and opened by its VMM's
    start: removed in between (another machine's failed restore, a build's pruning,
    ember gc), the start failed and the machine ended with 125 instead of booting."""
    from ember.home import Home
    from ember.machines import monitor
    from ember.machines import state as mstate
    from ember.machines.store import MachineStore
    from ember.vm.vmm.errors import VMMError
    from tests.machines.test_store import make_state

    home = Home(tmp_path)
    st = make_state()
    st.vm.restore = str(tmp_path / "gone.vmstate")
    st.vm.restore_initrd = str(tmp_path / "gone.initrd")
    MachineStore(home).create(st, "late")
    d = MachineStore(home).dir(st.id)

    class FakeVM:
        def __init__(self, spec: object) -> None:
            self.spec = spec

        def start(self) -> int:
            if self.spec.restore is not None:  # type: ignore[attr-defined]
                raise VMMError("cannot open what the VMM needs: No such file or directory")
            return 4242

    class FakeVMM:
        def create(self, spec: object) -> FakeVM:
            return FakeVM(spec)

    monkeypatch.setattr(monitor, "get_vmm", lambda name: FakeVMM())
    spec = monitor.vm_spec(st, d)
    vm, booted, pid = monitor._start_or_boot(d, FakeVM(spec), spec)  # type: ignore[arg-type]
    assert pid == 4242 and booted.restore is None and booted.initrd == Path(st.vm.initrd)
    assert mstate.read_state(d).vm.restore is None  # the record says it booted
    # a template that is there and still fails: a failed start, as before
    (tmp_path / "gone.vmstate").write_bytes(b"")
    (tmp_path / "gone.initrd").write_bytes(b"")
    with pytest.raises(VMMError):
        monitor._start_or_boot(d, FakeVM(spec), spec)  # type: ignore[arg-type]


def test_a_sigterm_lets_a_paused_machine_run_on_to_take_its_stop(tmp_path: Path) -> None:
    """`kill MONITOR` of a paused machine (ember pause): docker unpauses a container it
    stops; the guest must run to read the stop."""
    from ember.home import Home
    from ember.machines import monitor, pause
    from ember.machines.store import MachineStore
    from tests.machines.test_store import make_state

    home = Home(tmp_path)
    st = make_state()
    MachineStore(home).create(st, "paused")
    d = MachineStore(home).dir(st.id)
    vm = _Process()
    try:
        os.kill(vm.pid, signal.SIGSTOP)
        (d / pause.MARKER).write_text("a mark\n")
        stopper = monitor.TermStop(d, None)  # (no kill after: -1)
        stopper.vm = vm  # type: ignore[assignment]
        stopper.ask()
        stopper.watcher.join(10)
        with open(f"/proc/{vm.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "T"
        assert not (d / pause.MARKER).exists()
        stopper.end()
    finally:
        vm.proc.kill()
        vm.proc.wait()
