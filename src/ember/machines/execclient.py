"""``ember exec``'s host side: one session on one of a running machine's exec ports.

The machine's QEMU listens on ``exec-N.sock`` for each port (one client each: a
second one would wait unseen in the socket's backlog), so a session first takes
the port's lock, ``exec-N.lock`` in the machine's directory, without waiting,
trying each port in turn.  Then it talks to ember-init directly
(``execproto``): the request, the command's stdin, its output and exit code.
Hanging up ends the command (unless detached), as a closed terminal ends a shell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import os
import secrets
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ember.machines import execproto as proto
from ember.machines.detachkeys import DetachKeys
from ember.machines.errors import ExecBusy, ExecError, MachineNotRunning
from ember.machines.state import MachineState
from ember.vm.vmm.base import exec_sockets, unix_address

#: seconds to wait for ember-init to take the request (a machine still booting)
START_TIMEOUT = 60.0
#: seconds without an answer after which the request goes again on a new connection:
#: now and then (a connection that came right after another one's end, on a loaded
#: host) ember-init never sees a request; init does not start a command twice
RESEND_AFTER = 3.0
#: what ``ember exec`` exits with when the machine stopped under its command (docker's
#: code for a container killed under an exec)
MACHINE_GONE = 137
#: signals passed on to the command (SIGHUP hangs up: the caller's terminal went away)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _connect(path: Path, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with unix_address(path) as address:
            s.connect(address)
    except OSError as e:
        s.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise ExecError(f"machine {name} has no exec port: it was started by an "
                            "older ember", hint=f"restart it (ember restart {name})") from None  # fmt: skip
        raise
    return s


@contextlib.contextmanager
def _port(d: Path, name: str) -> Iterator[Callable[[], socket.socket]]:
    """The first free exec port of the machine in ``d``, held locked: a way to connect
    to it (again)."""
    for n, path in enumerate(exec_sockets(d)):
        fd = os.open(d / f"exec-{n}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield functools.partial(_connect, path, name)
            return
        finally:
            os.close(fd)
    raise ExecBusy(f"machine {name} runs {len(exec_sockets(d))} exec sessions already",
                   hint="wait for one to end")  # fmt: skip


class Detached(Exception):
    """The detach keys were typed (``detachkeys``): the client lets go, the machine runs on."""


class _Session:
    def __init__(self, connect: Callable[[], socket.socket], opening: bytes,
                 stdin_fd: int | None, out_fd: int, err_fd: int,
                 detach_keys: DetachKeys | None = None) -> None:  # fmt: skip
        self.connect, self.opening = connect, opening
        self.detach_keys = detach_keys
        #: how a refusal from the guest begins
        self.refused_as = "cannot run the command"
        self.sock = connect()
        self.stdin_fd = stdin_fd
        self.out_fd, self.err_fd = out_fd, err_fd
        self.reader = proto.FrameReader()
        self.sel = selectors.DefaultSelector()
        self.pending = opening  # frames not yet sent
        self.started = False
        #: a Ctrl-C was passed on: the next one hangs up
        self.interrupted = False

    def send(self, data: bytes) -> None:
        self.pending += data

    def run(self, nonce: str, wake: int, *, until_started: bool = False) -> int:
        """Relay until the command's exit code comes; the code (or MACHINE_GONE).
        ``until_started``: only until ember-init started the command (0 then)."""
        self.sock.setblocking(False)
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.sel.register(wake, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        resend = time.monotonic() + RESEND_AFTER
        while True:
            if not self.started and time.monotonic() >= resend:
                self._reconnect()
                resend = time.monotonic() + RESEND_AFTER
            if self.started and self.stdin_fd is not None and len(self.pending) < 1 << 20:
                self._watch(self.stdin_fd, True)
            elif self.stdin_fd is not None:
                self._watch(self.stdin_fd, False)
            self.sel.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.pending else 0))
            timeout = None if self.started else max(0.0, min(deadline, resend) - time.monotonic())
            events = self.sel.select(timeout)
            if not events and not self.started and time.monotonic() >= deadline:
                raise ExecError("the machine did not take the command: its init may predate "
                                "ember exec", hint="restart the machine")  # fmt: skip
            for key, mask in events:
                if key.fileobj is self.sock:
                    if mask & selectors.EVENT_WRITE:
                        self._flush()
                    if mask & selectors.EVENT_READ:
                        code = self._receive(nonce)
                        if code is not None:
                            return code
                        if until_started and self.started:
                            return 0
                elif key.fileobj == wake:
                    self._signals(wake)
                else:
                    self._read_stdin()

    def _reconnect(self) -> None:
        """The request again, on a new connection (hanging up the old one resets the
        port's state in ember-init; the same nonce: a command is not started twice)."""
        self.sel.unregister(self.sock)
        self.sock.close()
        self.sock = self.connect()
        self.sock.setblocking(False)
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.reader = proto.FrameReader()
        self.pending = self.opening

    def _watch(self, fd: int, on: bool) -> None:
        registered = fd in self.sel.get_map()
        if on and not registered:
            self.sel.register(fd, selectors.EVENT_READ)
        elif not on and registered:
            self.sel.unregister(fd)

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.pending)
        except BlockingIOError:
            return
        self.pending = self.pending[n:]

    def _read_stdin(self) -> None:
        assert self.stdin_fd is not None
        data = os.read(self.stdin_fd, proto.STDIN_CHUNK)
        if data:
            detached = False
            if self.detach_keys is not None:
                data, detached = self.detach_keys.feed(data)
            if data:
                self.send(proto.frame(proto.STDIN, data))
            if detached:
                raise Detached
            return
        self.send(proto.frame(proto.STDIN_END))
        self._watch(self.stdin_fd, False)
        self.stdin_fd = None

    def _signals(self, wake: int) -> None:
        for signum in os.read(wake, 64):
            if signum == signal.SIGHUP:
                # the caller is gone (its terminal closed, the agent's client died): hang
                # up, which ends the command, as a closed terminal ends a shell
                raise SystemExit(128 + signum)
            if signum == signal.SIGWINCH:
                if self.started:
                    self.send(proto.resize_frame(*_size(self.out_fd)))
                continue
            if not self.started or (signum == signal.SIGINT and self.interrupted):
                # before the command runs, or a second Ctrl-C: hang up (which ends it)
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
            self.interrupted |= signum == signal.SIGINT
            self.send(proto.signal_frame(signum))

    def _receive(self, nonce: str) -> int | None:
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return None
        if not data:
            return MACHINE_GONE  # the machine stopped (its VMM closed the socket)
        for kind, payload in self.reader.feed(data):
            if kind == proto.REFUSED:
                # ours (or one whose request the guest could not read); another one is the
                # end of an earlier client's session, as any frame before our start is
                theirs, why = proto.refusal(payload)
                if theirs in ("", nonce):
                    raise ExecError(f"{self.refused_as}: {why}")
                continue
            if not self.started:
                self.started = kind == proto.STARTED and payload == nonce.encode()
                continue
            if kind == proto.STDOUT:
                _write_all(self.out_fd, payload)
            elif kind == proto.STDERR:
                _write_all(self.err_fd, payload)
            elif kind == proto.EXIT:
                return proto.exit_code(payload)
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        view = view[n:]


