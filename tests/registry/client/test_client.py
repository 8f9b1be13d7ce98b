"""The registry client against tiny misbehaving servers on loopback (real sockets)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest

from ember.oci import mediatypes as mt
from ember.oci.digest import Digest
from ember.oci.manifest import Descriptor
from ember.registry.client.client import RegistryClient
from ember.registry.client.errors import BlobCorrupt, RegistryError, RegistryUnreachable
from ember.registry.client.transport import Response
from ember.store.content import ContentStore

MANIFEST = b'{"schemaVersion": 2, "mediaType": "' + mt.OCI_MANIFEST.encode() + b'"}'

#: what to send on the Nth connection (from 0), the request having been read
Answer = Callable[[int, bytes], "bytes | list[bytes]"]


def _head(length: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: " + mt.OCI_MANIFEST.encode() + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )


def cut(_n: int, _request: bytes = b"") -> bytes:
    """Headers promising 500 bytes, one byte of body, then the connection closes."""
    return _head(500) + b"{"


def _range_start(request: bytes) -> int:
    """Where a request's ``Range: bytes=N-`` starts (0 without one)."""
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"range: bytes="):
            return int(line.split(b"=")[1].split(b"-")[0])
    return 0


def _ranged_head(blob: bytes, start: int) -> bytes:
    """The status line and headers of ``blob`` from ``start`` (206 when not 0)."""
    status = b"206 Partial Content" if start else b"200 OK"
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(blob) - start).encode()
        + b"\r\nContent-Range: bytes " + f"{start}-{len(blob) - 1}/{len(blob)}".encode()
        + b"\r\n\r\n"
    )  # fmt: skip


@contextmanager
def raw_server(
    answer: Answer, *, hold: bool = False, gap: float = 0.0
) -> Iterator[tuple[int, list[int]]]:
    """(port, connections seen): each connection gets one answer once its request is read
    (``answer(n, request)``; a list of chunks is sent ``gap`` seconds apart, until the
    client hangs up), then is closed, or with ``hold`` left open without another byte
    until the test ends (a registry that stalls)."""
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
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    break
                request += data
            n = len(seen)
            seen.append(n)
            reply = answer(n, request)
            with contextlib.suppress(OSError):  # a client that gave up on a slow answer
                for i, chunk in enumerate([reply] if isinstance(reply, bytes) else reply):
                    time.sleep(gap if i else 0)
                    conn.sendall(chunk)
            if hold:
                held.append(conn)
            else:
                conn.close()

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


def test_a_manifest_cut_mid_body_is_retried_then_unreachable() -> None:
    with (
        raw_server(cut) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=2, backoff=0.01) as client,
        pytest.raises(RegistryUnreachable, match="cannot reach registry 127.0.0.1.*missing"),
    ):
        client.get_manifest("app", "latest")
    assert len(seen) == 3  # the first try and two retries


def test_a_manifest_cut_once_is_fetched_on_the_retry() -> None:
    def cut_once(n: int, _request: bytes) -> bytes:
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

        def challenge(_n: int, _request: bytes) -> bytes:
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


def test_a_registry_that_never_answers_is_tried_twice_not_five_times() -> None:
    """Each silent try waits the whole timeout: five of them (retries=4) kept a user
    waiting five minutes at the default 60 s, without a word."""
    with (
        raw_server(lambda _n, _r: b"", hold=True) as (port, seen),
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
        raw_server(lambda _n, _r: head, hold=True) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=4, backoff=0.01, timeout=0.3) as client,
        pytest.raises(RegistryUnreachable, match=r"stalled: no data for 0.3 s"),
    ):
        client.fetch_blob("app", desc, store)
    assert len(seen) == 2
    assert not store.exists(desc.digest)


def test_a_cut_connection_still_gets_every_retry() -> None:
    """Only a silent peer is limited to one retry: a connection cut at once (no answer
    at all, not a timeout) gets all of them."""
    with (
        raw_server(lambda _n, _r: b"") as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=3, backoff=0.001) as client,
        pytest.raises(RegistryUnreachable, match=f"cannot reach registry 127.0.0.1:{port}"),
    ):
        client.get_manifest("app", "latest")
    assert len(seen) == 4


