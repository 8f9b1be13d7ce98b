"""The per-machine monitor (like podman's conmon): ``python -m ember.machines.monitor``.

Started detached (own session) by ``ember run``; it owns the VMM process: starts
it, records ``running`` with the pids, waits for it, records how the machine
ended (the guest's exit report, else what the host saw), frees the network and,
for ``--rm``, removes the machine.  Progress goes to the optional sync fd as events
(``ember.machines.events``) so a foreground ``ember run`` can follow without polling.

It is a module entry point rather than an ``ember`` sub-command so that it starts
without importing the CLI tree (its start is on the critical path of a boot).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from ember.errors import EmberError
from ember.home import Home
from ember.machines import pause as mpause
from ember.machines import state as mstate
from ember.machines.control import VMM_CONTROL, ControlRelay
from ember.machines.controllines import KILL_GRACE, stop_request, stop_timeout_of
from ember.machines.errors import MachineError
from ember.machines.events import EventWriter, Exited, MonitorFailed
from ember.machines.logs import LogConfig
from ember.machines.report import (
    CONSOLE_REASON,
    PANIC_TAIL,
    Outcome,
    outcome,
    parse_console_tail,
    parse_kernel_panic,
    parse_report,
)
from ember.machines.restartpolicy import backoff_s, parse_restart_policy
from ember.machines.restore import AfterRestore, after_unacknowledged_restore
from ember.machines.store import MachineStore
from ember.machines.streams import StreamPump, vmm_fifo
from ember.process import proc_start_time
from ember.vm.vmm import Disk, Nic, VMSpec, get_vmm
from ember.vm.vmm.base import VM, Channels, VMExit
from ember.vm.vmm.qemu import QemuMicrovm  # noqa: F401  (imported before the machine is known)


def vm_spec(st: mstate.MachineState, d: Path, channels: Channels | None = None) -> VMSpec:
    nics: tuple[Nic, ...] = ()
    if st.network:
        nics = (Nic(st.network["tap"], st.network["mac"]),)
    restore, initrd = st.vm.restore, st.vm.initrd
    if restore and st.vm.restore_initrd:
        initrd = st.vm.restore_initrd  # a restore must be given the initrd its template booted with
    else:
        restore = None
    return VMSpec(
        name=st.id,
        kernel=Path(st.vm.kernel),
        initrd=Path(initrd),
        restore=Path(restore) if restore else None,
        channels=channels or Channels.in_dir(d),
        memory_mib=st.vm.memory_mib,
        cpus=st.vm.cpus,
        accel=st.vm.accel,
        cmdline=tuple(st.vm.kernel_args),
        disks=(Disk(Path(st.vm.root_disk)), *volume_disks(st)),
        nics=nics,
        vmm_log=vmm_fifo(d),  # the monitor caps what QEMU says into vmm.log
    )


def volume_disks(st: mstate.MachineState) -> tuple[Disk, ...]:
    """The disks of the machine's volumes, in the order they were given (the guest's
    vdb, vdc, ...).  A read-only one is attached read-only, unless its journal needs
    replaying (a machine that had it read-write ended without unmounting it): a kernel
    refuses to mount such an ext4 from a read-only device, and mounted read-only from a
    writable one it replays the journal and writes nothing else."""
    from ember.snapshots.superblock import needs_recovery
    from ember.volumes.spec import parse_volume

    if len(st.vm.volumes) != len(st.vm.volume_disks):
        raise MachineError(
            f"machine {st.name}'s volumes are not set up (start it again: ember start {st.name})"
        )
    disks = []
    for spec, path in zip(st.vm.volumes, st.vm.volume_disks, strict=True):
        read_only = parse_volume(spec).read_only
        if read_only and needs_recovery(Path(path)):
            print(f"monitor: volume {spec}: attached writable for its journal's replay, "
                  "mounted read-only", file=sys.stderr)  # fmt: skip
            read_only = False
        disks.append(Disk(Path(path), read_only=read_only))
    return tuple(disks)


def _hold_ports(st: mstate.MachineState) -> list[socket.socket]:
    """The machine's published host ports, held while it runs (net.manager.hold_host_ports)."""
    if not st.network or not st.network.get("ports"):
        return []
    from ember.net.manager import hold_host_ports
    from ember.net.ports import PortMapping

    return hold_host_ports(PortMapping.from_json(p) for p in st.network["ports"])


