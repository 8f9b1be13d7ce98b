"""A machine's control channel (``control.sock``), served by its monitor.

``ember stop/kill`` and the monitor itself write lines (``stop``, ``kill``,
``signal N``, ``stop_timeout N``, ``bye``; clients make theirs with
``ember.machines.controllines``) that ember-init reads on the guest's control port
(docs/guest.md, "Control").  QEMU's socket chardev behind that port serves one client
at a time and drops what the guest has not read when its client hangs up; so the
monitor is QEMU's only client and relays every line, whoever sent it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.vm.vmm.base import listen_unix, open_control

#: the VMM's own control socket (QEMU's, one client at a time); ``control.sock``, the
#: one clients use, is the monitor's (``ControlRelay``)
VMM_CONTROL = "vmm-control.sock"
#: the lines a client may send (docs/guest.md, "Control"); anything else is dropped
_CLIENT_LINE = re.compile(
    rb"(stop|kill|signal (?:[1-9]|[1-5][0-9]|6[0-4])|stop_timeout (?:-1|0|[1-9][0-9]{0,4}))"
)
_MAX_LINE = 64
_MAX_CLIENTS = 64


class ControlRelay:
    """The machine's control channel, served by the monitor.

    QEMU's socket chardev serves one client at a time and drops what the guest has not
    read yet when that client hangs up.  So the monitor is its only client: one
    connection, open from the guest's start until the VMM exits, carries the lines of
    every ``ember stop/kill`` (which connect to ``control.sock``, served here, and may
    hang up whenever they like) and the monitor's own ``bye``.  (With a second
    connection for the bye, QEMU never read it while ``ember stop`` held its own: the
    guest waited out its whole ``exit_ack``.)"""

    def __init__(self, listen_path: Path, vmm_path: Path) -> None:
        self.listen_path = listen_path
        self.vmm_path = vmm_path
        self._lock = threading.Lock()
        self._vmm: socket.socket | None = None
        self._queued: list[bytes] = []
        #: lines from ``send_soon`` for the relay's thread to send (a deque: its append
        #: and popleft are atomic, no lock needed)
        self._soon: collections.deque[bytes] = collections.deque()
        self._connected = False
        self._want = False
        self._give_up = 0.0
        self._closing = False
        self._listener = listen_unix(listen_path, 16)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name="ember-control", daemon=True)
        self._thread.start()

    def connect(self) -> None:
        """Open the connection to the VMM from now on (once the guest may read it: after
        a restored guest took its config), then send what clients said meanwhile.  The
        relay's thread does it: QEMU creates its socket a moment after its start."""
        self._give_up = time.monotonic() + 30
        self._want = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"c")

    def _try_connect(self) -> bool:
        try:
            sock = open_control(self.vmm_path, timeout=0.05)
            sock.settimeout(2.0)
        except EmberError:
            return False
        with self._lock:
            self._vmm, self._connected = sock, True
            queued, self._queued = self._queued, []
        for line in queued:
            self.send(line)
        return True

    def send(self, line: bytes) -> None:
        """Write one line (without its newline) to the guest; queued until connected."""
        with self._lock:
            if not self._connected:
                self._queued.append(line)
                return
            if self._vmm is None:
                return
            try:
                self._vmm.sendall(line + b"\n")
            except OSError as e:
                print(f"monitor: cannot write to the guest's control port: {e}", file=sys.stderr)

    def send_soon(self, line: bytes) -> None:
        """``send`` from a signal handler: the relay's thread sends the line.

        A Python signal handler runs on the main thread between any two of its
        bytecodes, also while that thread is inside ``send`` or ``close`` holding
        ``_lock``: taking the lock there would wait for ever on the thread's own lock.
        So this takes no lock: it appends to a deque and writes a byte to the
        non-blocking wake-up pipe, which the relay's thread watches.  ``close`` sets
        ``_closing`` before it closes that pipe, and runs on the main thread too, so a
        handler either finds the pipe open or does nothing (once the VMM is gone there
        is nobody to tell)."""
        if self._closing:
            return
        self._soon.append(line)
        with contextlib.suppress(OSError):  # a full pipe wakes the thread all the same
            os.write(self._wake_w, b"s")

    def _serve(self) -> None:
        clients: dict[socket.socket, bytes] = {}
        try:
            while True:
                trying = self._want and not self._connected
                if trying and (self._try_connect() or time.monotonic() > self._give_up):
                    if not self._connected:
                        print("monitor: the VMM's control socket did not appear", file=sys.stderr)
                        with self._lock:
                            self._connected = True  # lines are dropped from now on
                    trying = False
                with self._lock:
                    vmm = self._vmm
                watched: list[Any] = [self._listener, self._wake_r, *clients]
                if vmm is not None:
                    watched.append(vmm)  # what the guest says here is not for anyone
                ready, _, _ = select.select(watched, [], [], 0.01 if trying else 0.5)
                for r in ready:
                    if r == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 64)
                        if self._closing:
                            return
                        while self._soon:
                            self.send(self._soon.popleft())
                        continue
                    if r is self._listener:
                        with contextlib.suppress(OSError):
                            conn, _ = self._listener.accept()
                            if len(clients) >= _MAX_CLIENTS:
                                conn.close()
                            else:
                                conn.setblocking(False)
                                clients[conn] = b""
                    elif r is vmm:
                        try:
                            if not vmm.recv(4096, socket.MSG_DONTWAIT):
                                with self._lock:
                                    self._vmm = None  # the VMM went away
                        except (BlockingIOError, InterruptedError):
                            pass
                        except OSError:
                            with self._lock:
                                self._vmm = None
                    else:
                        self._from_client(r, clients)
        finally:
            for c in clients:
                c.close()

    def _from_client(self, conn: socket.socket, clients: dict[socket.socket, bytes]) -> None:
        try:
            data = conn.recv(256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            conn.close()
            del clients[conn]
            return
        buf = clients[conn] + data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if _CLIENT_LINE.fullmatch(line):
                self.send(line)
            else:
                print(f"monitor: ignored a control line {line[:_MAX_LINE]!r}", file=sys.stderr)
        if len(rest) > _MAX_LINE:
            rest = b""  # no line is that long: drop it
        clients[conn] = rest

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen_path)
        with self._lock:
            if self._vmm is not None:
                self._vmm.close()
            self._vmm, self._connected = None, True
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