def test_a_download_that_stalls_after_progress_is_resumed_each_time(tmp_path: Path) -> None:
    """Each try resumes where the last stalled: one that got further is not a silent
    peer, and gets the ordinary retries (it failed after two before)."""
    blob = bytes(range(256)) * 4
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))

    def ten_more(_n: int, request: bytes) -> bytes:
        start = _range_start(request)
        return _ranged_head(blob, start) + blob[start : start + 10]

    store = ContentStore(tmp_path / "content")
    with (
        raw_server(ten_more, hold=True) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=3, backoff=0.001, timeout=0.2) as client,
        pytest.raises(RegistryUnreachable, match="stalled"),
    ):
        client.fetch_blob("app", desc, store)
    assert len(seen) == 4  # the first try and three resumed ones, each 10 bytes further


def test_a_blob_that_trickles_is_cut_and_resumed_then_given_up(tmp_path: Path) -> None:
    """A peer that sends one byte now and then never trips the read timeout (each read
    gets its byte in time): the download went on at its pace, for ever at a byte a
    minute.  Too few bytes in a whole timeout now count as a cut connection."""
    blob = bytes(range(256)) * 4
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    ranges: list[int] = []

    def trickle(_n: int, request: bytes) -> list[bytes]:
        start = _range_start(request)
        ranges.append(start)
        return [_ranged_head(blob, start), *(blob[i : i + 1] for i in range(start, len(blob)))]

    store = ContentStore(tmp_path / "content")
    began = time.monotonic()
    with (
        raw_server(trickle, gap=0.05) as (port, _seen),  # each byte well inside 0.3 s
        RegistryClient(f"127.0.0.1:{port}", retries=2, backoff=0.001, timeout=0.3) as client,
        pytest.raises(RegistryUnreachable, match=r"keeps failing \(only \d+ bytes came in"),
    ):
        client.fetch_blob("app", desc, store)
    assert time.monotonic() - began < 10  # at its pace the blob would take 51 s
    assert len(ranges) == 3 and ranges[0] == 0 and ranges[1] > 0 and ranges[2] > ranges[1]  # resumed
    assert not store.exists(desc.digest)


def test_a_token_answer_nested_too_deep_is_refused_not_a_crash() -> None:
    """The token service's JSON went to json.loads with ValueError caught: '[' * 5000
    raised RecursionError, a traceback."""
    port = [0]

    def answer(n: int, _request: bytes) -> bytes:
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


def test_a_cancel_stops_a_download_blocked_on_a_stalled_registry_and_it_resumes(
    tmp_path: Path,
) -> None:
    """A cancel from another thread wakes a read blocked on a registry that stopped
    sending (it used to wait for the 60 s read timeout, twice); what arrived stays in
    the ingest file and the next download asks only for the rest."""
    from ember.images.cancel import Cancellation, PullCancelled

    blob = bytes(range(256)) * 40
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    requests: list[bytes] = []

    def answer(n: int, request: bytes) -> bytes:
        requests.append(request)
        if n == 0:  # 1000 bytes, then nothing more (held open)
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(blob) + blob[:1000]
        return (
            b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n" % (len(blob) - 1000)
            + b"Content-Range: bytes 1000-%d/%d\r\n\r\n" % (len(blob) - 1, len(blob))
            + blob[1000:]
        )

    store = ContentStore(tmp_path / "content")
    ingest = store.ingest_dir / f"sha256-{desc.digest.hex}"
    cancel = Cancellation()
    outcome: list[BaseException | None] = []

    def download() -> None:
        try:
            client.fetch_blob("app", desc, store, cancel=cancel)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    with (
        raw_server(answer, hold=True) as (port, _seen),
        RegistryClient(f"127.0.0.1:{port}", retries=4, backoff=0.01) as client,  # 60 s timeout
    ):
        worker = threading.Thread(target=download, daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while not (ingest.exists() and ingest.stat().st_size >= 1000):
            assert time.monotonic() < deadline, "the first 1000 bytes never arrived"
            time.sleep(0.01)
        cancel.cancel()
        worker.join(10)
        assert not worker.is_alive(), "the download waited for the read timeout"
        assert len(outcome) == 1 and isinstance(outcome[0], PullCancelled)
        assert len(requests) == 1  # an abort is not a cut connection to retry
        assert ingest.stat().st_size == 1000 and not store.exists(desc.digest)

        client.fetch_blob("app", desc, store)
    assert b"range: bytes=1000-" in requests[1].lower()
    assert store.read_bytes(desc.digest) == blob


def test_a_stored_blob_described_with_another_size_is_refused(tmp_path: Path) -> None:
    """A blob already in the store was taken as is, whatever size the manifest claimed
    for it: the image's size, counted from its descriptors, then said what the registry
    made up.  Nothing is asked of the registry for it either way."""
    blob = b"stored layer"
    store = ContentStore(tmp_path / "content")
    store.put_bytes(blob)
    with (
        raw_server(lambda _n, _r: b"") as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=0) as client,
    ):
        client.fetch_blob("app", Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob)), store)
        lying = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), 4 << 30)
        with pytest.raises(RegistryError, match=f"describes blob {Digest.of(blob)} as {4 << 30} bytes; it is 12"):
            client.fetch_blob("app", lying, store)
    assert seen == []