def _read_limited(path: Path, tail: bool = False, limit: int = 1 << 16) -> bytes:
    try:
        with open(path, "rb") as f:
            if tail:
                f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read(limit)
    except OSError:
        return b""


#: how much of the VMM's last words goes into the end reason
MAX_VMM_ERROR = 300


def vmm_last_error(log_tail: bytes) -> str | None:
    """The VMM's last non-empty line of ``vmm.log`` (what QEMU printed last before it
    exited: its error), as one line of printable text of at most ``MAX_VMM_ERROR``
    characters; None when it said nothing.  A guest can provoke some of QEMU's
    messages, so nothing of it reaches a terminal unfiltered."""
    for raw in reversed(log_tail.decode("utf-8", "replace").splitlines()):
        line = "".join(c if c.isprintable() else " " for c in raw).strip()
        line = re.sub(r" {2,}", " ", line)
        if line:
            return line if len(line) <= MAX_VMM_ERROR else line[: MAX_VMM_ERROR - 1] + "…"
    return None


def _cleanup(
    home: Home, st: mstate.MachineState, removing: bool, held: Sequence[socket.socket] = ()
) -> None:
    """The machine's network, then the host ports the monitor ``held`` (after the rules:
    no moment when a program could bind a port while a rule still takes its traffic,
    and before the record says exited: a command that waited for that may take them)."""
    from ember.net.manager import NetworkManager

    try:
        NetworkManager(home).teardown(st.id)
    except EmberError as e:
        print(f"monitor: network teardown failed: {e}", file=sys.stderr)
    for sock in held:
        sock.close()
    if removing:
        from ember.machines.lifecycle import remove

        try:
            cur = mstate.read_state(MachineStore(home).dir(st.id))
            try:
                # for an `ember wait` on it: its exit code outlives it a while
                mstate.record_removed_exit(home.run, cur)
            except OSError as e:
                print(f"monitor: cannot keep the exit code: {e}", file=sys.stderr)
            remove(home, cur)
        except (EmberError, FileNotFoundError) as e:
            print(f"monitor: --rm cleanup failed: {e}", file=sys.stderr)


def _failed_to_start(
    home: Home, st: mstate.MachineState, d: Path, sync: EventWriter, message: str,
    held: Sequence[socket.socket] = (),
) -> None:
    _cleanup(home, st, removing=False, held=held)  # (before the record: see _run_held)
    with mstate.update(d) as cur:
        cur.record_not_started(message, "the VMM failed to start")
    sync.send(MonitorFailed(message))
    if st.auto_remove:
        _cleanup(home, st, removing=True)


def run(home: Home, machine_id: str, sync: EventWriter) -> int:
    store = MachineStore(home)
    d = store.dir(machine_id)
    st = mstate.read_state(d)
    if st.status != mstate.CREATED:
        sync.send(MonitorFailed(f"machine {st.name} was already started"))
        return 1
    delay: float | None = None
    #: a restart's host ports, held since prepare_start found them free (None: the
    #: first run, whose ports _run_once takes)
    held: list[socket.socket] | None = None
    while True:
        began = time.monotonic()
        sync.started = False  # (after the first run only the record hears of it)
        final = _run_once(home, st, d, sync, held)
        if final is None:
            return 1  # the VMM did not start (recorded, cleaned up, said)
        final = _stopped_by_term(d, final)
        if final.end_reason in (None, CONSOLE_REASON) and final.vmm_pid is not None:
            # the guest reported how its program ended before the VMM's set-up was
            # known to be over (a fast boot): it did start
            sync.send_started(final.vmm_pid)
        policy = parse_restart_policy(final.restart_policy)
        # the guest's report (this run's: the file starts empty each run) says its
        # program cannot be started with this image and config: it never ran
        never_ran = final.end_reason is None and _report_says_not_started(d)
        # as docker's, a policy applies to a machine that started: one whose VMM cannot
        # set it up, or whose program cannot be started, would fail the same way again
        # and again (docker restarts no container whose process could not be started)
        again = (
            sync.started
            and not never_ran
            and policy.should_restart(final.exit_code, final.restart_count, final.stopped_by_user)
        )
        if policy.name != "no" and not final.stopped_by_user:
            if not sync.started:
                _record_given_up(d, "not restarting: the machine did not start")
            elif never_ran:
                _record_given_up(d, f"not restarting: {final.error}")
        assert final.exit_code is not None  # (_run_held recorded the run's exit code)
        sync.send(Exited(final.exit_code, signal=final.signal, oom_killed=final.oom_killed,
                         end_reason=final.end_reason, error=final.error, restarting=again,
                         stopped_by_user=final.stopped_by_user))  # fmt: skip
        # a foreground `ember run` follows the first run only (docker run does the same)
        sync.close()
        if not again:
            if final.auto_remove:
                _cleanup(home, final, removing=True)
            return 0
        delay = backoff_s(delay, time.monotonic() - began)
        stopped = not _wait_unless_stopped(d, delay)
        if _stopped_by_term(d, final).stopped_by_user or stopped:
            return 0  # `ember stop/kill/rm` or a SIGTERM meanwhile: they wait for this exit
        from ember.machines.lifecycle import prepare_start

        held = []
        try:
            st = prepare_start(home, final, restart=True, holder=held)
        except (EmberError, OSError) as e:
            # stopped or removed meanwhile, or the machine cannot run again
            for sock in held:
                sock.close()
            print(f"monitor: not restarting: {e}", file=sys.stderr)
            _record_given_up(d, f"not restarting: {e}")
            return 0


