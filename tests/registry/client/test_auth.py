import base64
import json
import socket
import time
from pathlib import Path

import pytest

from ember.registry.client.auth import TokenCache, parse_challenges, pull_scope
from ember.registry.client.client import _content_range_start, uses_plain_http
from ember.registry.client.credentials import Credentials, CredentialStore
from ember.registry.client.errors import CredentialsError


def test_parse_bearer_challenge() -> None:
    [c] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/debian:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.params["service"] == "registry.docker.io"
    assert c.params["scope"] == "repository:library/debian:pull,push"


def test_parse_basic_and_several() -> None:
    cs = parse_challenges(
        'Basic realm="Registry Realm", Bearer realm="https://x/t", error="invalid_token"'
    )
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].realm == "Registry Realm"
    assert cs[1].params["error"] == "invalid_token"


def test_parse_tolerates_junk() -> None:
    assert parse_challenges("") == []
    assert parse_challenges("   ") == []
    assert parse_challenges('Bearer realm="a\\"b"')[0].realm == 'a"b'
    assert parse_challenges("Bearer realm=unquoted,service=s")[0].params == {
        "realm": "unquoted",
        "service": "s",
    }
    for junk in ['"', "=", "Bearer ===", 'Bearer realm="unterminated', "\x00\x01"]:
        parse_challenges(junk)  # never raises


def test_token_cache_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TokenCache()
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache.put("r", "s", pull_scope("a/b"), "tok", 60)
    assert cache.get("r", "s", "repository:a/b:pull") == "tok"
    assert cache.get("r", "s", "repository:other:pull") is None
    now[0] += 49
    assert cache.get("r", "s", "repository:a/b:pull") == "tok"
    now[0] += 2  # inside the safety margin before expiry
    assert cache.get("r", "s", "repository:a/b:pull") is None
    cache.put("r", "s", "x", "t2", None)  # default lifetime
    assert cache.get("r", "s", "x") == "t2"
    cache.drop("r", "s", "x")
    assert cache.get("r", "s", "x") is None


@pytest.mark.parametrize(
    ("host", "plain"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("docker.io", False),
        ("10.0.0.1:5000", False),
        ("localhost.example.com", False),
        ("[::2]:5000", False),
    ],
)
def test_plain_http_only_for_loopback(host: str, plain: bool) -> None:
    assert uses_plain_http(host) is plain


@pytest.mark.parametrize(
    ("addresses", "plain"),
    [(["127.0.0.1", "::1"], True), (["127.0.0.1", "10.1.2.3"], False), ([], False), (None, False)],
)
def test_a_localhost_name_is_loopback_by_what_it_resolves_to(
    monkeypatch: pytest.MonkeyPatch, addresses: list[str] | None, plain: bool
) -> None:
    """RFC 6761 makes *.localhost loopback, but glibc asks DNS for it (/etc/nsswitch.conf),
    which may answer anything: plain HTTP (and credentials in clear) only for loopback."""

    def getaddrinfo(name: str, *_a: object, **_k: object) -> list[tuple[object, ...]]:
        assert name == "registry.localhost"
        if addresses is None:
            raise socket.gaierror("no such name")
        return [(0, 0, 0, "", (a, 0)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert uses_plain_http("registry.localhost:80") is plain


def test_credentials_go_in_clear_to_no_third_host() -> None:
    """A plain-HTTP registry (loopback, or --plain-http) may name a plain-HTTP token realm
    on its own host or on loopback; one on another host got the Basic credentials in
    clear text (the rule said: unless the registry itself is plain HTTP)."""
    from ember.registry.client.client import RegistryClient

    with RegistryClient("127.0.0.1:5000") as loopback:
        assert loopback._may_send_in_clear("127.0.0.1") and loopback._may_send_in_clear("localhost")
        assert not loopback._may_send_in_clear("auth.example.com")
    with RegistryClient("reg.example.com:5000", plain_http=True) as flagged:
        assert flagged._may_send_in_clear("reg.example.com")
        assert not flagged._may_send_in_clear("auth.example.com")
    with RegistryClient("reg.example.com") as tls:
        assert not tls._may_send_in_clear("reg.example.com")


def test_content_range() -> None:
    assert _content_range_start("bytes 100-199/200") == 100
    assert _content_range_start("bytes */200") is None
    assert _content_range_start("items 1-2/3") is None


def test_credential_store(tmp_path: Path) -> None:
    docker = tmp_path / "docker.json"
    store = CredentialStore(tmp_path / "home" / "credentials.json", docker_config=docker)
    assert store.lookup("example.org") is None
    store.save("Example.org:5000", Credentials("u", "p:with:colons"))
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert store.lookup("example.org:5000") == Credentials("u", "p:with:colons")
    assert "p:with" not in repr(store.lookup("example.org:5000"))
    auth = base64.b64encode(b"hub:pw").decode()
    docker.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "https://other.io": {"username": "o", "password": "q"},
                    "broken.io": {"auth": "!!!"},
                }
            }
        )
    )
    assert store.lookup("docker.io") == Credentials("hub", "pw")
    assert store.lookup("other.io") == Credentials("o", "q")
    # an entry of Docker's that does not decode is passed over (a warning), as a
    # config.json that does not parse
    assert store.lookup("broken.io") is None
    # ember's own file wins over Docker's
    store.save("other.io", Credentials("mine", "x"))
    assert store.lookup("other.io") == Credentials("mine", "x")
    assert store.remove("other.io") and not store.remove("other.io")
    assert store.lookup("other.io") == Credentials("o", "q")
    with pytest.raises(CredentialsError):
        store.save("h", Credentials("a:b", "c"))


