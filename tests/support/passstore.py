"""A real Docker credential store for tests: ``pass`` (gpg) behind Debian's
``docker-credential-pass``, in directories of the test's own.

Its gpg key has no passphrase, so no pinentry ever asks; the gpg-agent it
starts is stopped when the store is closed.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HELPER = "pass"
KEY_ID = "ember-test@example.invalid"


@dataclass(frozen=True)
class PassStore:
    gnupghome: Path
    store_dir: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs in its environment to reach this store."""
        return {"GNUPGHOME": str(self.gnupghome), "PASSWORD_STORE_DIR": str(self.store_dir)}

    def _run(self, argv: list[str], stdin: bytes = b"") -> bytes:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, env={**os.environ, **self.env}, check=False
        )
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done.stdout

    def store(self, address: str, username: str, secret: str) -> None:
        """As ``docker login`` does with ``credsStore: pass``."""
        doc = {"ServerURL": address, "Username": username, "Secret": secret}
        self._run([f"docker-credential-{HELPER}", "store"], json.dumps(doc).encode())


@contextmanager
def pass_store(root: Path) -> Iterator[PassStore]:
    """A new, initialised password store under ``root`` (a short path: gpg-agent's
    socket goes in it)."""
    home, store_dir = root / "gnupg", root / "password-store"
    home.mkdir(mode=0o700, parents=True)
    made = PassStore(home, store_dir)
    try:
        made._run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", KEY_ID,
                   "default", "default", "never"])  # fmt: skip
        made._run(["pass", "init", KEY_ID])
        yield made
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, **made.env},
                       capture_output=True, check=False)  # fmt: skip
