"""Helpers shared by the bench scripts.

Each bench script compares one ember operation with its anchor (ANCHORS.md)
in the same run: the two are timed alternately N times (so drift on a shared,
noisy machine hits both alike), the medians are compared as a ratio, and one
line is appended to ``docs/performance.md`` under the script's section.

Run bench scripts from the repository root as modules (``python -m bench.NAME``)
or as files (``python bench/NAME.py``): importing this module puts the
repository root on ``sys.path`` so ``tests.support`` is importable either way.
"""

from __future__ import annotations

import compileall
import contextlib
import datetime as _dt
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.registry import Registry, running_registry  # noqa: E402
from tests.support.treecmp import compare_trees  # noqa: E402

# Time ember as installed (with bytecode), not the compiler: an editable
# install compiles on first import, and never keeps it with PYTHONDONTWRITEBYTECODE.
compileall.compile_dir(REPO_ROOT / "src", quiet=2)

from ember.fsutil import atomic_write  # noqa: E402
from ember.locks import FileLock  # noqa: E402

# The contestants run as from a script: with a terminal as its stdin the `ember` client
# runs commands itself instead of through an agent (docs/agent.md), and "via the agent"
# would time the wrong path when a bench is started from a terminal.
if os.isatty(0):
    _devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(_devnull, 0)
    os.close(_devnull)

PERFORMANCE_MD = REPO_ROOT / "docs" / "performance.md"
PERFORMANCE_HEADER = (
    "# Performance\n\n"
    "Figures appended by the scripts in `bench/` (one command each, see `bench/`).\n"
    "Each line: date, what was measured, ember's median, the anchor's median measured\n"
    "in the same run, and the ratio ember/anchor (lower is better), then the median\n"
    "of the rounds' own ratios and their middle half (one run after the other in each\n"
    "round, so a slow minute slows both sides of a round).\n"
)


