"""The ``ember`` entry point: hand the command to the host's agent, or run it here.

When an agent serves this ``$EMBER_HOME`` (``ember agent``), the command runs
in a process the agent forks from its already-imported self, with this
process's stdin, stdout and stderr, working directory, environment and umask;
this process only forwards signals and waits for the exit code.  That saves the
interpreter's imports (~0.2 s) on every command.  Anything unusual (no agent,
``--home`` on the command line, ``EMBER_AGENT=0``, a caller in another
namespace, an agent running older code) and the command runs here as before.

Imports are limited to built-in modules on purpose: this runs before every
command, and ``socket`` or ``signal`` alone would cost more than the rest.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys

from ember.agent import protocol
from ember.agent.peer import peer_credentials
from ember.homedir import default_home_dir

SOCKET_NAME = "agent.sock"
_SUN_PATH_MAX = 107


def main() -> None:
    argv = sys.argv[1:]
    try:
        outcome = _via_agent(argv)
        if outcome is None:
            from ember.cli.main import main as run_here
    except KeyboardInterrupt:
        # Ctrl-C before any command started (the CLI still loading): nothing to undo,
        # and no traceback (the CLI's own handling is not loaded yet)
        sys.stderr.write("ember: interrupted\n")
        sys.exit(130)
    if outcome is None:
        run_here()
        return
    code, signum = outcome
    if signum:
        # Die of the same signal, so that a shell sees what it would have seen
        # (SIGKILL, the OOM killer's, and SIGSTOP cannot be given a disposition).
        if signum not in (_signal.SIGKILL, _signal.SIGSTOP):
            _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # Nothing of ours to flush or clean up: skip the interpreter's shutdown (~2 ms).
    os._exit(code)


def agent_socket(home: str) -> str:
    return os.path.join(home, "run", SOCKET_NAME)


def _wanted(argv: list[str]) -> bool:
    if os.environ.get("EMBER_AGENT") == "0":
        return False
    if argv[:1] == ["agent"]:
        return False
    if os.isatty(0) or os.isatty(1) or os.isatty(2):
        # A terminal's job control is between the shell and the process it started:
        # the runner, in a session of its own, is never stopped for reading the
        # terminal (SIGTTIN), so after Ctrl-Z, or started with "&", it went on reading
        # what was typed at the shell (a password prompt took the next command line);
        # and one that writes there (`ember pull ... </dev/null`) went on drawing its
        # progress over the shell's prompt after Ctrl-Z had stopped only this process.
        return False
    # The socket belongs to one home; a home named on the command line is not
    # worth parsing the options for here.
    return not any(a == "--home" or a.startswith("--home=") for a in argv)


def _via_agent(argv: list[str]) -> tuple[int, int] | None:
    if not _wanted(argv):
        return None
    path = agent_socket(default_home_dir())
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        return None
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        return _converse(sock, path, argv)
    except (OSError, protocol.ProtocolError):
        return None
    finally:
        sock.close()


#: PATH_MAX: a working directory as long as this cannot be entered by its path (the
#: runner's chdir), though this process is in it
_PATH_MAX = 4096


def _converse(sock: _socket.socket, path: str, argv: list[str]) -> tuple[int, int] | None:
    cwd = os.fsencode(os.getcwd())
    if len(cwd) >= _PATH_MAX:
        return None
    sock.connect(path)  # no agent: FileNotFoundError / ConnectionRefusedError -> run here
    if peer_credentials(sock)[1] != os.geteuid():
        # Not an agent of our own user (a state directory in a shared place): it gets
        # neither our environment nor our terminal, and we do not obey it.
        return None
    request = protocol.Request(
        argv=[os.fsencode(a) for a in argv],
        cwd=cwd,
        env=[k + b"=" + v for k, v in os.environb.items()],
        umask=_current_umask(),
        code=os.fsencode(os.path.realpath(__file__)),
    )
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
    # Once the request is sent the agent may start the command at any moment: a signal
    # (Ctrl-C) from then until its answer is held, and goes to the command if it
    # started; raised here as it would have been (KeyboardInterrupt) if not.  Taken
    # here, it left the command started and hung up, and said "interrupted" over it.
    held: list[int] = []
    before = _hold_signals(held)
    started = False
    try:
        sock.sendmsg(
            [protocol.frame(protocol.encode_request(request))],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)],
        )
        answer = _read_frame(sock)
        if answer is None or answer[:1] == b"D":
            return None
        if answer[:1] != b"S":
            raise protocol.ProtocolError("unexpected answer from the agent")
        started = True
    finally:
        if not started:
            for signum, handler in before.items():
                _signal.signal(signum, handler)
            # in a fixed order: a handler may run inside another's, so the order they
            # were noted in is not the order they came in (SIGINT first: "interrupted")
            for signum in sorted(set(held)):
                _signal.raise_signal(signum)
    # From here on the command runs in the agent: never fall back to running
    # it a second time here, whatever happens.
    try:
        return _wait(sock, before, held)
    except (OSError, protocol.ProtocolError):
        os.write(2, b"ember: lost the connection to the agent running this command\n")
        return 1, 0


class _GaveUp(KeyboardInterrupt):
    """A second signal came before the agent answered (``_hold_signals``)."""


def _hold_signals(held: list[int]) -> dict[int, object]:
    """Note the forwarded signals in ``held`` instead of acting on them; the handlers
    they had (those the caller ignores, nohup or trap '', are left alone: they are not
    the command's either)."""

    def hold(signum: int, _frame: object) -> None:
        held.append(signum)
        if sum(s != _signal.SIGWINCH for s in held) > 1:  # (a resize asks no stop)
            # a second one (Ctrl-C again): an agent that does not answer (stopped,
            # wedged) must not keep the caller waiting; the held signals act here
            raise _GaveUp

    before = {}
    for signum in protocol.FORWARDED_SIGNALS:
        handler = _signal.getsignal(signum)
        if handler != _signal.SIG_IGN:
            before[signum] = handler
            _signal.signal(signum, hold)
    return before


def _wait(sock: _socket.socket, handled: dict[int, object], held: list[int]) -> tuple[int, int]:
    """The command's exit; the signals in ``handled`` are forwarded to it, those
    ``held`` before it started first."""

    def forward(signum: int, _frame: object) -> None:
        try:  # noqa: SIM105 (contextlib is not worth its import here)
            sock.sendall(protocol.frame(protocol.signal_message(signum)))
        except OSError:
            pass

    for signum in handled:
        _signal.signal(signum, forward)
    for signum in held:
        forward(signum, None)
    while True:
        message = _read_frame(sock)
        if message is None:
            raise protocol.ProtocolError("the agent closed the connection")
        if message[:1] == b"X":
            return protocol.parse_exited(message)


def _read_frame(sock: _socket.socket) -> bytes | None:
    header = _read_exactly(sock, protocol.HEADER)
    if header is None:
        return None
    payload = _read_exactly(sock, protocol.frame_length(header))
    if payload is None:
        raise protocol.ProtocolError("the agent closed the connection mid-message")
    return payload


def _read_exactly(sock: _socket.socket, n: int) -> bytes | None:
    chunks = b""
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            if chunks:
                raise protocol.ProtocolError("the agent closed the connection mid-message")
            return None
        chunks += chunk
    return chunks


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
