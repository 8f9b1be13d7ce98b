"""CLI start-up: what a fresh ``ember`` process costs before and around its work.

Each command runs in a fresh process (``EMBER_AGENT=0``: no agent), in a fresh
state directory, with stdout a pipe; the median of N runs.  With ``--base REV``
the same commands also run with that commit's ``src/`` (``git archive``,
byte-compiled) first on ``PYTHONPATH``, alternating with this tree: before and
after one change in one run.  ``python -c pass`` is the floor of any Python CLI.

    .venv/bin/python bench/startup.py [--runs 15] [--base REV] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import alternate, fmt_seconds, machine_note, record, source_tree  # noqa: E402

SECTION = "Host agent: CLI latency (bench/agent.py)"
PYTHON = sys.executable
EMBER = str(Path(sys.executable).with_name("ember"))
COMMANDS: dict[str, list[str]] = {
    "python -c pass": [PYTHON, "-c", "pass"],
    "import ember.cli.main": [PYTHON, "-c", "import ember.cli.main"],
    "ember --version": [EMBER, "--version"],
    "ember image ls": [EMBER, "image", "ls"],
    "ember ps": [EMBER, "ps"],
    "ember --help": [EMBER, "--help"],
}


def runner(argv: list[str], home: Path, pythonpath: Path | None) -> Callable[[], None]:
    env = {**os.environ, "EMBER_AGENT": "0", "EMBER_HOME": str(home)}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)

    def run() -> None:
        proc = subprocess.run(argv, env=env, capture_output=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')[-500:]}")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--base", metavar="REV", help="also time this commit's src/, alternating")
    parser.add_argument(
        "--record", action="store_true", help="append one line to docs/performance.md"
    )
    args = parser.parse_args()
    parts = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-startup-") as tmp:
        scratch = Path(tmp)
        base = source_tree(args.base, scratch / "base") if args.base else None
        homes = {name: scratch / f"home-{name}" for name in ("base", "now")}
        for what, argv in COMMANDS.items():
            contestants = {"now": runner(argv, homes["now"], None)}
            if base is not None:
                contestants = {"base": runner(argv, homes["base"], base), **contestants}
            # untimed: every run starts without a state directory
            t = alternate(
                contestants,
                args.runs,
                setup=lambda name: shutil.rmtree(homes[name], ignore_errors=True),
            )
            shown = " -> ".join(fmt_seconds(t[name].median) for name in contestants)
            print(f"{what}: {shown}")
            parts.append(f"{what} {shown}")
    if args.record:
        before = f" ({args.base} -> this tree)" if args.base else ""
        record(
            SECTION,
            f"CLI start-up{before}, fresh process and state directory, stdout a pipe, "
            f"EMBER_AGENT=0 (`bench/startup.py`, medians of {args.runs}"
            f"{' alternating' if args.base else ''} runs): {'; '.join(parts)}; {machine_note()}",
        )


if __name__ == "__main__":
    main()