def test_credential_store_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json")
    with pytest.raises(CredentialsError, match="cannot read"):
        CredentialStore(path, docker_config=tmp_path / "none").lookup("x")


def test_a_host_the_registry_redirects_to_never_gets_its_credentials() -> None:
    """A blob redirected to another host (a CDN, a bucket) that answers 401 with a Bearer
    challenge of its own: the client took it for the registry's and sent the registry's
    stored password, as Basic, to the token realm that host named."""
    import base64
    import re
    from http.server import BaseHTTPRequestHandler

    from ember.registry.client.client import RegistryClient
    from ember.registry.client.credentials import Credentials
    from ember.registry.client.errors import RegistryError
    from tests.registry.client.test_transport import serve

    def answer(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": "0"}.items():
            h.send_header(k, v)
        h.end_headers()

    # three hosts: the registry, the CDN it redirects blobs to, the CDN's token realm
    with serve(lambda h: answer(h, 200, {}), "127.0.0.3") as collector, serve(
        lambda h: answer(h, 401, {"WWW-Authenticate": (
            f'Bearer realm="http://127.0.0.3:{collector.server_address[1]}/token",service=evil'
        )}),
        "127.0.0.2",
    ) as cdn:  # fmt: skip

        def registry(h: BaseHTTPRequestHandler) -> None:
            if h.path.startswith("/v2/r/blobs/"):
                answer(h, 307, {"Location": f"http://127.0.0.2:{cdn.server_address[1]}/blob"})
            else:
                answer(h, 200, {})

        with (
            serve(registry) as reg,
            RegistryClient(
                f"127.0.0.1:{reg.server_address[1]}",
                credentials=Credentials("alice", "alice-secret"),
                retries=0,
            ) as client,
            pytest.raises(RegistryError, match="asks for credentials: ember sends it none"),
        ):
            client.request("GET", "r/blobs/sha256:" + "0" * 64, scope="repository:r:pull")
        secret = base64.b64encode(b"alice:alice-secret").decode()
        assert not [s for s in collector.seen if secret in str(s[2])], collector.seen
        assert not collector.seen
        assert all(not re.search("alice", str(s[2])) for s in cdn.seen)


def test_logins_at_once_keep_every_entry(tmp_path: Path) -> None:
    """Each login read the file, added its entry and wrote it back: of 8 at once, as few
    as 2 entries were left (and a logout could be undone by a login's write)."""
    import subprocess
    import sys

    path = tmp_path / "credentials.json"
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from ember.registry.client.credentials import CredentialStore, Credentials\n"
        "store = CredentialStore(Path(sys.argv[1]), docker_config=Path(sys.argv[1] + '.none'))\n"
        "for i in range(20):\n"
        "    store.save(f'h{sys.argv[2]}-{i}.example', Credentials('u', 'p'))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(n)]) for n in range(6)]
    assert [p.wait(60) for p in procs] == [0] * 6
    store = CredentialStore(path, docker_config=tmp_path / "none")
    missing = [(n, i) for n in range(6) for i in range(20) if store.lookup(f"h{n}-{i}.example") is None]
    assert missing == []


def test_a_broken_docker_config_is_passed_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Docker's config.json is a fallback: one that does not parse failed every pull,
    even from a registry that needs no login; a FIFO there hung it, a link to /dev/zero
    filled memory.  The docker CLI warns and goes on; so does ember."""
    import os

    docker = tmp_path / "config.json"
    store = CredentialStore(tmp_path / "credentials.json", docker_config=docker)
    store.save("mine.example", Credentials("u", "p"))
    for make in (
        lambda: docker.write_text('{"auths": {"other.example": {"auth": "!!!not-base64"}}}'),
        lambda: docker.write_text("{not json"),
        lambda: os.mkfifo(docker),
        lambda: docker.symlink_to("/dev/zero"),
        lambda: docker.write_bytes(b" " * (5 << 20)),
    ):
        docker.unlink(missing_ok=True)
        make()
        caplog.clear()
        assert store.lookup("other.example") is None
        assert "going on without it" in caplog.text, caplog.text
        assert store.lookup("mine.example") == Credentials("u", "p")


def test_parse_keeps_so_many_parameters_at_most() -> None:
    """Each parameter sliced the rest of the header off (quadratic): ~6 MB of challenge
    kept a client busy for 393 s. Now one pass, and the parameters are capped."""
    header = "Bearer " + ",".join(f"p{i}=v" for i in range(2000))
    [c] = parse_challenges(header[:16000])
    assert len(c.params) == 32
    assert c.params["p0"] == "v"
    # what follows a capped challenge is not taken for more challenges
    assert [x.scheme for x in parse_challenges(header[:16000] + ", Basic realm=x")] == ["bearer"]


def test_a_challenge_header_too_long_is_refused_before_parsing() -> None:
    limit = 16 * 1024
    ok = 'Bearer realm="' + "r" * (limit - 20) + '"'
    assert parse_challenges(ok)[0].realm == "r" * (limit - 20)
    with pytest.raises(ValueError, match="more than 16384"):  # ChallengeTooLarge
        parse_challenges("Bearer " + "a=b," * limit)


def test_a_registry_sending_megabytes_of_challenge_gets_one_clear_error() -> None:
    """A hostile registry's 401 with many WWW-Authenticate headers (http.client joins up
    to 100 of 64 KiB each: 6 MB took 393 s to parse; these 80 KB take about a second
    of the old parser)."""
    from ember.registry.client.client import RegistryClient
    from ember.registry.client.errors import RegistryProtocolError
    from tests.registry.client.test_client import raw_server

    line = b"WWW-Authenticate: Bearer " + b"a=b," * 5000 + b"\r\n"
    reply = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n" + line * 4 + b"\r\n"
    with (
        raw_server(lambda _n, _r: reply) as (port, seen),
        RegistryClient(f"127.0.0.1:{port}", retries=0) as client,
        pytest.raises(RegistryProtocolError, match=r"sent a WWW-Authenticate header of \d+ bytes \(more than 16384\): refused"),
    ):
        client.get_manifest("app", "latest")
    assert len(seen) == 1


def test_an_unreadable_credentials_file_says_how_to_mend_it(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json")
    with pytest.raises(CredentialsError, match="cannot read credentials file") as e:
        CredentialStore(path, docker_config=tmp_path / "none").lookup("reg.example")
    assert e.value.hint == f"remove or fix {path}, or run ember registry login reg.example again"


@pytest.mark.parametrize("damage", ["not-json", "fifo", "directory"])
def test_login_moves_an_unreadable_credentials_file_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """A broken $EMBER_HOME/credentials.json failed every pull, and `ember registry
    login`, which the comment said mends it, failed on it too."""
    import os

    path = tmp_path / "credentials.json"
    if damage == "not-json":
        path.write_text("{not json")
    elif damage == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    store = CredentialStore(path, docker_config=tmp_path / "none")
    store.save("reg.example", Credentials("u", "p"))
    assert store.lookup("reg.example") == Credentials("u", "p")
    assert store.lookup("other.example") is None
    bad = tmp_path / "credentials.json.bad"
    assert f"moved it to {bad} and started a new one" in caplog.text
    if damage == "not-json":
        assert bad.read_text() == "{not json"  # kept for the user to look at


def test_logout_moves_an_unreadable_credentials_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json")
    store = CredentialStore(path, docker_config=tmp_path / "none")
    assert store.remove("reg.example") is False  # its entry, if any, is in the file moved aside
    assert not path.exists() and (tmp_path / "credentials.json.bad").read_text() == "{not json"
    assert store.lookup("reg.example") is None


def test_a_credentials_file_that_cannot_be_opened_is_left_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not opened (its mode, its owner: one `sudo ember registry login` on a shared home)
    is not damaged: a login moved it aside and its other entries were lost."""
    from ember.registry.client import credentials

    path = tmp_path / "credentials.json"
    store = CredentialStore(path, docker_config=tmp_path / "none")
    store.save("a.example", Credentials("u", "p"))
    kept = path.read_bytes()

    def refused(p: Path, **kw: object) -> object:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(credentials, "open_regular", refused)
    for action in (lambda: store.lookup("a.example"),
                   lambda: store.save("c.example", Credentials("v", "q"))):  # fmt: skip
        with pytest.raises(CredentialsError, match=r"cannot be read \(Permission denied\)") as e:
            action()
        assert e.value.hint == f"check its owner and mode (ls -l {path})"
    monkeypatch.undo()
    assert path.read_bytes() == kept and not (tmp_path / "credentials.json.bad").exists()


def test_a_file_moved_aside_never_replaces_an_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    store = CredentialStore(path, docker_config=tmp_path / "none")
    for junk in ["{first", "{second", "{third"]:
        path.write_text(junk)
        store.save("reg.example", Credentials("u", "p"))
    assert (tmp_path / "credentials.json.bad").read_text() == "{first"
    assert (tmp_path / "credentials.json.bad.1").read_text() == "{second"
    assert (tmp_path / "credentials.json.bad.2").read_text() == "{third"