def test_a_damaged_stored_blob_is_fetched_again_not_blamed_on_the_registry(
    tmp_path: Path,
) -> None:
    """A stored blob truncated on disk (its size no longer the descriptor's) made every
    pull of an image sharing it fail with "describes blob ... as N bytes; it is M",
    blaming the registry for the store's damage, forever: nothing ever replaced it."""
    blob = b"a stored layer, truncated on disk since"
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    store = ContentStore(tmp_path / "content")
    store.put_bytes(blob)
    path = store.path(desc.digest)
    path.chmod(0o644)
    os.truncate(path, len(blob) // 2)
    with (
        raw_server(lambda _n, _r: _ranged_head(blob, 0) + blob) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=0) as client,
    ):
        client.fetch_blob("app", desc, store)
    assert len(seen) == 1  # downloaded again
    assert store.read_bytes(desc.digest) == blob and store.matches(desc.digest)


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        # a realm, a redirect and a token that HTTP cannot carry: http.client raised
        # UnicodeEncodeError, which nothing caught (a traceback)
        (b'WWW-Authenticate: Bearer realm="http://127.0.0.1:PORT/tok\xc3\xa9n"', None,
         "invalid token realm"),
        (b"Location: /v2/caf\xc3\xa9", None, "unusable URL"),
        (b'WWW-Authenticate: Bearer realm="http://127.0.0.1:PORT/token"',
         '{"token": "t\u20ac"}'.encode(), "returned no usable token"),
    ],
)  # fmt: skip
def test_what_http_cannot_carry_is_one_error_not_a_crash(
    first: bytes, then: bytes | None, message: str
) -> None:
    port = [0]

    def answer(n: int, _request: bytes) -> bytes:
        if n == 0:
            status = b"307 Temporary Redirect" if first.startswith(b"Location") else b"401 Unauthorized"
            header = first.replace(b"PORT", str(port[0]).encode())
            return b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n" + header + b"\r\n\r\n"
        body = then or b"{}"
        return b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body

    with raw_server(answer) as (listening, _seen):
        port[0] = listening
        with (
            RegistryClient(f"127.0.0.1:{listening}", retries=0, backoff=0.01) as client,
            pytest.raises(RegistryError, match=message),
        ):
            client.get_manifest("app", "latest")


