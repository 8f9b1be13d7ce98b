"""Running the real ``ember`` CLI as a subprocess, the way a user's shell would.

The tests had about ten copies of this with small differences; this is the one they
share.  What still differs between them (the state dir, ``EMBER_AGENT``, a network
namespace, a timeout, stdin, ``cwd``) is said at each call, so every test keeps the
exact argv and environment it had.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: the console script installed next to the interpreter running the tests
EMBER = str(Path(sys.executable).with_name("ember"))


def ember_env(home: Path, **changes: str | None) -> dict[str, str]:
    """The current environment with ``EMBER_HOME=home`` and then ``changes`` (``None``
    unsets a variable), e.g. ``ember_env(home, EMBER_AGENT="0")``."""
    env = {**os.environ, "EMBER_HOME": str(home)}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_ember(
    *args: str,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    input: str | None = None,
    stdin: int | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``ember *args`` (after ``prefix``, e.g. ``ip netns exec NS``) with ``env`` (None: this
    process's), its output captured as text; ``input`` is written to its stdin, else
    ``stdin`` (e.g. ``subprocess.DEVNULL``) is its stdin.  ``check`` fails the test, with
    the command's stderr, if it exits non-zero."""
    res = subprocess.run(
        [*prefix, EMBER, *args],
        env=env,
        cwd=cwd,
        input=input,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"ember {' '.join(args)} -> {res.returncode}\n{res.stderr}")
    return res