def run_exec(d: Path, st: MachineState, request: proto.ExecRequest, *, stdin_fd: int | None,
             out_fd: int = 1, err_fd: int = 2) -> int:  # fmt: skip
    """Run ``request`` in machine ``st`` (its directory ``d``); its exit code (0 for a
    detached one once started).  ExecError when it could not be started."""
    from ember.machines.lifecycle import vmm_alive

    if not vmm_alive(st):
        raise MachineNotRunning(f"machine {st.name} is not running")
    nonce = secrets.token_hex(8)
    terminal = request.tty is not None and not request.detach
    payload = dataclasses.replace(request, stdin=stdin_fd is not None, nonce=nonce,
                                  tty=_size(out_fd) if terminal else None)  # fmt: skip
    try:
        opening = payload.encode()
    except ValueError as e:
        raise ExecError(f"cannot run the command: {e}") from None
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signals = FORWARDED + (signal.SIGHUP,) + ((signal.SIGWINCH,) if terminal else ())
    old = {s: signal.getsignal(s) for s in signals}
    try:
        for s in signals:
            signal.signal(s, lambda signum, _frame: _note(wake_w, signum))
        with _port(d, st.name) as connect, _raw(stdin_fd if terminal else None):
            session = _Session(connect, opening, None if request.detach else stdin_fd, out_fd, err_fd)
            try:
                return session.run(nonce, wake_r, until_started=request.detach)
            finally:
                session.sock.close()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(wake_r)
        os.close(wake_w)


