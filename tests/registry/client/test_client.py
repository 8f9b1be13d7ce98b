"""The registry client against tiny misbehaving servers on loopback (real sockets)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ember.oci import mediatypes as mt
from ember.oci.digest import Digest
from ember.oci.manifest import Descriptor
from ember.registry.client.client import RegistryClient
from ember.registry.client.errors import RegistryError, RegistryUnreachable
from ember.store.content import ContentStore

MANIFEST = b'{"schemaVersion": 2, "mediaType": "' + mt.OCI_MANIFEST.encode() + b'"}'

#: what to send on the Nth connection (from 0), the request having been read
Answer = Callable[[int], bytes]


def _head(length: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: " + mt.OCI_MANIFEST.encode() + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )


def cut(_n: int) -> bytes:
    """Headers promising 500 bytes, one byte of body, then the connection closes."""
    return _head(500) + b"{"


@contextmanager
def raw_server(answer: Answer) -> Iterator[tuple[int, list[int]]]:
    """(port, connections seen): each connection gets one answer, then is closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    seen: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(4096)
                    if not data:
                        break
                    request += data
                n = len(seen)
                seen.append(n)
                conn.sendall(answer(n))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_manifest_cut_mid_body_is_retried_then_unreachable() -> None:
    with (
        raw_server(cut) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=2, backoff=0.01) as client,
        pytest.raises(RegistryUnreachable, match="cannot reach registry 127.0.0.1.*missing"),
    ):
        client.get_manifest("app", "latest")
    assert len(seen) == 3  # the first try and two retries


def test_a_manifest_cut_once_is_fetched_on_the_retry() -> None:
    def cut_once(n: int) -> bytes:
        return cut(n) if n == 0 else _head(len(MANIFEST)) + MANIFEST

    with (
        raw_server(cut_once) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=2, backoff=0.01) as client,
    ):
        fetched = client.get_manifest("app", "latest")
    assert fetched.data == MANIFEST
    assert fetched.digest == Digest.of(MANIFEST)
    assert fetched.media_type == mt.OCI_MANIFEST
    assert len(seen) == 2


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_a_registry_port_out_of_range_is_refused(port: str) -> None:
    with pytest.raises(RegistryError, match=f"invalid registry address 'localhost:{port}'"):
        RegistryClient(f"localhost:{port}")


def test_an_unreachable_token_service_is_named_as_such() -> None:
    """The registry answered (401 with a realm); the realm on a closed port was
    reported as "cannot reach registry <the registry>"."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        realm_port = closed.getsockname()[1]  # bound, never listening: connections refused

        def challenge(_n: int) -> bytes:
            return (
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                b'WWW-Authenticate: Bearer realm="http://127.0.0.1:'
                + str(realm_port).encode()
                + b'/token",service="x"\r\n\r\n'
            )

        with (
            raw_server(challenge) as (port, _seen),
            RegistryClient(f"127.0.0.1:{port}", retries=1, backoff=0.01) as client,
            pytest.raises(RegistryUnreachable) as e,
        ):
            client.get_manifest("app", "latest")
    assert f"cannot reach the token service 127.0.0.1:{realm_port} of registry 127.0.0.1:{port}" in str(
        e.value
    )


@contextmanager
def silent_server(head: bytes = b"") -> Iterator[tuple[int, list[int]]]:
    """(port, connections seen): each connection is read, sent ``head`` (maybe nothing),
    then left open without another byte until the test ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    seen: list[int] = []
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    break
                request += data
            seen.append(len(seen))
            conn.sendall(head)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_a_registry_that_never_answers_is_tried_twice_not_five_times() -> None:
    """Each silent try waits the whole timeout: five of them (retries=4) kept a user
    waiting five minutes at the default 60 s, without a word."""
    with (
        silent_server() as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=4, backoff=0.01, timeout=0.3) as client,
        pytest.raises(RegistryUnreachable, match=f"registry 127.0.0.1:{port} did not answer in time") as e,
    ):
        client.get_manifest("app", "latest")
    assert len(seen) == 2
    assert "timed out" in str(e.value)


def test_a_blob_download_that_stalls_is_tried_twice(tmp_path: Path) -> None:
    blob = b"x" * 1000
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + blob[:10]
    store = ContentStore(tmp_path / "content")
    with (
        silent_server(head) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=4, backoff=0.01, timeout=0.3) as client,
        pytest.raises(RegistryUnreachable, match=r"stalled: no data for 0.3 s"),
    ):
        client.fetch_blob("app", desc, store)
    assert len(seen) == 2
    assert not store.exists(desc.digest)


def test_a_refused_connection_still_gets_every_retry() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
        port = closed.getsockname()[1]
        with (
            RegistryClient(f"127.0.0.1:{port}", retries=3, backoff=0.001) as client,
            pytest.raises(RegistryUnreachable, match=f"cannot reach registry 127.0.0.1:{port}"),
        ):
            client.get_manifest("app", "latest")


def test_a_token_answer_nested_too_deep_is_refused_not_a_crash() -> None:
    """The token service's JSON went to json.loads with ValueError caught: '[' * 5000
    raised RecursionError, a traceback."""
    port = [0]

    def answer(n: int) -> bytes:
        if n == 0:
            return (
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                b'WWW-Authenticate: Bearer realm="http://127.0.0.1:'
                + str(port[0]).encode()
                + b'/token",service="x"\r\n\r\n'
            )
        body = b"[" * 5000
        return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body

    with raw_server(answer) as (listening, _seen):
        port[0] = listening
        with (
            RegistryClient(f"127.0.0.1:{listening}", retries=0, backoff=0.01) as client,
            pytest.raises(RegistryError, match="returned no usable token"),
        ):
            client.get_manifest("app", "latest")
