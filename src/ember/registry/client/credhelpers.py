"""Docker credential helpers: the ``credsStore`` and ``credHelpers`` of config.json.

A helper is a program ``docker-credential-NAME`` on ``$PATH`` (``pass``,
``secretservice``, ``desktop``, ``ecr-login``, ``gcloud``...).  ``get`` reads
the server's address on stdin and prints ``{"ServerURL", "Username",
"Secret"}``; a helper that holds nothing for it exits non-zero printing
``credentials not found in native keychain`` (some older ones, Debian's
``docker-credential-pass`` 0.6.4 among them, exit 0 with an empty user name
and secret instead).  The address is the one ``docker login`` stored it under:
``https://index.docker.io/v1/`` for Docker Hub, else ``host[:port]``.

The parsing is pure (``parse_get_output``); ``helper_get`` runs the program.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile

from ember import jsonutil
from ember.process import descendants
from ember.registry.client.credentials import Credentials
from ember.registry.client.errors import CredentialsError

#: what a helper prints (on stdout) for an address it holds nothing for
NOT_FOUND_MESSAGE = "credentials not found in native keychain"
#: the user name a helper gives with an OAuth identity (refresh) token as the secret
IDENTITY_TOKEN_USER = "<token>"
#: a helper may ask for a passphrase (pass's gpg pinentry): time to answer it
HELPER_TIMEOUT = 60.0
#: a helper's answer is a few hundred bytes
MAX_OUTPUT = 64 << 10

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def program_name(helper: str) -> str:
    """``pass`` -> ``docker-credential-pass``; CredentialsError for a name that is not
    a plain word (a path there would run any program)."""
    if not _NAME.match(helper):
        raise CredentialsError(
            f"credential helper name {helper!r} is not valid: it names the program "
            f"docker-credential-NAME, with letters, digits, '.', '_' or '-'"
        )
    return f"docker-credential-{helper}"


def parse_get_output(output: bytes, program: str) -> Credentials | None:
    """What ``PROGRAM get`` printed, exiting 0: the credentials, or None when it has none."""
    if len(output) > MAX_OUTPUT:
        raise CredentialsError(f"{program} printed more than {MAX_OUTPUT >> 10} KiB: not read")
    try:
        doc = jsonutil.loads(output)  # bounded nesting: "[[[[..." is an error, not a crash
    except ValueError:
        raise CredentialsError(f"{program} did not print JSON credentials") from None
    if not isinstance(doc, dict):
        raise CredentialsError(f"{program} did not print JSON credentials")
    user, secret = doc.get("Username", ""), doc.get("Secret", "")
    if not isinstance(user, str) or not isinstance(secret, str):
        raise CredentialsError(f"{program} printed a Username or Secret that is not a string")
    if not user and not secret:
        return None
    if user == IDENTITY_TOKEN_USER:
        raise CredentialsError(
            f"{program} holds an identity token (OAuth refresh token), which ember cannot "
            "use: log in with `ember registry login` instead"
        )
    if not user or ":" in user:
        raise CredentialsError(f"{program} printed a user name ember cannot send: {user!r}")
    return Credentials(user, secret)


def find_program(program: str) -> str | None:
    """``program``'s path in the absolute directories of ``$PATH``: an empty or relative
    entry (``PATH=/usr/bin:``, ``.``) would run a file of the current directory, which
    Go's exec (and so Docker) refuses too."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not os.path.isabs(directory):
            continue
        path = os.path.join(directory, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def helper_get(helper: str, address: str, *, timeout: float = HELPER_TIMEOUT) -> Credentials | None:
    """Ask helper ``helper`` for ``address``'s credentials: None if it has none;
    CredentialsError if it cannot be run or fails."""
    program = program_name(helper)
    path = find_program(program)
    if path is None:
        raise CredentialsError(f"{program} is not installed (not found on $PATH)")
    # Its answer goes to a file, not a pipe: a child it leaves behind (pass's gpg) would
    # hold a pipe open, and reading it to its end wait for that child.  It runs in our
    # process group, as Docker runs it: it may ask on the terminal (a helper of the
    # user's own, gpg's loopback pinentry), which a background group cannot.  At a
    # timeout or an interrupt it goes with what it started, which would otherwise hold
    # our stderr.  Its stderr is the user's: a helper may say why it fails there.
    with tempfile.TemporaryFile() as answer:
        try:
            proc = subprocess.Popen([path, "get"], stdin=subprocess.PIPE, stdout=answer)
        except OSError as e:
            raise CredentialsError(f"cannot run {program}: {e.strerror}") from None
        try:
            assert proc.stdin is not None
            # a helper need not read it all; a few bytes: the write never blocks
            with contextlib.suppress(BrokenPipeError), proc.stdin:
                proc.stdin.write(address.encode())
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise CredentialsError(f"{program} get did not answer within {timeout:g} s") from None
        finally:
            if proc.poll() is None:  # timed out, or interrupted
                _kill_with_descendants(proc.pid)
            status = proc.wait()
        answer.seek(0)
        output = answer.read(MAX_OUTPUT + 1)
    if status != 0:
        said = output[:MAX_OUTPUT].decode(errors="replace").strip()
        if said == NOT_FOUND_MESSAGE:
            return None
        last = said.splitlines()[-1][:200] if said else ""
        if "Secret" in said:  # what it printed may hold the very secret: never repeat it
            last = "(its output is not shown: it names a Secret)"
        raise CredentialsError(
            f"{program} get failed (exit status {status})" + (f": {last}" if last else "")
        )
    return parse_get_output(output, program)


def _kill_with_descendants(pid: int) -> None:
    """SIGKILL child ``pid`` and the processes below it, stopped first so that it starts
    no more while they are looked for (killed first, its children would be reparented
    and no longer found below it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    for victim in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