def test_a_loopback_registry_sends_no_credentials_to_a_plain_http_realm_elsewhere() -> None:
    """The registry is on loopback (plain HTTP), its token realm a plain-HTTP URL on
    another host: the Basic credentials went there in clear text (through any proxy on
    the way); now the realm is refused before anything is sent to it (the old client
    tried to reach it: unreachable here, another error)."""
    from ember.registry.client.credentials import Credentials
    from ember.registry.client.errors import RegistryProtocolError

    def answer(_n: int, _request: bytes) -> bytes:
        return (
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
            b'WWW-Authenticate: Bearer realm="http://auth.example.com/token",service="x"\r\n\r\n'
        )

    with raw_server(answer) as (listening, _seen):
        credentials = Credentials("alice", "s3cret")
        with (
            RegistryClient(f"127.0.0.1:{listening}", credentials=credentials, retries=0) as client,
            pytest.raises(RegistryProtocolError, match="plain-HTTP realm .*: refused"),
        ):
            client.get_manifest("app", "latest")


def test_a_blob_body_that_ends_short_is_resumed_not_thrown_away(tmp_path: Path) -> None:
    """A body that ended cleanly but short (no Content-Length: the close ends it) was
    committed, failed the size check, was thrown away and raised BlobCorrupt, without a
    resume; progress went negative."""
    blob = bytes(range(256)) * 4
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    requests: list[bytes] = []

    def answer(n: int, request: bytes) -> bytes:
        requests.append(request)
        if n == 0:
            return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + blob[:400]
        start = _range_start(request)
        return _ranged_head(blob, start) + blob[start:]

    store = ContentStore(tmp_path / "content")
    reported: list[int] = []
    with (
        raw_server(answer) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=2, backoff=0.001) as client,
    ):
        client.fetch_blob("app", desc, store, reported.append)
    assert len(seen) == 2
    assert b"range: bytes=400-" in requests[1].lower()
    assert store.read_bytes(desc.digest) == blob
    assert sum(reported) == len(blob) and all(n > 0 for n in reported)


@pytest.mark.parametrize("ranges", [True, False], ids=["416-with-its-size", "200-with-its-size"])
def test_a_blob_smaller_than_its_descriptor_is_said_at_once(tmp_path: Path, ranges: bool) -> None:
    """The registry serves the whole blob, with its size, and it is smaller than the
    manifest says: a wrong manifest, which no resume mends.  Taken for a cut body, it was
    fetched again and again from 0 and said as "keeps failing (body ended 100 bytes
    short)", a network fault."""
    blob = bytes(range(256)) * 4
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob) + 100)

    def answer(_n: int, request: bytes) -> bytes:
        start = _range_start(request)
        if start >= len(blob):  # the resume: its Content-Range says the blob's size
            return f"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len(blob)}\r\nContent-Length: 0\r\n\r\n".encode()
        if ranges:  # no length: the body looks cut, and is resumed
            return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + blob
        return f"HTTP/1.1 200 OK\r\nContent-Length: {len(blob)}\r\n\r\n".encode() + blob

    store = ContentStore(tmp_path / "content")
    reported: list[int] = []
    with (
        raw_server(answer) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=4, backoff=0.001) as client,
        pytest.raises(BlobCorrupt, match=f"with {len(blob)} bytes; its descriptor declares {len(blob) + 100}"),
    ):
        client.fetch_blob("app", desc, store, reported.append)
    assert len(seen) == (2 if ranges else 1)
    assert sum(reported) == 0


def test_a_blob_body_always_short_is_given_up_as_unreachable(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 4
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))

    def answer(_n: int, request: bytes) -> bytes:
        start = _range_start(request)
        return _ranged_head(blob, start).replace(b"Content-Length", b"X-Length") + blob[start : start + 1]

    store = ContentStore(tmp_path / "content")
    with (
        raw_server(answer) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=2, backoff=0.001) as client,
        pytest.raises(RegistryUnreachable, match=r"keeps failing \(body ended \d+ bytes short\)"),
    ):
        client.fetch_blob("app", desc, store)
    assert len(seen) == 3
    assert not store.exists(desc.digest)