@dataclass
class Timing:
    """The wall-clock samples (seconds) of one contestant."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def __str__(self) -> str:
        spread = f"{min(self.samples):.3f}-{max(self.samples):.3f}"
        return f"{self.name}: median {fmt_seconds(self.median)} (n={len(self.samples)}, {spread} s)"


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(
    contestants: Mapping[str, Callable[[], object]],
    runs: int = 5,
    *,
    warmup: int = 1,
    setup: Callable[[str], object] | None = None,
    after: Callable[[str], object] | None = None,
) -> dict[str, Timing]:
    """Time each contestant ``runs`` times, interleaved A B A B ..., after
    ``warmup`` untimed rounds.  ``setup(name)`` runs untimed before every call
    (e.g. to remove the previous run's output), ``after(name)`` untimed right
    after it, warm-up rounds included (e.g. to check what the call produced)."""
    timings = {name: Timing(name) for name in contestants}
    for round_no in range(warmup + runs):
        for name, fn in contestants.items():
            if setup is not None:
                setup(name)
            elapsed = time_once(fn)
            if after is not None:
                after(name)
            if round_no >= warmup:
                timings[name].samples.append(elapsed)
    return timings


def median_of(fn: Callable[[], object], runs: int = 5, *, warmup: int = 1) -> Timing:
    """One contestant alone (when there is no anchor to interleave with)."""
    return alternate({"run": fn}, runs, warmup=warmup)["run"]


def ratio(ours: Timing, anchor: Timing) -> float:
    return ours.median / anchor.median


def round_ratios(ours: Timing, anchor: Timing) -> list[float]:
    """Each round's ratio: ``alternate`` times the contestants one after the other in
    every round, so a slow minute on this shared host slows both sides of a round,
    where it shifts the two medians by different amounts."""
    return [o / a for o, a in zip(ours.samples, anchor.samples, strict=True)]


def ratio_line(what: str, ours: Timing, anchor: Timing, *, rounds: bool = True) -> str:
    """``what: ember X vs anchor Y (ratio R)``: the form printed and recorded, with the
    median and middle half of the rounds' own ratios (``round_ratios``) unless
    ``rounds`` is False (samples not timed round by round together)."""
    line = (
        f"{what}: {ours.name} {fmt_seconds(ours.median)} vs {anchor.name} "
        f"{fmt_seconds(anchor.median)}, ratio {ratio(ours, anchor):.2f}x "
        f"(medians of {len(ours.samples)} alternating runs"
    )
    if not rounds:
        return line + ")"
    each = round_ratios(ours, anchor)  # unequal counts raise: not timed round by round
    if len(each) < 4:  # too few for quartiles that mean something
        return line + f"; round by round {statistics.median(each):.2f}x)"
    q1, mid, q3 = statistics.quantiles(each, n=4, method="inclusive")
    return line + f"; round by round {mid:.2f}x, middle half {q1:.2f}-{q3:.2f}x)"


def print_ratio(what: str, ours: Timing, anchor: Timing, *, rounds: bool = True) -> str:
    line = ratio_line(what, ours, anchor, rounds=rounds)
    print(ours)
    print(anchor)
    print(line)
    return line


def at_base(contestant: str, rev: str) -> str:
    """The name under which ``--base REV`` times that commit's ``contestant``."""
    return f"{contestant} at {rev}"


def base_lines(what: str, timings: Mapping[str, Timing], contestant: str, rev: str | None) -> list[str]:
    """The before/after line of a ``--base REV`` run (this tree's ``contestant`` against
    that commit's, same run); none without one."""
    if rev is None:
        return []
    return [print_ratio(f"{what}, this tree vs {rev}", timings[contestant],
                        timings[at_base(contestant, rev)])]  # fmt: skip


def machine_note() -> str:
    # which interpreter: pyenv's default build ran ember's Python code 1.3x to 2.4x as
    # slow as Debian's /usr/bin/python3 here (scripts/setup-venv)
    return (
        f"{platform.node()}, {platform.machine()}, "
        f"Python {platform.python_version()} from {sys.base_prefix}"
    )


def record(section: str, line: str, path: Path = PERFORMANCE_MD) -> None:
    """Append ``- DATE line`` at the end of section ``## section`` of
    docs/performance.md, creating the file or the section if missing.  Holds a
    lock across read-modify-write so parallel bench scripts do not lose lines."""
    today = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    entry = f"- {today}: {line}"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with FileLock(lock):
        text = path.read_text() if path.exists() else PERFORMANCE_HEADER
        atomic_write(path, insert_under_section(text, section, entry).encode())


def insert_under_section(text: str, section: str, entry: str) -> str:
    """Pure part of ``record``: ``text`` with ``entry`` appended to ``## section``."""
    header = f"## {section}"
    lines = text.rstrip("\n").split("\n")
    try:
        start = lines.index(header)
    except ValueError:
        return "\n".join([*lines, "", header, "", entry]) + "\n"
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    # insert after the section's last non-blank line
    insert_at = end
    while insert_at > start + 1 and not lines[insert_at - 1].strip():
        insert_at -= 1
    if insert_at == start + 1:
        lines[insert_at:insert_at] = ["", entry]
    else:
        lines[insert_at:insert_at] = [entry]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def registry(*, username: str | None = None, password: str | None = None) -> Iterator[Registry]:
    """A docker-registry on a free loopback port in a temp dir, removed afterwards."""
    with (
        tempfile.TemporaryDirectory(prefix="ember-bench-registry-") as tmp,
        running_registry(Path(tmp) / "registry", username=username, password=password) as reg,
    ):
        yield reg


def source_tree(rev: str, into: Path) -> Path:
    """``src/`` of commit ``rev`` under ``into``, byte-compiled as an install would be
    (put it first on ``PYTHONPATH`` to run that commit's ember: before and after
    one change in one run)."""
    into.mkdir()
    # git's own tree, unpacked by tar (tarfile's extraction filters, which would
    # otherwise be wanted, are missing from Debian 12's Python 3.11.2)
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev, "src"], stdout=subprocess.PIPE, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-f", "-", "-C", str(into)], input=archive, check=True)
    compileall.compile_dir(into / "src", quiet=2)
    return into / "src"


