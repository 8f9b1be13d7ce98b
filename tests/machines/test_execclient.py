"""``ember exec``'s client against a stand-in for ember-init on real unix sockets (the
guest's side itself: tests/vm/test_init_ns.py; both together: tests/integration)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember.machines import execproto as proto
from ember.machines import state as mstate
from ember.machines.errors import ExecBusy, ExecError, ExecProtocolError
from ember.machines.execclient import MACHINE_GONE, run_exec
from ember.machines.state import MachineState, VMConfig
from ember.process import proc_start_time
from ember.vm.vmm.base import exec_sockets

Guest = Callable[[socket.socket, str], None]


def _machine() -> MachineState:
    return MachineState(
        id=secrets.token_hex(32), name="m", image="x", image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(), command=["true"], config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1), status=mstate.RUNNING,
        vmm_pid=os.getpid(), vmm_start=proc_start_time(os.getpid()),
    )  # fmt: skip


def _request(conn: socket.socket) -> dict[str, list[str]]:
    """The open request's fields, by tag."""
    reader, frames = proto.FrameReader(proto.MAX_IN), []
    while not frames:
        frames = reader.feed(conn.recv(1 << 16))
    kind, payload = frames[0]
    assert kind == proto.OPEN
    fields: dict[str, list[str]] = {}
    for f in payload.split(b"\0")[:-1]:
        fields.setdefault(f[:1].decode(), []).append(f[1:].decode())
    return fields


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Callable[[Guest], Path]]:
    """A machine directory whose first exec port is served by ``play(conn, nonce)``."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def serve(play: Guest) -> Path:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = exec_sockets(tmp_path)[0]
        path.unlink(missing_ok=True)  # (a second guest of one test)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                play(conn, _request(conn)["n"][0])

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
        return tmp_path

    yield serve
    for t in threads:
        t.join(10)
    for s in listeners:
        s.close()


def test_frames_before_the_start_are_an_earlier_sessions(guest: Callable[[Guest], Path], tmp_path: Path) -> None:
    def play(conn: socket.socket, nonce: str) -> None:
        conn.sendall(proto.frame(proto.STDOUT, b"stale\n") + proto.frame(proto.EXIT, b"\0\0\0\1")
                     + proto.frame(proto.REFUSED, b"other\0not yours")
                     + proto.frame(proto.STARTED, nonce.encode())
                     + proto.frame(proto.STDOUT, b"hi\n") + proto.frame(proto.STDERR, b"err\n")
                     + proto.frame(proto.EXIT, b"\0\0\0\3"))  # fmt: skip

    d = guest(play)
    out, err = os.pipe(), os.pipe()
    code = run_exec(d, _machine(), proto.ExecRequest(["x"]), stdin_fd=None, out_fd=out[1], err_fd=err[1])
    os.close(out[1])
    os.close(err[1])
    assert (code, os.read(out[0], 100), os.read(err[0], 100)) == (3, b"hi\n", b"err\n")


def test_a_refusal_after_the_start_is_still_one(guest: Callable[[Guest], Path]) -> None:
    d = guest(lambda conn, nonce: conn.sendall(
        proto.frame(proto.STARTED, nonce.encode()) + proto.frame(proto.REFUSED, nonce.encode() + b"\0gone wrong")))
    with pytest.raises(ExecError, match="cannot run the command: gone wrong"):
        run_exec(d, _machine(), proto.ExecRequest(["x"]), stdin_fd=None)


def test_what_a_guest_sends_that_is_no_frame_is_one_error(guest: Callable[[Guest], Path]) -> None:
    d = guest(lambda conn, nonce: conn.sendall(
        proto.frame(proto.STARTED, nonce.encode()) + b"o\xff\xff\xff\xff"))
    with pytest.raises(ExecProtocolError, match="a frame of 4294967295 bytes"):
        run_exec(d, _machine(), proto.ExecRequest(["x"]), stdin_fd=None)
    d = guest(lambda conn, nonce: conn.sendall(
        proto.frame(proto.STARTED, nonce.encode()) + proto.frame(proto.EXIT, b"\0")))
    with pytest.raises(ExecProtocolError, match="malformed exit frame"):
        run_exec(d, _machine(), proto.ExecRequest(["x"]), stdin_fd=None)


def test_a_machine_that_stops_under_the_command(guest: Callable[[Guest], Path]) -> None:
    d = guest(lambda conn, nonce: conn.sendall(proto.frame(proto.STARTED, nonce.encode())))
    assert run_exec(d, _machine(), proto.ExecRequest(["x"]), stdin_fd=None) == MACHINE_GONE


def test_signals_are_passed_on_and_stdin_ends(guest: Callable[[Guest], Path]) -> None:
    seen: list[tuple[bytes, bytes]] = []

    def play(conn: socket.socket, nonce: str) -> None:
        conn.sendall(proto.frame(proto.STARTED, nonce.encode()))
        reader = proto.FrameReader(proto.MAX_IN)
        while not any(k == proto.SIGNAL for k, _ in seen) or not any(k == proto.STDIN_END for k, _ in seen):
            seen.extend(reader.feed(conn.recv(1 << 16)))
        conn.sendall(proto.frame(proto.EXIT, b"\0\0\0\0"))

    d = guest(play)
    r, w = os.pipe()
    os.write(w, b"input")
    os.close(w)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    assert run_exec(d, _machine(), proto.ExecRequest(["x"]), stdin_fd=r) == 0
    os.close(r)
    assert (proto.STDIN, b"input") in seen and (proto.SIGNAL, b"\0\0\0\x0a") in seen


def test_a_fifth_session_is_refused(tmp_path: Path) -> None:
    import fcntl

    held = []
    for n in range(len(exec_sockets(tmp_path))):
        fd = os.open(tmp_path / f"exec-{n}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        with pytest.raises(ExecBusy, match="runs 4 exec sessions already"):
            run_exec(tmp_path, _machine(), proto.ExecRequest(["x"]), stdin_fd=None)
    finally:
        for fd in held:
            os.close(fd)


def test_a_request_without_an_answer_goes_again_on_a_new_connection(tmp_path: Path) -> None:
    """ember-init now and then never sees a request that came right after another
    session's end: the client hangs up and sends it again, with the same nonce."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(exec_sockets(tmp_path)[0]))
    listener.listen(1)
    nonces = []

    def guest() -> None:
        with listener.accept()[0] as lost:  # takes the request, never answers
            nonces.append(_request(lost)["n"][0])
            while lost.recv(1 << 16):
                pass
        with listener.accept()[0] as conn:
            nonces.append(nonce := _request(conn)["n"][0])
            conn.sendall(proto.frame(proto.STARTED, nonce.encode()) + proto.frame(proto.EXIT, b"\0\0\0\5"))

    t = threading.Thread(target=guest, daemon=True)
    t.start()
    try:
        assert run_exec(tmp_path, _machine(), proto.ExecRequest(["x"]), stdin_fd=None) == 5
    finally:
        t.join(10)
        listener.close()
    assert len(nonces) == 2 and nonces[0] == nonces[1]
