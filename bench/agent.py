"""CLI latency with and without ``ember agent`` (docs/agent.md).

The same commands, timed alternately in one run: a fresh ``ember`` process that
runs the command itself (``EMBER_AGENT=0``, the anchor) against the same
``ember`` handing it to an agent serving the same state directory.  Commands:
``ember --version`` (the fixed cost: Python start, hand-over, fork, exit) and
``ember image ls`` (a command that opens the image table).  A bare
``python -c pass`` is timed too, the floor of any Python client.  Each command
timed "via the agent" is checked, untimed, to have been run by the agent (its
log names the client's pid; a client the agent declines runs the command
itself, silently): one that was not ends the bench before any ratio.

    .venv/bin/python bench/agent.py [--runs N] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    HostAgent,
    agent_env,
    alternate,
    machine_note,
    median_of,
    print_ratio,
    record,
    run_command,
)

SECTION = "Host agent: CLI latency (bench/agent.py)"
EMBER = str(Path(sys.executable).with_name("ember"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-agent-") as tmp:
        home = Path(tmp) / "home"
        local = {**os.environ, "EMBER_HOME": str(home), "EMBER_AGENT": "0"}
        served = agent_env(home)
        pids: list[int] = []  # the clients timed via the agent, to be found in its log
        run_command([EMBER, "image", "ls"], local)  # the home and its database exist for both
        agent = HostAgent(EMBER)
        agent.start(home)
        try:
            floor = median_of(lambda: run_command([sys.executable, "-c", "pass"], local), args.runs)
            print(f"python -c pass: {floor}")
            for words in (["--version"], ["image", "ls"]):
                cmd = [EMBER, *words]
                # what the agent's log says of the command: its words before any option
                summary = " ".join(w for w in words if not w.startswith("-"))

                def confirm(name: str, summary: str = summary) -> None:
                    if name == "via the agent":
                        agent.confirm_served(pids.pop(), summary)

                t = alternate(
                    {"via the agent": lambda c=cmd: pids.append(run_command(c, served)[0]),
                     "own process": lambda c=cmd: run_command(c, local)},
                    args.runs, after=confirm,
                )  # fmt: skip
                what = f"ember {' '.join(words)}: via the agent vs its own process"
                lines.append(print_ratio(what, t["via the agent"], t["own process"]))
        finally:
            agent.close()
    if not args.no_record:
        for line in lines:
            record(SECTION, f"{line}; python -c pass {floor.median * 1000:.1f} ms; {machine_note()}")


if __name__ == "__main__":
    main()