def _report_says_not_started(d: Path) -> bool:
    report = parse_report(_read_limited(Channels.in_dir(d).status_file))
    return report is not None and report.not_started


def _record_given_up(d: Path, why: str) -> None:
    """Say in the record why the restart policy stopped (``inspect``'s ``error``, ``ps``),
    unless the user stopped the machine meanwhile (nothing went wrong then)."""
    try:
        with mstate.update(d) as cur:
            if not cur.stopped_by_user and cur.status == mstate.EXITED:
                # said before this monitor exits: until then it is alive, and the
                # machine would read as restarting
                cur.error, cur.restart_given_up = why, True
    except (FileNotFoundError, EmberError) as e:  # removed meanwhile
        print(f"monitor: cannot record why: {e}", file=sys.stderr)


def _wait_unless_stopped(d: Path, seconds: float) -> bool:
    """Sleep ``seconds`` between two runs; False as soon as the user stopped or removed
    the machine (up to a minute of backoff must not hold `ember stop` that long)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
        if _terminated:
            return False  # a SIGTERM between two runs (``run`` records it as a stop)
        try:
            if mstate.read_state(d).stopped_by_user:
                return False
        except (FileNotFoundError, EmberError):
            return False
    return True


def _run_once(
    home: Home,
    st: mstate.MachineState,
    d: Path,
    sync: EventWriter,
    held: list[socket.socket] | None,
) -> mstate.MachineState | None:
    """One run of the machine, from the VMM's start to its recorded end (network freed);
    None when the VMM could not start.  ``held``: its host ports, held already (a
    restart); closed at the end of the run, as those this takes."""
    try:
        # the VMM writes into FIFOs; the monitor keeps the logs, capped (machines.logs)
        pump = StreamPump.create(d, LogConfig.load(home))
    except (EmberError, OSError) as e:
        _failed_to_start(home, st, d, sync, f"cannot set up the machine's logs: {e}", held or ())
        return None
    if held is None:
        try:
            held = _hold_ports(st)
        except EmberError as e:
            pump.close()
            _failed_to_start(home, st, d, sync, str(e))
            return None
    try:
        return _run_held(home, st, d, sync, pump, held)
    finally:
        for sock in held:  # (closed already by _cleanup, unless something raised)
            sock.close()


#: a SIGTERM came: the machine is being stopped as by ``ember stop``, so its restart
#: policy does not run it again (set by the handler: no lock may be taken there)
_terminated = False


def _note_term(_sig: int, _frame: object) -> None:
    """The SIGTERM handler until a run installs ``stop_on_term``'s (while the monitor
    starts, waits for its machine, sets it up): that run is then stopped as it begins."""
    global _terminated
    _terminated = True


class TermStop:
    """The host's side of a stop a SIGTERM asked for, as ``ember stop`` does it: once the
    guest had its stop timeout and ``KILL_GRACE`` to end, the VMM is killed if it still
    runs (a guest that hangs, or thrashes, never ended).  A thread of its own waits for
    that on a pipe: the signal handler (``ask``) and the end of the run (``end``) each
    write a byte to it, which takes no lock a handler could wait on for ever."""

    def __init__(self, d: Path, timeout: int | None) -> None:
        #: the VMM this run runs (set once it is started; replaced by a fall-back boot)
        self.vm: VM | None = None
        self._d = d
        self._timeout = timeout
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(self._r, True)
        #: ends once the run is over, or after the kill (or at once for a timeout of -1)
        self.watcher = threading.Thread(target=self._watch, name="ember-term-stop", daemon=True)
        self.watcher.start()

    def ask(self) -> None:
        if self._w < 0:
            return  # (the handler of a run that is over: the next run installs its own)
        with contextlib.suppress(OSError):  # (a full pipe: asked already)
            os.write(self._w, b"t")

    def end(self) -> None:
        """On the main thread, as the handler runs: it sees the pipe open or closed."""
        w, self._w = self._w, -1
        if w < 0:
            return
        with contextlib.suppress(OSError):
            os.write(w, b"e")
        os.close(w)

    def _watch(self) -> None:
        try:
            if os.read(self._r, 1) != b"t":
                return  # the run ended unasked
            # a paused machine (ember pause) runs on to take its stop, as docker unpauses
            # a container it stops
            if self.vm is not None and self.vm.pid is not None:
                with contextlib.suppress(OSError):  # (never in the way of the kill below)
                    mpause.resume(self._d, self.vm.pid)
            if self._timeout is None:  # stop timeout -1: the guest is never killed
                return
            deadline = time.monotonic() + self._timeout + KILL_GRACE
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self._r], [], [], left)
                if ready and os.read(self._r, 1) == b"e":
                    return  # ended in time (a second SIGTERM changes nothing)
            vm = self.vm
            if vm is None:
                return
            # marked first, as ``lifecycle.kill_vmm`` does: the end is the host's kill (137)
            try:
                with mstate.update(self._d) as cur:
                    cur.stopped_by_user = True
            except (FileNotFoundError, EmberError) as e:
                print(f"monitor: cannot mark the machine stopped: {e}", file=sys.stderr)
            print("monitor: the guest did not end after its stop timeout: killing its VMM",
                  file=sys.stderr)  # fmt: skip
            vm.kill()
        finally:
            os.close(self._r)


def stop_on_term(relay: ControlRelay, st: mstate.MachineState, d: Path) -> TermStop:
    """A plain `kill MONITOR` (SIGTERM) stops the machine the graceful way, as ``ember
    stop`` does with the machine's own stop timeout, and for good: no restart after it
    (it restarted under --restart always; a host shutting down does this).  The handler
    only hands the lines to the relay's thread (``send_soon``): it runs on this thread,
    which it may have interrupted inside ``relay.send`` holding the relay's lock.  The
    returned ``TermStop`` kills the VMM if the guest does not end in time (its ``vm``
    is the caller's to set, and its ``end`` to call when the run is over)."""
    timeout = stop_timeout_of(st)
    lines = stop_request(timeout).splitlines()
    stopper = TermStop(d, timeout)

    def on_term(_sig: int, _frame: object) -> None:
        global _terminated
        _terminated = True
        for line in lines:
            relay.send_soon(line)  # (nothing once the relay is closed: between two runs)
        stopper.ask()

    signal.signal(signal.SIGTERM, on_term)
    if _terminated:  # came while the restart was being set up: this run is stopped too
        on_term(signal.SIGTERM, None)
    return stopper


def _stopped_by_term(d: Path, final: mstate.MachineState) -> mstate.MachineState:
    """The run's final record, marked stopped by the user when a SIGTERM came (it is
    then not restarted, and ``inspect`` says why, as after ``ember stop``)."""
    if not _terminated or final.stopped_by_user:
        return final
    try:
        with mstate.update(d) as cur:
            cur.stopped_by_user = True
        return cur
    except (FileNotFoundError, EmberError):  # removed meanwhile
        return dataclasses.replace(final, stopped_by_user=True)


def _run_held(
    home: Home, st: mstate.MachineState, d: Path, sync: EventWriter, pump: StreamPump,
    held: Sequence[socket.socket],
) -> mstate.MachineState | None:
    """``_run_once`` with the machine's host ports ``held`` (closed by ``_cleanup``)."""
    logs = Channels.in_dir(d)
    relay: ControlRelay | None = None
    stopper: TermStop | None = None
    try:
        # QEMU listens on a socket of its own; control.sock is the monitor's relay
        channels = dataclasses.replace(pump.channels, control_socket=d / VMM_CONTROL)
        try:
            # a kernel given with --kernel and moved since, a spec out of range: the
            # start fails and says why (its network released), not the monitor
            spec = vm_spec(st, d, channels)
            vm = get_vmm(st.vm.vmm).create(spec)
        except EmberError as e:
            _failed_to_start(home, st, d, sync, str(e), held)
            return None
        try:
            relay = ControlRelay(logs.control_socket, spec.channels.control_socket)
        except OSError as e:
            _failed_to_start(home, st, d, sync, f"cannot open the control socket: {e}", held)
            return None
        stopper = stop_on_term(relay, st, d)
        try:
            vm, spec, pid = _start_or_boot(d, vm, spec)
        except EmberError as e:
            _failed_to_start(home, st, d, sync, str(e), held)
            return None
        stopper.vm = vm
        if spec.restore is not None:
            # (before the record says running: no pause while the guest is handed its config)
            with contextlib.suppress(OSError):
                mpause.setting_up(d, pid, proc_start_time(pid))
        with mstate.update(d) as cur:
            cur.status, cur.started_at = mstate.RUNNING, mstate.now()
            cur.restarting = False
            cur.vmm_pid, cur.monitor_pid = pid, os.getpid()
            cur.vmm_start = proc_start_time(pid)
            cur.monitor_start = proc_start_time(os.getpid())
            stopped = cur.stopped_by_user
        if stopped:
            # `ember stop/kill/rm -f` (or Ctrl-C) came while the VMM was being started:
            # the run ends before the program does anything
            vm.kill()
        elif spec.restore is None:
            if _set_up(vm):
                sync.send_started(pid)
        else:
            # the VMM runs; the restored guest now waits for its config
            try:
                vm, pid, started = _hand_config_or_boot(st, d, vm, spec, pump)
            except EmberError as e:
                _failed_to_start(home, st, d, sync, str(e), held)
                return None
            finally:
                mpause.done_setting_up(d)
            stopper.vm = vm  # (a boot instead of the restore is another VMM)
            if started:
                sync.send_started(pid)

        # (our child: until waited for, its pid is its own; a restored guest that ran
        # and powered off during the handshake has been waited for already)
        pid_fd = os.pidfd_open(pid) if vm.wait(0) is None else None
        if pid_fd is None:
            pump.drain()
        else:
            connected = relay
            connected.connect()
            try:
                # copy the guest's output until the VMM exits, then whatever is left; the
                # guest powers off once told that nothing it wrote is still in flight
                pump.run_until_exit(pid_fd, on_drained=lambda: connected.send(b"bye"))
            finally:
                os.close(pid_fd)
        end: VMExit | None = None
        while end is None:
            try:
                end = vm.wait()
            except InterruptedError:
                continue
    finally:
        if stopper is not None:
            stopper.end()
        if relay is not None:
            relay.close()
        # console.log goes on across runs (`ember start`, --restart): init's last line
        # of an earlier run is no word on this one
        console_bytes = pump.received(pump.channels.console_log)
        pump.close()
    # the network first, then the record (lifecycle._free_network says why); a stop
    # waiting for "exited" then also finds the network and the host ports free
    _cleanup(home, st, removing=False, held=held)
    with mstate.update(d) as cur:
        # `ember kill/rm -f/stop` mark the machine before they SIGKILL its VMM
        host_killed = cur.stopped_by_user and end.signal == signal.SIGKILL
        result = _how_it_ended(d, end, console_bytes, host_killed=host_killed)
        cur.status, cur.finished_at = mstate.EXITED, mstate.now()
        cur.exit_code, cur.signal, cur.oom_killed = (
            result.exit_code,
            result.signal,
            result.oom_killed,
        )
        cur.end_reason, cur.error = result.end_reason, result.error
        final = cur
    return final


def _start_or_boot(d: Path, vm: VM, spec: VMSpec) -> tuple[VM, VMSpec, int]:
    """Start ``vm``; the VM, its spec and its VMM's pid.  A template that went between
    the machine's look at it and this start (another machine's failed restore discarded
    it, a build pruned it, ``ember gc``) is no failed start: the machine boots its kernel
    instead, as when a template does not restore (it ended with 125)."""
    try:
        return vm, spec, vm.start()
    except EmberError as e:
        gone = spec.restore is not None and not (
            spec.restore.is_file() and spec.initrd is not None and spec.initrd.is_file()
        )
        if not gone:
            raise
        print(f"monitor: the template went before its restore ({e}): booting instead",
              file=sys.stderr)  # fmt: skip
    # (a stop that came meanwhile: the caller sees it in the record and kills this VMM)
    booted = _boot_instead(d, spec.channels, unless_stopped=False)
    assert booted is not None
    return booted


def _boot_instead(
    d: Path, channels: Channels, *, unless_stopped: bool
) -> tuple[VM, VMSpec, int] | None:
    """Boot the machine's kernel in place of a template: its record names no template
    any more, and the new VMM's pid, in one step under the machine's lock (a kill or rm
    -f then finds this VMM's pid, not the dead one's).  ``unless_stopped``: None, nothing
    started, when a stop came (the record says so, or a SIGTERM)."""
    with mstate.locked(d):
        cur = mstate.read_state(d)
        if unless_stopped and (cur.stopped_by_user or _terminated):
            return None
        cur.vm.restore = cur.vm.restore_initrd = None
        spec = vm_spec(cur, d, channels)
        boot = get_vmm(cur.vm.vmm).create(spec)
        pid = boot.start()
        cur.vmm_pid, cur.vmm_start = pid, proc_start_time(pid)
        mstate.write_state(d, cur)
    return boot, spec, pid


def _how_it_ended(d: Path, end: VMExit, console_bytes: int, *, host_killed: bool) -> Outcome:
    """How the run ended (``report.outcome``): what the host did to it (``host_killed``),
    else the guest's exit report, else how the VMM ended; ``console_bytes``: how much of
    ``console.log`` this run wrote (init's line of an earlier run is no word on it)."""
    logs = Channels.in_dir(d)
    report = parse_report(_read_limited(logs.status_file))
    console_said = panic = None
    if report is None:
        tail = _read_limited(logs.console_log, tail=True, limit=min(PANIC_TAIL, console_bytes))
        console_said = parse_console_tail(tail)  # (it reads the last MAX_REPORT bytes)
        panic = parse_kernel_panic(tail)
    result = outcome(
        report, end.returncode, end.signal, killed=host_killed, console_said=console_said,
        panic=panic,
    )  # fmt: skip
    if report is None and end.returncode not in (0, None):
        # the VMM failed (it could not start the guest, or gave up on it): its own last
        # words say why, and vmm.log goes with the machine (--rm)
        said = vmm_last_error(_read_limited(d / "vmm.log", tail=True, limit=4096))
        if said:
            result = dataclasses.replace(result, end_reason=f"{result.end_reason}: {said}")
    return result


#: how long a booting VMM must stay up to count as started: QEMU's own set-up (options,
#: TAP, disk, guest memory, loading the kernel) took 40-65 ms here, 80-150 ms with both
#: cores busy, and a VMM that cannot start the guest exits within it (15-35 ms)
VMM_SET_UP_S = 0.5


def _set_up(vm: VM) -> bool:
    """Whether a booting VMM got through its own set-up: still running ``VMM_SET_UP_S``
    after its start.  A boot has no earlier sign of that (the guest says nothing until
    its kernel has booted, seconds under TCG); a restored guest answering its config is
    one (``_hand_config_or_boot``).  A VMM that ended meanwhile is waited for."""
    return vm.wait(VMM_SET_UP_S) is None


def _hand_config_or_boot(
    st: mstate.MachineState, d: Path, vm: VM, spec: VMSpec, pump: StreamPump
) -> tuple[VM, int, bool]:
    """A restored template waits for its run config: send it.  When the restore does not
    take (a template the VMM cannot load, a guest that never answers), drop the template
    and boot the machine's kernel instead, as if there had been none; but never when the
    guest may have taken the config (``machines.restore``): the program must not run twice.

    Returns the VM that runs the machine, its pid, and whether it started: the guest
    answered its config (the VMM loaded the template, the guest runs), or took it all the
    same, or the VMM booted instead got through its set-up (``_set_up``)."""
    from ember.machines.lifecycle import RESTORE_CONFIG
    from ember.vm.template import (
        ConfigUnanswered,
        Template,
        TemplateError,
        discard_template,
        send_restore_config,
        state_identity,
    )

    assert vm.pid is not None
    assert spec.restore is not None and spec.initrd is not None
    template = Template(spec.restore, spec.initrd)
    # the file its VMM opened a moment ago: a discard must not take a newer one
    restored = state_identity(template)
    # (it stops looking once it has seen the word, which comes right after the "ok")
    pump.watch_restore = True
    try:
        config = (d / RESTORE_CONFIG).read_bytes()
        send_restore_config(spec.channels.control_socket, config, alive=vm.alive)
        return vm, vm.pid, True
    except (TemplateError, OSError) as e:
        failure, sent = e, isinstance(e, ConfigUnanswered)
    # a VMM that cannot load the state exits by itself (the control channel's end is
    # what we saw, give it a moment); one killed by `ember kill`/`rm -f` during the
    # restore dies of the signal
    ended = vm.wait(5.0 if vm.alive() else 1.0)
    try:
        stopped = mstate.read_state(d).stopped_by_user
    except (FileNotFoundError, EmberError):
        stopped = True  # removed meanwhile (rm -f)
    spoke = pump.program_spoke() or (sent and pump.config_taken())
    verdict = after_unacknowledged_restore(sent, ended, spoke, stopped)
    if verdict is AfterRestore.KILLED:
        return vm, vm.pid, False
    if verdict is AfterRestore.KEEP:
        print(f"monitor: {failure}; the guest took its config all the same", file=sys.stderr)
        return vm, vm.pid, True
    vm.kill()
    vm.wait()
    if sent and pump.config_taken():
        # it took its config between the look above and the kill: its program may have
        # begun, so the machine is not booted again (a program must not run twice)
        print(f"monitor: {failure}; the guest took its config as it was killed: not "
              "booting it again", file=sys.stderr)  # fmt: skip
        return vm, vm.pid, False
    print(f"monitor: restoring the template failed ({failure}): booting instead", file=sys.stderr)
    discard_template(template, restored)
    # a stop that came during the restore is seen (it was not, and the machine booted
    # all the same), and a kill or rm -f finds the new VMM's pid, not the dead one's
    booted = _boot_instead(d, spec.channels, unless_stopped=True)
    if booted is None:
        return vm, vm.pid, False
    boot, _spec, pid = booted
    return boot, pid, _set_up(boot)


def _wait_for_machine(home: Home, go_fd: int | None) -> str | None:
    """Block until the CLI writes the machine id; then log into the machine's dir."""
    if go_fd is None:
        raise SystemExit("ember-monitor: give a machine id or --go-fd")
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(go_fd, 128)
        if not chunk:
            return None
        data += chunk
    os.close(go_fd)
    machine_id = data.decode().strip()
    d = MachineStore(home).dir(machine_id)
    fd = os.open(d / "monitor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return machine_id


def _warnings_to_stderr() -> None:
    """What ember's libraries warn of (ember.machines, ember.snapshots: a cleanup that
    failed) goes to the monitor's log (its stderr) as the CLI shows it: ``ember: ...``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ember: %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger("ember").addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ember-monitor")
    p.add_argument("--home", required=True)
    p.add_argument("--sync-fd", type=int)
    p.add_argument("--go-fd", type=int, help="read the machine id from this fd")
    p.add_argument("machine_id", nargs="?")
    args = p.parse_args(argv)
    # the monitor belongs to no terminal: a Ctrl-C meant for the CLI must not reach it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # started with SIGTERM blocked (``lifecycle.start_monitor``): one that came during
    # the interpreter's start and the imports is noted now, and its run stopped
    signal.signal(signal.SIGTERM, _note_term)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _warnings_to_stderr()
    sync = EventWriter(args.sync_fd)
    home = Home(Path(args.home))
    try:
        machine_id = args.machine_id
        if machine_id is None:
            machine_id = _wait_for_machine(home, args.go_fd)
            if machine_id is None:
                return 0  # the CLI gave up before handing a machine over
        return run(home, machine_id, sync)
    except Exception as e:
        traceback.print_exc()
        sync.send(MonitorFailed(f"monitor failed: {e}"))
        return 1
    finally:
        sync.close()


if __name__ == "__main__":
    sys.exit(main())
