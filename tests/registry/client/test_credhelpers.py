"""Docker credential helpers (credsStore, credHelpers), against Debian's real
docker-credential-pass over pass and gpg (tests.support.passstore)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from ember.registry.client.credentials import Credentials, CredentialStore
from ember.registry.client.credhelpers import (
    NOT_FOUND_MESSAGE,
    helper_get,
    parse_get_output,
    program_name,
)
from ember.registry.client.errors import CredentialsError
from tests.support.passstore import PassStore


@pytest.fixture
def pass_env(docker_pass_store: PassStore, monkeypatch: pytest.MonkeyPatch) -> PassStore:
    for key, value in docker_pass_store.env.items():
        monkeypatch.setenv(key, value)
    return docker_pass_store


def _store(tmp_path: Path, docker_config: dict[str, object]) -> CredentialStore:
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text(json.dumps(docker_config))
    return CredentialStore(tmp_path / "home" / "credentials.json", docker_config=config)


# -- the protocol, pure --------------------------------------------------------


def test_program_names_are_plain_words() -> None:
    assert program_name("pass") == "docker-credential-pass"
    assert program_name("ecr-login") == "docker-credential-ecr-login"
    for bad in ("", "../../bin/sh", "a/b", "-rf", "x y", "a" * 65):
        with pytest.raises(CredentialsError, match="not valid"):
            program_name(bad)


def test_parse_get_output() -> None:
    out = json.dumps({"ServerURL": "h", "Username": "alice", "Secret": "s:e:c"}).encode()
    assert parse_get_output(out, "p") == Credentials("alice", "s:e:c")
    # what docker-credential-pass 0.6.4 prints, exit 0, for an address it does not hold
    assert parse_get_output(b'{"ServerURL":"h","Username":"","Secret":""}', "p") is None
    assert parse_get_output(b"{}", "p") is None
    for bad, says in (
        (b"not json", "did not print JSON"),
        (b"[1]", "did not print JSON"),
        (b"\xff\xfe", "did not print JSON"),
        (b'{"Username": 1, "Secret": "x"}', "not a string"),
        (b'{"Username": "a:b", "Secret": "x"}', "cannot send"),
        (b'{"Username": "", "Secret": "x"}', "cannot send"),
        (b'{"Username": "<token>", "Secret": "refresh"}', "identity token"),
        (b" " * (65 << 10), "more than 64 KiB"),
    ):
        with pytest.raises(CredentialsError, match=says):
            parse_get_output(bad, "p")


# -- a real helper ---------------------------------------------------------------


def test_helper_get_from_a_real_store(pass_env: PassStore) -> None:
    pass_env.store("creds-a.example:5000", "alice", "alice-secret")
    assert helper_get("pass", "creds-a.example:5000") == Credentials("alice", "alice-secret")
    assert helper_get("pass", "nothing-there.example") is None


def test_a_failing_helper_says_why(pass_env: PassStore, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    pass_env.store("creds-b.example", "bob", "bob-secret")
    # the entry is there, but gpg has no key to decrypt it with
    empty = tmp_path / "gnupg"
    empty.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(empty))
    with pytest.raises(CredentialsError, match=r"docker-credential-pass get failed \(exit status"):
        helper_get("pass", "creds-b.example")


def test_a_missing_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CredentialsError, match="docker-credential-nosuch is not installed"):
        helper_get("nosuch", "h.example")


def _script_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    """A helper of the test's own, as a user might write one (a shell script)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def test_the_helpers_not_found_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helpers' shared library exits 1 printing this line for an address it does
    not hold (newer docker-credential-pass, secretservice, desktop)."""
    _script_helper(tmp_path, monkeypatch, "newer", f"echo '{NOT_FOUND_MESSAGE}'; exit 1")
    assert helper_get("newer", "h.example") is None
    _script_helper(tmp_path, monkeypatch, "broken", "cat >/dev/null; echo 'one'; echo 'keychain locked'; exit 3")
    with pytest.raises(CredentialsError, match=r"broken get failed \(exit status 3\): keychain locked$"):
        helper_get("broken", "h.example")
    # it is given the address on stdin, nothing else
    _script_helper(tmp_path, monkeypatch, "echo",
                   'printf \'{"Username":"u","Secret":"%s|%s"}\' "$(cat)" "$1"')  # fmt: skip
    assert helper_get("echo", "h.example:5000") == Credentials("u", "h.example:5000|get")


def test_a_helper_that_does_not_answer_in_time(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A helper waiting for a passphrase nobody types (gpg's pinentry; here a child
    that sleeps, holding the helper's stdout, as gpg would): it goes with its child."""
    child = tmp_path / "child.pid"
    _script_helper(tmp_path, monkeypatch, "slow", f"sleep 30 & echo $! > {child}; wait")
    start = time.monotonic()
    with pytest.raises(CredentialsError, match="did not answer within 0.5 s"):
        helper_get("slow", "h.example", timeout=0.5)
    assert time.monotonic() - start < 10  # not the child's 30 s
    assert not _alive(int(child.read_text()))