def test_a_blob_body_too_long_leaves_progress_at_zero(tmp_path: Path) -> None:
    """The chunk that overruns the size is refused before it is written or counted: the
    progress taken back was the writer's offset, that chunk included (below zero)."""
    from ember.registry.client.errors import BlobCorrupt

    blob = bytes(range(256)) * 4
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    body = blob + b"and more"
    store = ContentStore(tmp_path / "content")
    reported: list[int] = []
    with (
        raw_server(lambda _n, _r: _ranged_head(body, 0) + body) as (port, _seen),
        RegistryClient(f"127.0.0.1:{port}", retries=0) as client,
        pytest.raises(BlobCorrupt, match="larger than"),
    ):
        client.fetch_blob("app", desc, store, reported.append)
    assert sum(reported) == 0


def _manifest_with_digest_header(header: bytes) -> Answer:
    def answer(_n: int, _request: bytes) -> bytes:
        return _head(len(MANIFEST)).replace(b"\r\n\r\n", b"\r\nDocker-Content-Digest: " + header + b"\r\n\r\n") + MANIFEST

    return answer


def test_a_manifest_by_tag_that_does_not_match_its_digest_header_is_refused() -> None:
    """By tag, the Docker-Content-Digest header was not compared with the body: a
    manifest changed on the way (a proxy, a cache) was taken as the registry's."""
    from ember.registry.client.errors import BlobCorrupt

    other = Digest.of(b"another manifest")
    with (
        raw_server(_manifest_with_digest_header(str(other).encode())) as (port, _seen),
        RegistryClient(f"127.0.0.1:{port}", retries=0) as client,
        pytest.raises(BlobCorrupt, match=f"does not match {other} \\(its Docker-Content-Digest header\\): it is {Digest.of(MANIFEST)}"),
    ):
        client.get_manifest("app", "latest")


@pytest.mark.parametrize(
    "header",
    [b"junk", b"md5:0123", b"sha256:" + b"0" * 10, str(Digest.of(MANIFEST)).encode(),
     str(Digest.of(MANIFEST, "sha512")).encode()],
)  # fmt: skip
def test_a_manifest_digest_header_that_matches_or_does_not_parse_is_accepted(header: bytes) -> None:
    with (
        raw_server(_manifest_with_digest_header(header)) as (port, _seen),
        RegistryClient(f"127.0.0.1:{port}", retries=0) as client,
    ):
        fetched = client.get_manifest("app", "latest")
    assert fetched.data == MANIFEST
    algorithm = "sha512" if header.startswith(b"sha512:") else "sha256"
    assert fetched.digest == Digest.of(MANIFEST, algorithm)


def _denying_registry(port: list[int]) -> Answer:
    """401 with a Bearer challenge, a token from the realm, then 401 again for that token
    (error="insufficient_scope"), as Docker Hub answers for a repository that does not
    exist or that the user may not read."""
    body = b'{"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}'

    def answer(n: int, _request: bytes) -> bytes:
        challenge = (
            b'WWW-Authenticate: Bearer realm="http://127.0.0.1:' + str(port[0]).encode()
            + b'/token",service="reg",scope="repository:team/nothere:pull"'
        )  # fmt: skip
        if n == 1:
            token = b'{"token": "t"}'
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(token) + token
        if n == 2:
            challenge += b',error="insufficient_scope"'
        return (
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n" % len(body) + challenge
            + b"\r\n\r\n" + body
        )  # fmt: skip

    return answer


@pytest.mark.parametrize("user", [None, "alice"])
def test_a_401_after_a_granted_token_says_access_denied(user: str | None) -> None:
    """A second 401 after a token was granted was "requires authentication: run ember
    registry login" (or "refused the credentials for user X"): the credentials were
    fine, the repository does not exist or they may not read it."""
    from ember.registry.client.credentials import Credentials
    from ember.registry.client.errors import AuthenticationFailed

    port = [0]
    with raw_server(_denying_registry(port)) as (listening, seen):
        port[0] = listening
        credentials = Credentials(user, "pw") if user else None
        with (
            RegistryClient(f"127.0.0.1:{listening}", credentials=credentials, retries=0) as client,
            pytest.raises(AuthenticationFailed) as e,
        ):
            client.get_manifest("team/nothere", "latest")
    who = "user 'alice'" if user else "anonymous users"
    assert e.value.message == (
        f"access to team/nothere on 127.0.0.1:{listening} denied: it does not exist, or {who} "
        "may not pull it (insufficient_scope; UNAUTHORIZED: authentication required)"
    )
    if user:
        assert e.value.hint is None
    else:
        assert e.value.hint == f"if it is private, run: ember registry login 127.0.0.1:{listening}"
    assert len(seen) == 3