def _size(fd: int) -> tuple[int, int]:
    """The terminal's (rows, columns) at ``fd``, else 24 x 80."""
    try:
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    except OSError:
        return 24, 80


@contextlib.contextmanager
def _raw(fd: int | None) -> Iterator[None]:
    """The terminal at ``fd`` in raw mode meanwhile (keys go to the command as they are
    typed: Ctrl-C is a byte for its terminal, not a signal for this process)."""
    if fd is None or not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _note(fd: int, signum: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.write(fd, bytes([signum]))


class StdinRelay:
    """This process's stdin to the program of a running machine started with ``-i``
    (``ember run -i``, ``ember attach``), through an exec port in a thread of its own,
    while the caller follows the machine's output from its log.

    With ``tty`` (the machine's program has a terminal) and a terminal on ``stdin_fd``,
    that terminal is raw meanwhile, its size follows ours (SIGWINCH, handled here: call
    ``start`` and ``close`` from the main thread), and Ctrl-P Ctrl-Q lets go
    (``detached``).  The program's stdin ends when ours does; a relay that is closed
    leaves it open (a later ``ember attach`` goes on writing it)."""

    def __init__(self, d: Path, st: MachineState, stdin_fd: int, *, tty: bool) -> None:
        self.d, self.st, self.stdin_fd = d, st, stdin_fd
        self.terminal = tty and os.isatty(stdin_fd)
        #: set when the detach keys were typed
        self.detached = threading.Event()
        #: why stdin could not be passed on (the relay ended early), if so
        self.error: BaseException | None = None
        self._stack = contextlib.ExitStack()
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        self._wake_w = -1

    def start(self) -> None:
        nonce = secrets.token_hex(8)
        request = proto.ExecRequest([], attach=True, nonce=nonce,
                                    tty=_size(self.stdin_fd) if self.terminal else None)  # fmt: skip
        with contextlib.ExitStack() as stack:
            wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            stack.callback(os.close, wake_r)
            stack.callback(os.close, wake_w)
            connect = stack.enter_context(_port(self.d, self.st.name))
            self._session = _Session(connect, request.encode(), self.stdin_fd, self.stdin_fd, 2,
                                     DetachKeys() if self.terminal else None)  # fmt: skip
            self._session.refused_as = "cannot pass stdin to the machine's program"
            stack.callback(self._session.sock.close)
            if self.terminal:
                old = signal.signal(signal.SIGWINCH, lambda s, _f: _note(wake_w, s))
                stack.callback(signal.signal, signal.SIGWINCH, old)
            stack.enter_context(_raw(self.stdin_fd if self.terminal else None))
            self._wake_w = wake_w
            self._thread = threading.Thread(target=self._relay, args=(nonce, wake_r),
                                            name="ember-stdin", daemon=True)  # fmt: skip
            self._thread.start()
            self._stack = stack.pop_all()

    def _relay(self, nonce: str, wake: int) -> None:
        assert self._session is not None
        try:
            self._session.run(nonce, wake)
        except Detached:
            self._send_rest()
            self.detached.set()
        except SystemExit:
            pass  # close() asked it to end
        except Exception as e:  # (an OSError of the socket, ExecError: said by the caller)
            self.error = e

    def _send_rest(self) -> None:
        """What was typed before the detach keys, to the machine (bounded: a second)."""
        assert self._session is not None
        with contextlib.suppress(OSError):
            self._session.sock.settimeout(1.0)
            self._session.sock.sendall(self._session.pending)

    def close(self) -> None:
        if self._thread is not None:
            _note(self._wake_w, signal.SIGHUP)  # the session's way to hang up
            self._thread.join(2.0)
        self._stack.close()
