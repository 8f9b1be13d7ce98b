"""``ember agent``: a fork server that runs CLI commands for one ``$EMBER_HOME``.

The agent imports all of ember once, then waits on ``$EMBER_HOME/run/agent.sock``
(mode 0600).  It keeps one *relay* forked ahead, waiting in accept(), and the
relay keeps its *runner* forked ahead too, waiting for a command and meanwhile
taking the copy-on-write faults the command would otherwise take (see
``prefault``).  The relay that takes a connection tells the agent, which forks
the next one (once that command ends, another caller comes or 0.3 s have
passed: not beside the command as it starts), and reads the request (argv,
working directory, environment, umask, and the caller's stdin, stdout and
stderr as descriptors), checks the caller (same user, same namespaces and
root, see ``peer``) and the code (see ``freshness``), and hands the request
to its runner: the runner takes over the
caller's descriptors, directory, environment and umask, and runs
``ember.cli.main.main(argv)`` as a fresh process would.  The relay
forwards the caller's signals to the runner's process group, sends SIGHUP when
the caller goes away (as a closing terminal would), and reports the exit status.

The agent's own loop only forks relays, so a slow or hostile client ties up one
relay, never the agent.  An agent killed with -9 takes its waiting relay along
(PR_SET_PDEATHSIG); relays and runners do not hold its lock, so a new agent can
start while older commands still run.  Commands already running when the agent stops go
on to the end (they are their own sessions).  The runners are the agent's
children: a service manager that kills the agent's whole group on stop would
kill them too (with systemd: ``KillMode=process``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import os
import pkgutil
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import NoReturn, TextIO

from ember import process
from ember.agent import client as client_module
from ember.agent import peer, prefault, protocol
from ember.agent.client import SOCKET_NAME
from ember.agent.errors import AgentError, AgentRunning
from ember.agent.freshness import Fingerprint, loaded_files, process_started_ns
from ember.home import Home
from ember.locks import FileLock
from ember.process import die_with_parent, parent_death_signal, reap_exiting
from ember.unpack.sandbox import dismiss_spare, fork_spare_session

# What a client of this very installation sends as its code (see protocol).
_OWN_CODE = os.fsencode(os.path.realpath(client_module.__file__))
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request
#: seconds a command runs before the agent forks the relay for the next one (sooner
#: when the command ends or another caller comes; Agent._wait_for_need)
NEXT_RELAY_DELAY = 0.3
# Imported lazily (rich by the commands that draw, idna by the first connection
# to a host name, zstandard and isal's threaded reader by the layers that need
# them); preloaded so that they are free.
THIRD_PARTY = (
    "rich.console", "rich.progress", "rich.live", "rich.table", "encodings.idna", "stringprep",
    "zstandard", "isal.igzip_threaded",
)  # fmt: skip


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


class _Stop(Exception):
    pass


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """SIGTERM and SIGINT blocked while inside (delivered, if they came, on the way out)."""
    try:
        # inside: a stop that came just before runs its handler in this very call,
        # after the mask changed, and must not leave the signals blocked
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextlib.contextmanager
def _stop_wakeup() -> Iterator[int]:
    """A descriptor that turns readable when a signal with a Python handler (SIGTERM,
    SIGINT: ``_raise_stop``) arrives while inside.  Python runs the handler only between
    bytecodes, or when a blocking call fails with EINTR: a signal that lands after the
    handler is set but before the call blocks interrupts nothing, and the call waits
    on (a relay stayed in accept() until the agent's 5 s grace ran out).  Waiting on
    this descriptor too closes that window."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        yield r
    finally:
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)


def preload() -> list[str]:
    """Import every ember module and the lazily imported libraries; the libraries that
    are not installed.  An ember module that fails to import is a bug: it raises."""
    import ember

    for module in pkgutil.walk_packages(ember.__path__, "ember."):
        if module.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(module.name)
    missing = []
    for name in THIRD_PARTY:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional dependency that is not installed
            missing.append(name)
    return missing