def test_manifest_token_and_blob_requests_ask_for_identity_encoding(tmp_path: Path) -> None:
    """Only blob requests said Accept-Encoding: identity; a manifest or a token answer
    gzip-encoded by a server that assumes what is not refused would not parse."""
    from http.server import BaseHTTPRequestHandler

    from tests.registry.client.test_transport import serve

    blob = b"layer bytes"

    def registry(h: BaseHTTPRequestHandler) -> None:
        authorized = h.headers.get("Authorization") == "Bearer t"
        if h.path.startswith("/token"):
            status, body, extra = 200, b'{"token": "t"}', {}
        elif not authorized:
            realm = f"http://127.0.0.1:{h.server.server_address[1]}/token"
            status, body, extra = 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'}
        elif "/manifests/" in h.path:
            status, body, extra = 200, MANIFEST, {"Content-Type": mt.OCI_MANIFEST}
        else:
            status, body, extra = 200, blob, {}
        h.send_response(status)
        for k, v in {**extra, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    with serve(registry) as server, RegistryClient(f"127.0.0.1:{server.server_address[1]}", retries=0) as client:
        client.get_manifest("app", "latest")
        client.fetch_blob("app", Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob)), ContentStore(tmp_path / "c"))
    paths = [path.split("?")[0] for _m, path, _h, _p in server.seen]
    assert paths == ["/v2/app/manifests/latest", "/token", "/v2/app/manifests/latest", f"/v2/app/blobs/{Digest.of(blob)}"]
    assert [h.get("accept-encoding") for _m, _path, h, _p in server.seen] == ["identity"] * 4


@pytest.mark.parametrize("target", ["loopback", "elsewhere"])
def test_a_redirect_from_https_to_plain_http_is_refused_unless_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """A registry on HTTPS redirecting a request to plain HTTP on another host was
    followed: the manifest (and a token in a signed URL) travelled unprotected. Only a
    host spoken to in plain HTTP anyway (loopback, --plain-http) may be redirected to."""
    import ssl
    from http.server import BaseHTTPRequestHandler

    from ember.registry.client.errors import RegistryProtocolError
    from tests.registry.client.test_transport import ok, serve
    from tests.support.registry import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path / "tls")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    with serve(ok(MANIFEST)) as plain:
        # a host that is not loopback is reached through this (local) proxy, so nothing
        # leaves the machine whatever the client does
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{plain.server_address[1]}")
        location = (
            f"http://127.0.0.1:{plain.server_address[1]}/m" if target == "loopback"
            else "http://registry.example.com/m"
        )  # fmt: skip

        def redirect(h: BaseHTTPRequestHandler) -> None:
            h.send_response(307)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        with (
            serve(redirect, tls=tls) as secure,
            RegistryClient(f"127.0.0.1:{secure.server_address[1]}", retries=0) as client,
        ):
            client._switch_to_https()  # as a loopback registry that wants HTTPS gets it
            if target == "loopback":
                assert client.get_manifest("app", "latest").data == MANIFEST
                assert [p for _m, p, _h, _c in plain.seen] == ["/m"]
                return
            with pytest.raises(RegistryProtocolError) as e:
                client.get_manifest("app", "latest")
    assert e.value.message == (
        f"127.0.0.1:{secure.server_address[1]} redirected an HTTPS request to plain HTTP "
        "(registry.example.com): refused, it would travel unprotected"
    )
    assert plain.seen == [] and len(secure.seen) == 1  # not retried


def _too_many(retry_after: bytes | None) -> bytes:
    header = b"Retry-After: " + retry_after + b"\r\n" if retry_after is not None else b""
    return b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n" + header + b"\r\n"