def test_a_helper_may_ask_on_the_terminal(tmp_path: Path) -> None:
    """A helper of the user's own (or gpg with a loopback pinentry) reads the terminal:
    it runs in ember's process group, as Docker runs it (in a group of its own it was
    stopped by SIGTTIN and timed out)."""
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-ttyask"
    helper.write_text("#!/bin/sh\nprintf 'password: ' >/dev/tty\nread pw </dev/tty\n"
                      'printf \'{"Username":"u","Secret":"%s"}\' "$pw"\n')  # fmt: skip
    helper.chmod(0o755)
    code = ("from ember.registry.client.credhelpers import helper_get; "
            "print('got', helper_get('ttyask', 'h.example', timeout=20))")  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    # script(1) gives it a terminal of its own, and types what it is given on stdin
    done = subprocess.run(["script", "-qec", f"{sys.executable} -c \"{code}\"", "/dev/null"],
                          input="typed-secret\n", capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert "got Credentials(username='u', password=***)" in done.stdout, done.stdout + done.stderr


def _alive(pid: int) -> bool:
    """A process still there, not a zombie, 5 s after (a SIGKILL takes effect soon
    after it is sent, not at once)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)


def test_a_helper_in_the_current_directory_is_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PATH=/usr/bin:` (an empty entry) or `.` would run a docker-credential-desktop a
    repository carries when ember runs in it; Go's exec (so Docker) refuses that too."""
    ran = tmp_path / "ran"
    script = tmp_path / "docker-credential-desktop"
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    for path in ("/usr/bin:/bin:", ":/usr/bin", ".:/usr/bin", "bin/..:/usr/bin"):
        monkeypatch.setenv("PATH", path)
        with pytest.raises(CredentialsError, match="not installed"):
            helper_get("desktop", "h.example")
    assert not ran.exists()


def test_hostile_helper_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 30000)
    _script_helper(tmp_path, monkeypatch, "deep", f"cat {deep}")
    with pytest.raises(CredentialsError, match="did not print JSON"):  # not a RecursionError
        helper_get("deep", "h.example")
    # a failing helper's output is quoted in the error, unless it holds a secret
    _script_helper(tmp_path, monkeypatch, "leaky",
                   """echo '{"Username":"alice","Secret":"TOPSECRET"}'; exit 1""")  # fmt: skip
    with pytest.raises(CredentialsError) as err:
        helper_get("leaky", "h.example")
    assert "TOPSECRET" not in str(err.value) and "not shown" in str(err.value)


# -- the lookup: ember's file, then Docker's helpers, then Docker's auths -----------


def test_creds_store_answers_for_every_host(pass_env: PassStore, tmp_path: Path) -> None:
    pass_env.store("creds-c.example:5000", "carol", "carol-secret")
    pass_env.store("https://index.docker.io/v1/", "hubuser", "hub-secret")
    store = _store(tmp_path, {"auths": {"creds-c.example:5000": {}}, "credsStore": "pass"})
    assert store.lookup("creds-c.example:5000") == Credentials("carol", "carol-secret")
    # the host as written, as docker passes it: pass keeps names apart by case
    pass_env.store("Creds-C.example:5000", "caroline", "other-secret")
    assert store.lookup("Creds-C.example:5000") == Credentials("caroline", "other-secret")
    # Docker Hub's credentials are kept under its v1 URL, whatever ember calls the host
    assert store.lookup("docker.io") == Credentials("hubuser", "hub-secret")
    assert store.lookup("unknown.example") is None
    # ember's own login comes first
    store.save("creds-c.example:5000", Credentials("mine", "x"))
    assert store.lookup("creds-c.example:5000") == Credentials("mine", "x")


def test_cred_helpers_name_a_helper_per_host(pass_env: PassStore, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    pass_env.store("creds-d.example", "dave", "dave-secret")
    store = _store(tmp_path, {
        "credsStore": "nosuch",
        "credHelpers": {"https://creds-d.example/v2/": "pass"},
        "auths": {"other.example": {"auth": "b3RoZXI6cHc="}},  # other:pw
    })  # fmt: skip
    assert store.lookup("creds-d.example") == Credentials("dave", "dave-secret")
    assert caplog.text == ""
    # other hosts go to credsStore, which is not installed: a warning, and no credentials
    # (as with a helper: auths is not read, its entry is from before the helper)
    with caplog.at_level(logging.WARNING, logger="ember.registry"):
        assert store.lookup("other.example") is None
    assert "docker-credential-nosuch is not installed" in caplog.text
    assert "going on without it" in caplog.text
    # no helper named at all: auths
    store = _store(tmp_path, {"auths": {"other.example": {"auth": "b3RoZXI6cHc="}}})
    assert store.lookup("other.example") == Credentials("other", "pw")


def test_a_helpers_answer_is_final(pass_env: PassStore, tmp_path: Path) -> None:
    """As Docker: with a helper for the host, an auths entry (left from before the
    helper: `docker login` then writes an empty one) is not read."""
    store = _store(tmp_path, {"credsStore": "pass", "auths": {"creds-e.example": {"auth": "ZTpwdw=="}}})
    assert helper_get("pass", "creds-e.example") is None  # nothing stored for it
    assert store.lookup("creds-e.example") is None


@pytest.mark.parametrize(
    "config, says",
    [
        ({"credsStore": 5}, "credsStore is not a string"),
        ({"credHelpers": {"creds-f.example": ["pass"]}}, "is not a string"),
        ({"credsStore": "../../bin/sh"}, "not valid"),
    ],
)
def test_a_bad_helper_entry_is_passed_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, config: dict[str, object], says: str
) -> None:
    store = _store(tmp_path, config)
    with caplog.at_level(logging.WARNING, logger="ember.registry"):
        assert store.lookup("creds-f.example") is None
    assert says in caplog.text and "going on without it" in caplog.text