class Agent:
    def __init__(self, home: Home, *, log: TextIO | None = None, prefault_runners: bool = True) -> None:
        self.home = home
        self.prefault_runners = prefault_runners
        self.socket_path = home.run / SOCKET_NAME
        self.lock = FileLock(home.agent_lock)
        self.log_fd = (log or sys.stderr).fileno()
        self.pid = os.getpid()
        #: the agent's namespaces, root and privileges, which callers must share (peer)
        self._view: peer.View | None = None

    def _log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        line = line.translate(_CONTROLS)  # a caller's words must not forge lines of the log
        with contextlib.suppress(OSError):
            os.write(self.log_fd, f"{stamp} ember agent: {line}\n".encode(errors="replace"))

    # -- the agent's own loop -----------------------------------------------

    def serve(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        self.home.run.mkdir(parents=True, exist_ok=True)
        if not self.lock.acquire(blocking=False):
            raise AgentRunning(
                f"an agent already serves {self.home.root}", hint=f"its socket: {self.socket_path}"
            )
        try:
            missing = preload()
            if missing:
                self._log("not preloaded (optional, imported on use): " + ", ".join(missing))
            fingerprint = Fingerprint(loaded_files(), started_ns=process_started_ns())
            with contextlib.suppress(OSError):  # (no /proc: each check says so)
                self._view = peer.View("self")
            listener = self._listen()
            try:
                self._loop(listener, fingerprint)
            finally:
                self._unlisten(listener)
        finally:
            self.lock.release()

    def _listen(self) -> socket.socket:
        # Bind under a temporary name and rename: the socket appears with its
        # final mode, and replaces a dead agent's socket in one step (the lock
        # says no live agent owns it).
        # (No longer than the final name: a home whose socket path fits must not fail
        # on the temporary one, ".agent.sock.PID" did.)
        tmp = self.socket_path.with_name(f".s{os.getpid():x}")
        tmp.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # The mode comes from the umask at bind(), not from a chmod after it, which
        # would follow whatever had replaced the new name meanwhile.
        umask = os.umask(0o177)
        try:
            listener.bind(os.fspath(tmp))
        except OSError as e:
            listener.close()
            raise AgentError(
                f"cannot create the agent's socket {tmp}: {e.strerror or e}"  # a path too long
            ) from None
        finally:
            os.umask(umask)
        listener.listen(128)
        os.rename(tmp, self.socket_path)
        return listener

    def _unlisten(self, listener: socket.socket) -> None:
        # Still ours: the lock is held until after this.
        self.socket_path.unlink(missing_ok=True)
        listener.close()

    def _loop(self, listener: socket.socket, fingerprint: Fingerprint) -> None:
        """Keep one relay forked ahead, waiting in accept(): a command does not wait for a fork."""

        old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        # Busy relays outlive their turn here and are never waited for.
        old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        # Objects that exist now are never freed by the children: keep the
        # collector from touching (and so copying) their pages after each fork.
        gc.collect()
        gc.freeze()
        accepted_r, accepted_w = os.pipe2(os.O_CLOEXEC)
        idle: int | None = None
        self._log(f"serving {self.home.root} on {self.socket_path} (pid {os.getpid()})")
        try:
            with _stop_wakeup() as stop_r:
                while True:
                    # A stop that comes meanwhile waits until the new relay is known (to
                    # be stopped in turn) and has its own handlers: one delivered in the
                    # child first ran the agent's handler there, inside Python's at-fork
                    # hooks, which swallow exceptions, and the relay waited on unstopped.
                    with _stops_held():
                        idle = self._fork_relay(listener, accepted_w, fingerprint)
                    busy = self._wait_turn(idle, accepted_r, stop_r)
                    try:
                        # Until it is noted, a stop would take the busy relay for the
                        # idle one (the byte read: nothing tells them apart) and stop it.
                        with _stops_held():
                            if _readable(accepted_r):
                                os.read(accepted_r, 1)
                            idle = None
                        if busy is not None:
                            self._wait_for_need(listener, busy, stop_r)
                    finally:
                        if busy is not None:
                            os.close(busy)
        except _Stop:
            self._log("stopping")
        finally:
            if idle is not None and not _readable(accepted_r):
                _stop_relay(idle, self._log)  # still waiting in accept(): nobody's command yet
            os.close(accepted_r)
            os.close(accepted_w)
            gc.unfreeze()
            for signum, handler in old.items():
                signal.signal(signum, handler)

    def _fork_relay(self, listener: socket.socket, accepted_w: int, fp: Fingerprint) -> int:
        while True:
            try:
                pid = process.fork()
            except OSError as e:
                self._log(f"cannot fork a relay ({e.strerror}); trying again")
                time.sleep(0.5)
                continue
            if pid == 0:
                self._relay(listener, accepted_w, fp)
            return pid

    @staticmethod
    def _wait_turn(relay: int, accepted_r: int, stop_r: int) -> int | None:
        """Until the idle relay took a connection (a byte on the pipe, left there) or
        died; _Stop when the agent is told to stop (``_stop_wakeup``).  Returns a pidfd
        of the relay (the caller's to close), or None when the relay was gone before
        it could be opened: it took a caller, declined it and exited at once (reaped
        already: SIGCHLD is ignored), which ended the agent with "No such process"."""
        try:
            pidfd = os.pidfd_open(relay)
        except ProcessLookupError:
            return None
        try:
            ready, _, _ = select.select([accepted_r, pidfd, stop_r], [], [])
            if stop_r in ready:
                raise _Stop  # (its handler has raised it already, as a rule)
        except BaseException:
            os.close(pidfd)
            raise
        return pidfd

    @staticmethod
    def _wait_for_need(listener: socket.socket, busy: int, stop_r: int) -> None:
        """Before the next relay: until another caller waits, the busy relay (``busy``,
        a pidfd) is done, or NEXT_RELAY_DELAY has passed.  Forking the next relay at
        once made three forks of the agent (the relay, its runner, that runner's
        applier) run beside the command that just started, on the cores it needs; a
        command that follows another one still finds its relay ready, forked as the
        one before ended."""
        ready, _, _ = select.select([listener.fileno(), busy, stop_r], [], [], NEXT_RELAY_DELAY)
        if stop_r in ready:
            raise _Stop

    # -- the relay: one per command ------------------------------------------

    def _relay(self, listener: socket.socket, accepted_w: int, fp: Fingerprint) -> NoReturn:
        status = 1
        try:
            self.lock.release()  # the agent's alone: a new agent may start while we run
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # Not the CLI's handler that raises HungUp: a hang-up of the spare runner
            # before its command took over ends it (the command never started).
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            # The agent's stop pipe is not ours: a signal this relay or its runner
            # handles in Python (a command's Ctrl-C) would write to it and stop the agent.
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held over the fork
            os.setsid()  # out of the agent's group: a Ctrl-C meant for the agent spares commands
            _die_with(self.pid)  # an agent killed with -9 leaves no relay waiting
            spare = _SpareRunner.fork(
                keep_out=(listener.fileno(), accepted_w, *fp.descriptors()),
                prefault_memory=self.prefault_runners,
            )
            conn = _accept_unless_stopped(listener, spare)
            if conn is not None:
                _die_with(None)  # from now on this is somebody's command: it outlives the agent
                os.write(accepted_w, b"!")
                os.close(accepted_w)
                listener.close()
                try:
                    self._serve_one(conn, fp, spare)
                finally:
                    if spare is not None and spare.handed:
                        spare.dismiss()  # (the command's runner now: _watch reaped it)
                    elif spare is not None:
                        # a declined caller's: reaped here, or a zombie where init does
                        # not reap once this relay exits
                        spare.retire()
            status = 0
        except BaseException as e:  # a broken client must never reach the agent's loop
            self._log(f"a command's relay failed: {e!r}")
        finally:
            os._exit(status)

    def _serve_one(self, conn: socket.socket, fp: Fingerprint, spare: _SpareRunner | None = None) -> None:
        # The caller is checked first, right after accept(), while the process that
        # connected is surely the one its pid names (see peer.check_caller): a
        # caller checked only once its request had come could have exited, its pid
        # taken by a process with more privileges.  One that fails the check also
        # holds this relay for no longer than the check.
        pid, reason = peer.check_caller(conn, self._view)
        if reason is not None:
            self._decline(conn, pid, reason)
            return
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            request, fds = _receive_request(conn)
        except (OSError, protocol.ProtocolError) as e:
            self._log(f"refused a request: {e}")
            return
        try:
            if request.code != _OWN_CODE:
                reason = (
                    f"the caller runs ember from {os.fsdecode(request.code)},"
                    f" this agent from {os.fsdecode(_OWN_CODE)}"
                )
            changed = fp.changed() if reason is None else None
            if changed is not None:
                reason = f"ember's code changed on disk ({changed}); the agent stops"
                os.kill(self.pid, signal.SIGTERM)
            if reason is not None:
                self._decline(conn, pid, reason)
                return
            started = time.monotonic()
            runner = spare.hand_over(request, fds) if spare is not None else None
            if runner is None:  # no runner waiting (it died): fork one now
                relay = os.getpid()
                runner = process.fork()
                if runner == 0:
                    conn.close()
                    _close_all(list(fp.descriptors()))
                    _run_command(request, fds, relay)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpgid(runner, runner)  # also done by the runner: whoever comes first
        finally:
            for fd in fds:
                os.close(fd)
        # A caller already gone (killed as it started) is hung up by _watch, like any other.
        with contextlib.suppress(OSError):
            conn.sendall(protocol.frame(protocol.started(runner)))
        early = spare.ctl if spare is not None and runner == spare.pid else None
        code, signum = self._watch(conn, runner, early)
        with contextlib.suppress(OSError):
            conn.sendall(protocol.frame(protocol.exited(code, signum)))
        self._log(
            f"pid {pid}: ember {_summary(request.argv)} -> exit {code}"
            f" ({(time.monotonic() - started) * 1000:.0f} ms)"
        )
        with contextlib.suppress(ChildProcessError):  # a runner that said its code early
            os.waitpid(runner, 0)

    def _decline(self, conn: socket.socket, pid: int, reason: str) -> None:
        """Tell the caller to run its command itself (it does on any answer but "started")."""
        self._log(f"declined pid {pid}: {reason}")
        with contextlib.suppress(OSError):  # a caller gone already needs no answer
            conn.sendall(protocol.frame(protocol.declined(reason)))

    def _watch(
        self, conn: socket.socket, runner: int, early: socket.socket | None = None
    ) -> tuple[int, int]:
        """Forward the client's signals until the runner exits; its exit code and signal.

        ``early``: the runner's socket, on which it says its exit code once it has
        closed everything else, before its memory is torn down (~3 ms for a
        runner with its own copy of the heap): that is when the command is done.
        """
        conn.settimeout(None)
        pidfd = os.pidfd_open(runner)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(conn, select.POLLIN)
        if early is not None:
            poller.register(early, select.POLLIN)
        buffer = b""
        ignoring = False
        try:
            while True:
                for fd, _ in poller.poll():
                    if early is not None and fd == early.fileno():
                        said = _exit_code_said(early)
                        if said is not None:
                            return said, 0
                        poller.unregister(early)  # gone without a word: its wait status tells
                        continue
                    if fd == pidfd:
                        _, status = os.waitpid(runner, 0)
                        if os.WIFSIGNALED(status):
                            return 128 + os.WTERMSIG(status), os.WTERMSIG(status)
                        return os.waitstatus_to_exitcode(status), 0
                    try:
                        data = conn.recv(4096)
                    except OSError:  # reset: gone as well
                        data = b""
                    if not data:  # the caller is gone: as a terminal hang-up would
                        poller.unregister(conn)
                        _signal_group(runner, signal.SIGHUP)
                        continue
                    if ignoring:
                        continue
                    try:
                        buffer = _forward_signals(buffer + data, runner)
                    except protocol.ProtocolError as e:
                        # a broken client: its messages are dropped from now on (its
                        # hang-up still counts), the command goes on
                        self._log(f"ignoring the caller from now on: {e}")
                        ignoring = True
        finally:
            os.close(pidfd)


def _receive_request(conn: socket.socket) -> tuple[protocol.Request, list[int]]:
    """The request frame and the three descriptors sent with it (closed again on any error)."""
    fds: list[int] = []
    try:
        return _read_request(conn, fds), fds
    except BaseException:
        _close_all(fds)
        raise


def _read_request(conn: socket.socket, fds: list[int]) -> protocol.Request:
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    end = None
    while end is None or len(data) < end:
        if time.monotonic() > deadline:
            raise protocol.ProtocolError("the client was too slow to send its request")
        chunk, ancillary, flags, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(8 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(
                    int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4)
                )
        if flags & socket.MSG_CTRUNC or len(fds) > 3:
            raise protocol.ProtocolError("the request carries more descriptors than stdin/out/err")
        if not chunk:
            raise protocol.ProtocolError("the client closed the connection mid-request")
        data += chunk
        if end is None and len(data) >= protocol.HEADER:
            end = protocol.HEADER + protocol.frame_length(data[: protocol.HEADER])
    if len(data) != end or len(fds) != 3:
        raise protocol.ProtocolError("a request must be one frame with three descriptors")
    return protocol.decode_request(data[protocol.HEADER : end])


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop


def _accept_unless_stopped(
    listener: socket.socket, spare: _SpareRunner | None
) -> socket.socket | None:
    """The next connection; None if the agent stops us first (SIGTERM), once the
    waiting runner is dismissed and reaped (nobody else would: init may not reap)."""
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with _stop_wakeup() as stop_r:
            # a connection waiting is never taken back: accept() returns at once then
            ready, _, _ = select.select([listener.fileno(), stop_r], [], [])
            if stop_r in ready:
                raise _Stop  # (its handler has raised it already, as a rule)
            conn, _ = listener.accept()
    except _Stop:
        if spare is not None:
            spare.retire()
        return None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return conn


def _stop_relay(pid: int, log: Callable[[str], None], grace: float = 5.0) -> None:
    """SIGTERM the idle relay and wait until it has gone (it reaps its runner first;
    SIGCHLD is ignored here, so the kernel reaps it); SIGKILL after ``grace`` s, said
    in the log (a relay deaf to SIGTERM is a bug)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        _kill(pid)
        if not select.select([pidfd], [], [], grace)[0]:
            log(f"the idle relay (pid {pid}) did not stop on SIGTERM within {grace:g} s: killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _die_with(parent: int | None) -> None:
    """SIGTERM when ``parent`` dies (None: no longer)."""
    if parent is None:
        parent_death_signal(0)
    else:
        die_with_parent(parent, signal.SIGTERM)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _forward_signals(buffer: bytes, runner: int) -> bytes:
    while len(buffer) >= protocol.HEADER:
        n = protocol.frame_length(buffer[: protocol.HEADER])
        if len(buffer) < protocol.HEADER + n:
            break
        message, buffer = (
            buffer[protocol.HEADER : protocol.HEADER + n],
            buffer[protocol.HEADER + n :],
        )
        _signal_group(runner, protocol.parse_signal(message))
    return buffer


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _summary(argv: list[bytes]) -> str:
    """The command's first words, without options or values (which may be secrets)."""
    words: list[str] = []
    for arg in argv:
        if arg.startswith(b"-") or len(words) == 2:
            break
        words.append(os.fsdecode(arg)[:40])
    return " ".join(words)


# -- the runner: becomes the command ----------------------------------------


class _SpareRunner:
    """The relay's runner, forked before the relay accepts: it forks the applier child
    a command may need, pre-faults its memory (at idle priority where it may come
    back from it, so that it does not slow the commands running meanwhile) and
    waits on a socket for the command, which the relay sends as a request frame
    with the caller's three descriptors; it says its exit code on that socket."""

    def __init__(self, pid: int, ctl: socket.socket) -> None:
        self.pid, self.ctl = pid, ctl
        #: it got a command (``hand_over``): whoever runs it reaps it
        self.handed = False

    @classmethod
    def fork(cls, keep_out: tuple[int, ...], *, prefault_memory: bool) -> _SpareRunner | None:
        """A spare runner, or None if none could be forked (commands then fork their own)."""
        relay = os.getpid()
        try:
            mine, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return None
        try:
            pid = process.fork()
        except OSError:
            mine.close()
            its.close()
            return None
        if pid == 0:
            mine.close()
            _close_all(list(keep_out))
            _wait_for_command(relay, its, prefault_memory=prefault_memory)
        its.close()
        return cls(pid, mine)

    def hand_over(self, request: protocol.Request, fds: list[int]) -> int | None:
        """Send the runner its command; its pid, or None if it is gone (then it got no
        whole request, so it cannot run the command: one forked now may)."""
        payload = protocol.frame(protocol.encode_request(request))
        try:
            sent = socket.send_fds(self.ctl, [payload], fds)
            if sent < len(payload):
                self.ctl.sendall(payload[sent:])
        except OSError:
            return None
        # It may still be in a slice of pre-faulting at idle priority: the command
        # runs at the relay's.
        self.handed = True
        _set_policy(self.pid, os.sched_getscheduler(0))
        return self.pid

    def dismiss(self) -> None:
        """Close the runner's socket: one that got no command exits (when the relay
        exits at the latest: its parent-death signal)."""
        self.ctl.close()

    def retire(self) -> None:
        """Dismiss a runner that got no command, and reap it (it reaps its applier)."""
        _set_policy(self.pid, os.sched_getscheduler(0))  # no idle-priority crawl to its exit
        self.dismiss()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _wait_for_command(relay: int, ctl: socket.socket, *, prefault_memory: bool) -> NoReturn:
    """The spare runner's life: pre-fault (unless told not to), wait for the command,
    become it."""
    try:
        _die_with(relay)  # a relay that dies before handing a command over leaves none waiting
        os.setpgid(0, 0)
        # Before pre-faulting (and at normal priority): the applier child a pull
        # or prepare needs, sharing the agent's pages rather than ours.
        with contextlib.suppress(OSError):
            fork_spare_session()
        # Not at once: this runner was forked as a command started, and copying
        # the heap beside it (even at idle priority) slows it by more than a
        # runner that skips pre-faulting loses.
        if prefault_memory and not select.select([ctl], [], [], prefault.DELAY)[0]:
            policy = _idle_priority()
            prefault.prefault(arrived=lambda: _readable(ctl.fileno()))
            if policy is not None:
                _set_policy(0, policy)
        # Wait here, not in _read_request: its deadline starts when it is called.
        select.select([ctl], [], [])
        fds: list[int] = []
        try:
            request = _read_request(ctl, fds)
        except (OSError, protocol.ProtocolError):  # dismissed (EOF): nobody's command
            spare = dismiss_spare()
            if spare is not None:
                os.waitpid(spare, 0)
            os._exit(0)
    except BaseException:
        os._exit(1)
    _run_command(request, fds, relay, report=ctl)


def _idle_priority() -> int | None:
    """Run at SCHED_IDLE if this process may come back from it; the policy to return
    to (None: left as it was, and the pre-faulting runs at the normal priority)."""
    try:
        policy = os.sched_getscheduler(0)
        nice = os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        return None
    if policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return None  # a real-time agent: its runners keep its policy
    if not prefault.may_leave_idle(os.geteuid(), resource.getrlimit(resource.RLIMIT_NICE)[0], nice):
        return None
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return None
    try:
        # Make sure of the way back before idling (root in a user namespace may
        # lack CAP_SYS_NICE): a command must never run at idle priority.
        # Without one, this runner bows out and the relay forks one for the
        # command instead.
        os.sched_setscheduler(0, policy, os.sched_param(0))
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        os._exit(0)
    return policy


def _set_policy(pid: int, policy: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setscheduler(pid, policy, os.sched_param(0))


def _run_command(
    request: protocol.Request, fds: list[int], relay: int, report: socket.socket | None = None
) -> NoReturn:
    code = 1
    try:
        # Somebody's command now: it outlives the agent, not its relay.  The relay is
        # its caller's only link to it: when the relay dies (the OOM killer, a kill
        # -9), the client says "lost the connection" and exits, and the command is
        # hung up, as by a closing terminal, not left running for nobody.
        die_with_parent(relay, signal.SIGHUP)
        os.setpgid(0, 0)  # its own group, so that forwarded signals reach its children too
        # Out of the way first: a received descriptor may itself be 0, 1 or 2
        # (an agent started with those closed).
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in fds]
        _close_all([fd for fd in fds if fd not in (0, 1, 2)])
        for target, fd in enumerate(moved):
            os.dup2(fd, target)
        _close_all(moved)
        _take_over_caller(request)
        code = _run_cli([os.fsdecode(a) for a in request.argv])
    except AgentError as e:
        print(f"ember: {e}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        _finish(code, report)


def _take_over_caller(request: protocol.Request) -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGWINCH):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start-up
    os.environb.clear()
    os.environb.update(request.environment())
    time.tzset()  # the caller's TZ: log lines and times in its zone, as when run locally
    os.umask(request.umask)
    encoding = sys.stdout.encoding if sys.stdout is not None else "utf-8"
    # surrogateescape: bytes that are not text reach the command, as Python's own
    # stdin in the C and UTF-8 locales passes them (strict, a traceback here)
    sys.stdin = open(0, encoding=encoding, errors="surrogateescape", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding=encoding, closefd=False)  # noqa: SIM115
    sys.stderr = open(  # noqa: SIM115
        2, "w", encoding=encoding, errors="backslashreplace", buffering=1, closefd=False
    )
    sys.argv = ["ember", *(os.fsdecode(a) for a in request.argv)]
    try:
        os.chdir(request.cwd)
    except OSError as e:
        raise AgentError(f"cannot enter the working directory: {e.strerror}") from None


def _run_cli(argv: list[str]) -> int:
    from ember.cli.main import main

    try:
        main(argv)
    except SystemExit as e:
        return _exit_code(e.code)
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130
    return 0


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finish(code: int, report: socket.socket | None = None) -> NoReturn:
    # What interpreter shutdown would do, minus the agent's own exit handlers:
    # wait for the command's non-daemon threads, flush its output.
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    spare = dismiss_spare()  # an applier child forked ahead that this command did not need
    # done: a relay that ends once it has the exit code below must not hang up our exit
    parent_death_signal(0)
    if report is not None:
        # Done: close everything (the caller's terminal or pipes, files and their
        # locks) as exit would, then say so before the kernel tears down our memory.
        keep = report.fileno()
        os.closerange(0, keep)
        os.closerange(keep + 1, _FD_LIMIT)
        with contextlib.suppress(OSError):
            report.send(b"%d" % code)
    if spare is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spare, 0)
    reap_exiting()  # appliers still exiting (process.reap_later): the exit code is out
    os._exit(code)


_FD_LIMIT = max(os.sysconf("SC_OPEN_MAX"), 1 << 16)


def _exit_code_said(sock: socket.socket) -> int | None:
    """The exit code a runner said before exiting (None: it said nothing)."""
    try:
        data = sock.recv(16)
    except OSError:
        return None
    if not data.isdigit() or len(data) > 3 or int(data) > 255:
        return None
    return int(data)