def run_command(cmd: list[str], env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` to its end: (its pid, its stdout).  A failure ends the bench with
    its stderr.  The pid is what ``HostAgent.confirm_served`` looks for."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )  # fmt: skip
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return proc.pid, out


@contextlib.contextmanager
def scratch_ext4(parent: Path, size: str = "16G") -> Iterator[Path]:
    """A fresh ext4 in a sparse file under ``parent`` (default mkfs options), loop-mounted
    without ``discard``; unmounted and removed afterwards.

    Where the contestants write, when it is not the host's root: there (mounted with
    ``discard`` on this host) every file created right after ``rm -rf`` of the previous
    run's tree costs ~250 us of system time, twice and more what it costs on a fresh
    file system, for ember and the anchor alike (docs/performance.md), and ember itself
    builds its snapshots on fresh loop-mounted ext4 disks in its pool.
    """
    image, mnt = parent / "scratch.ext4", parent / "scratch"
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)


def umoci(kind: str, layout: Path, bundle: Path) -> Path:
    """The anchor's unpack of ``layout``'s ``latest`` into ``bundle``; the rootfs.

    ``kind`` "unpack": ``umoci unpack``, the anchor the goals name, which
    also writes an mtree manifest of the tree, a SHA-256 of every file (work ember does
    not do); "raw": ``umoci raw unpack``, the same tree without the manifest.
    """
    if kind == "raw":
        rootfs = bundle / "rootfs"
        bundle.mkdir()
        run_command(["umoci", "raw", "unpack", "--image", f"{layout}:latest", str(rootfs)])
        return rootfs
    run_command(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)])
    return bundle / "rootfs"


@contextlib.contextmanager
def mounted_ro(disk: Path) -> Iterator[Path]:
    """The ext4 image ``disk`` mounted read-only (``mount -o ro,loop``), for a look."""
    with tempfile.TemporaryDirectory(prefix="ember-bench-check-") as mnt:
        proc = subprocess.run(
            ["mount", "-o", "ro,loop", str(disk), mnt], capture_output=True, text=True
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(f"ABORTED: cannot mount {disk} read-only to check it: {proc.stderr.strip()}")
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)


def require_same_tree(what: str, expected: Path, got: Path) -> None:
    """End the bench, before any ratio is printed or recorded, unless tree ``got`` (ember's
    result) holds what ``expected`` (umoci's rootfs of the same image) does: paths,
    types, modes, owners, sizes and contents, link targets, hard links and xattrs
    (``tests/support/treecmp.py``; ``lost+found`` ignored).  A faster tool that leaves
    something out would otherwise pass for a better one."""
    diffs = compare_trees(expected, got, ignore=("lost+found",))
    if diffs:
        shown = "\n  ".join(diffs[:50])
        more = f"\n  ... and {len(diffs) - 50} more" if len(diffs) > 50 else ""
        sys.exit(
            f"ABORTED: {what}: ember's result is not umoci's ({len(diffs)} difference(s), "
            f"umoci's {expected} vs ember's {got}); no ratio printed or recorded:\n  {shown}{more}"
        )


def agent_env(home: Path, pythonpath: Path | None = None) -> dict[str, str]:
    """The environment of a command meant for the agent serving ``home``: this one's,
    less ``EMBER_AGENT`` (``EMBER_AGENT=0`` in the caller's environment would have the
    client run the command itself, timed as if served)."""
    env = {**os.environ, "EMBER_HOME": str(home)}
    env.pop("EMBER_AGENT", None)
    if pythonpath is not None:  # the client of that commit: its agent serves only it
        env["PYTHONPATH"] = str(pythonpath)
    return env


class HostAgent:
    """``ember agent`` for one state directory, as a host that runs machines keeps it.

    Benches time the CLI through it with a fresh store per run: ``start(home)``
    (untimed, after the previous run's store was removed) launches an agent for
    that home, waits for its socket and then ``settle`` seconds more, as a
    command on a host meets an agent that has sat idle a while (its runner
    pre-faulted, docs/agent.md); ``stop()`` ends it.

    The agent's log (its stderr) goes to a file of its own for each start:
    ``confirm_served(pid, words)`` reads there whether it ran that client's
    command, as a client that the agent declines, or that cannot reach it, runs
    the command itself without a word (src/ember/agent/client.py).
    """

    def __init__(self, ember: str, *options: str, pythonpath: Path | None = None) -> None:
        self.ember = ember
        self.options = options
        self.pythonpath = pythonpath  # another commit's src/ (source_tree): its agent
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log_seen = 0  # bytes of the log already matched by confirm_served

    def start(self, home: Path, timeout: float = 30.0, settle: float = 0.5) -> None:
        self.stop()
        env = {**os.environ, "EMBER_HOME": str(home)}
        env.pop("EMBER_AGENT", None)
        if self.pythonpath is not None:
            env["PYTHONPATH"] = str(self.pythonpath)
        self._drop_log()
        fd, name = tempfile.mkstemp(prefix="ember-bench-agent-", suffix=".log")
        self.log_path, self._log_seen = Path(name), 0
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(
                [self.ember, "agent", *self.options], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )  # fmt: skip
        sock = home / "run" / "agent.sock"
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ember agent did not start for {home}: {self._log_tail()}")
            time.sleep(0.01)
        time.sleep(settle)

    def confirm_served(self, pid: int, words: str, timeout: float = 30.0) -> None:
        """End the bench unless this agent's log says that it ran ``ember WORDS`` for
        the client of process id ``pid`` to exit 0, after what earlier calls matched.
        (The agent writes that line just after it told the client the exit code: it
        may come a moment after the client has exited.)"""
        served = f" ember agent: pid {pid}: ember {words} -> exit 0 (".encode()
        declined = f" ember agent: declined pid {pid}:".encode()
        deadline = time.monotonic() + timeout
        while True:
            data = self.log_path.read_bytes() if self.log_path is not None else b""
            offset = self._log_seen
            for line in data[self._log_seen :].splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # being written
                offset += len(line)
                if declined in line:
                    sys.exit(f"ABORTED: the agent declined the timed command: {line.decode().strip()}")
                if served in line:
                    self._log_seen = offset
                    return
            if time.monotonic() > deadline:
                sys.exit(
                    f"ABORTED: `ember {words}` (pid {pid}) was timed as served by the agent, "
                    f"but its log has no such command (it ran in the client?): {self._log_tail()}"
                )
            time.sleep(0.01)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return f"{self.log_path}:\n" + self.log_path.read_text(errors="replace")[-2000:]

    def _drop_log(self) -> None:
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.process = None

    def close(self) -> None:
        """``stop()``, and the last log removed."""
        self.stop()
        self._drop_log()