def test_a_blob_rate_limited_is_tried_retries_plus_one_times_and_said_so(tmp_path: Path) -> None:
    """The request's own retries ran inside the download's: 25 requests (in 18 s) for a
    registry answering 429, then "keeps failing (HTTP 429)"."""
    from ember.registry.client.errors import RateLimited

    blob = b"layer"
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    with (
        raw_server(lambda _n, _r: _too_many(None)) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=4, backoff=0.001) as client,
        pytest.raises(RateLimited) as e,
    ):
        client.fetch_blob("app", desc, ContentStore(tmp_path / "content"))
    assert len(seen) == 5
    assert e.value.message == f"registry 127.0.0.1:{port} rate limited the requests for blob {desc.digest.short} (HTTP 429)"
    assert e.value.hint == f"try again later (or log in: ember registry login 127.0.0.1:{port})"


@pytest.mark.parametrize("what", ["manifest", "blob"])
def test_a_retry_after_is_waited_for(tmp_path: Path, what: str) -> None:
    blob = b"layer"
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    body = MANIFEST if what == "manifest" else blob

    def answer(n: int, _request: bytes) -> bytes:
        if n == 0:
            return _too_many(b"7")
        if n == 1:
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 3\r\n\r\n"
        return _head(len(body)) + body

    pauses: list[float] = []
    store = ContentStore(tmp_path / "content")
    with (
        raw_server(answer) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=4, backoff=0.001) as client,
    ):
        client._sleep = pauses.append  # what it would wait, without waiting
        if what == "manifest":
            assert client.get_manifest("app", "latest").data == MANIFEST
        else:
            client.fetch_blob("app", desc, store)
            assert store.read_bytes(desc.digest) == blob
    assert pauses == [7.0, 3.0]
    assert len(seen) == 3


@pytest.mark.parametrize("what", ["manifest", "blob"])
@pytest.mark.parametrize(
    ("answer", "said", "hint"),
    [
        (_too_many(b"3600"), "rate limited the requests for", "try again in 3600 s"),
        # (it was tried once and said as "keeps failing (HTTP 503)" / "answered HTTP
        # 503", without the wait the registry asked for)
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 600\r\n\r\n",
         "asks to wait 600 s", "try again in 600 s"),
    ],
    ids=["429", "503"],
)  # fmt: skip
def test_a_retry_after_beyond_the_cap_is_said_at_once(
    tmp_path: Path, what: str, answer: bytes, said: str, hint: str
) -> None:
    """A Retry-After that would take the waits past max_retry_wait is not sat through,
    nor hammered at with the backoff: one request, and when to try again."""
    from ember.registry.client.credentials import Credentials

    blob = b"layer"
    desc = Descriptor(mt.OCI_LAYER_GZIP, Digest.of(blob), len(blob))
    pauses: list[float] = []
    with (
        raw_server(lambda _n, _r: answer) as (port, seen),
        RegistryClient(
            f"127.0.0.1:{port}", retries=4, backoff=0.001, credentials=Credentials("u", "p")
        ) as client,
        pytest.raises(RegistryError, match=said) as e,
    ):
        client._sleep = pauses.append
        if what == "manifest":
            client.get_manifest("app", "latest")
        else:
            client.fetch_blob("app", desc, ContentStore(tmp_path / "content"))
    assert len(seen) == 1 and pauses == []
    assert e.value.hint == hint


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    import email.utils
    from types import SimpleNamespace

    from ember.registry.client.client import _retry_after

    def resp(status: int, value: str) -> Response:
        return cast(Response, SimpleNamespace(status_code=status, headers={"Retry-After": value}))

    assert _retry_after(resp(429, "12")) == 12.0
    assert _retry_after(resp(503, " 0 ")) == 0.0
    assert _retry_after(resp(500, "12")) is None  # only 429 and 503 say it
    for junk in ("", "soon", "-5", "1.5", "9" * 40):
        assert _retry_after(resp(429, junk)) is None, junk
    later = _retry_after(resp(429, email.utils.formatdate(time.time() + 100, usegmt=True)))
    assert later is not None and 90 < later <= 100
    assert _retry_after(resp(429, "Mon, 01 Jan 2001 00:00:00 GMT")) == 0.0
