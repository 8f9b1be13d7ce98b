"""Pull + unpack with a fresh store: ember vs ``skopeo copy`` + ``umoci unpack``.

For the multi-layer test image and the debootstrap minbase image, both pushed
to a Debian docker-registry on loopback: ``ember image unpack REF DIR`` (pull
into an empty ``$EMBER_HOME``, then apply the layers) against ``skopeo copy
docker://REF oci:DIR`` followed by ``umoci unpack``, alternating, median of N
runs each.  Prints the ratio ember/anchor (goal <= 0.5) and appends it to
docs/performance.md.  ember is timed as the CLI (a fresh Python process per
run), as the CLI served by ``ember agent`` (docs/agent.md: the agent is
started for the fresh store before each timed run, untimed and left idle for
0.5 s, as a host keeps it running), the same served by ``ember agent
--no-prefault`` (what the pre-faulted runner saves, same run), with ``--base
REV`` by that commit's agent too (before and after a change, same run), and
in-process ("library": the library calls ``ember image unpack`` makes, pull
and apply, in this already-started Python, without the interpreter start and
the CLI's imports); the pull alone is also compared with ``skopeo copy``.

Checked, untimed, after every run: each ember contestant's tree equals what
``umoci unpack`` gives for the same image (``tests/support/treecmp.py``: paths,
types, modes, owners, sizes, contents, link targets, hard links, xattrs), and
each command timed "via the agent" was run by the agent (its log names the
client's pid; a client the agent declines runs the command itself, silently).
Either failing ends the bench before any ratio is printed or recorded.

``--anchor unpack`` (the default) is the anchor the goals name: ``umoci
unpack``, which also writes an mtree manifest of the tree, hashing every file
with SHA-256 (work ember does not do); ``--anchor raw`` times ``umoci raw
unpack`` instead, the same tree without the manifest.

``--scratch ext4`` (the default) puts every contestant's work (stores, layouts,
unpacked trees) on a fresh loop-mounted ext4 made for the run (default mkfs
options, mounted without ``discard``); ``--scratch tmp`` uses the temporary
directory's file system.  The fresh ext4 is the fair default: where the host's
own root is mounted with ``discard`` (as this one is), deleting the previous
run's tree makes every file creation of the next run ~2x as slow for both tools
alike, so the figure measures that mount option more than the tools.

``--latency MS`` puts a proxy in front of the registry that holds every blob
GET for MS milliseconds (a distant registry; ember and the anchor both go
through it): there ember applies its first layers while the last ones still
download.  ``--rate MBPS`` has the proxy send each blob body at that many
megabytes a second (a slow link): there ``ember image unpack`` applies a
layer while its bytes arrive.  ``--images`` picks the images.

    .venv/bin/python bench/pull_unpack.py [--runs N] [--no-record] [--scratch ext4|tmp] [--base REV]
                                          [--anchor unpack|raw] [--latency MS] [--rate MBPS]
                                          [--images multilayer,debian]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.registry.client.proxy import Behaviour, misbehaving_proxy  # noqa: E402
from tests.support.images import build_debian_layout, build_multilayer_layout, push_layout  # noqa: E402

from bench._common import (  # noqa: E402
    HostAgent,
    agent_env,
    alternate,
    at_base,
    base_lines,
    machine_note,
    print_ratio,
    record,
    registry,
    require_same_tree,
    run_command,
    scratch_ext4,
    source_tree,
    umoci,
)
from ember.home import Home  # noqa: E402
from ember.images import ImageService  # noqa: E402
from ember.unpack import apply_layers  # noqa: E402

SECTION = "Pull + unpack (bench/pull_unpack.py)"
EMBER = str(Path(sys.executable).with_name("ember"))
CLI, VIA_AGENT = "ember image unpack", "ember image unpack via the agent"
#: the agent started with --no-prefault: what its pre-faulted runner saves (docs/agent.md)
VIA_SHARING_AGENT = "ember image unpack via an agent without pre-faulting"


#: the anchors (--anchor): the goals' ``umoci unpack`` (tree and mtree manifest), or the
#: same tree alone
ANCHORS = {"unpack": "skopeo+umoci", "raw": "skopeo+umoci raw"}


def bench_image(
    name: str,
    ref: str,
    work: Path,
    runs: int,
    base: tuple[str, Path] | None = None,
    anchor_kind: str = "unpack",
) -> list[str]:
    """``base``: (commit, its src/) whose agent is timed too, alternating (before/after)."""
    home, ember_root = work / f"{name}-home", work / f"{name}-ember-root"
    layout, bundle = work / f"{name}-layout", work / f"{name}-bundle"
    anchor_name = ANCHORS[anchor_kind]

    agents = {VIA_AGENT: HostAgent(EMBER), VIA_SHARING_AGENT: HostAgent(EMBER, "--no-prefault")}
    via_base = at_base(VIA_AGENT, base[0]) if base else ""
    if base is not None:
        agents[via_base] = HostAgent(EMBER, pythonpath=base[1])
    last_pid: dict[str, int] = {}  # contestant -> the pid of its last client

    def clean(contestant: str) -> None:
        for agent in agents.values():
            agent.stop()
        for path in (home, ember_root, layout, bundle):
            shutil.rmtree(path, ignore_errors=True)
        os.sync()  # do not bill one contestant for the other's dirty pages
        if contestant in agents:
            agents[contestant].start(home)

    def ember_cli() -> None:
        env = {**os.environ, "EMBER_HOME": str(home), "EMBER_AGENT": "0"}
        run_command([EMBER, "image", "unpack", ref, str(ember_root)], env)

    def ember_via_agent(contestant: str, pythonpath: Path | None = None) -> None:
        pid, _ = run_command(
            [EMBER, "image", "unpack", ref, str(ember_root)], agent_env(home, pythonpath)
        )  # fmt: skip
        last_pid[contestant] = pid

    def ember_library() -> None:
        # the library calls `ember image unpack` makes, in this process: no interpreter
        # start, no CLI imports
        service = ImageService(Home(home))
        ember_root.mkdir()
        with service.pulling(ref, progress=False) as pulled:  # layers applied as they arrive
            apply_layers(
                ember_root,
                [(service.layer_path(x), x.media_type, x.diff_id) for x in pulled.image.layers],
                opener=pulled.open_layer,
            )

    def ember_pull() -> None:
        ImageService(Home(home)).pull(ref, progress=False)

    def skopeo(into: Path = layout) -> None:
        run_command(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                f"docker://{ref}",
                f"oci:{into}:latest",
            ]
        )

    def anchor() -> None:
        skopeo()
        umoci(anchor_kind, layout, bundle)

    # umoci's tree of the image, made once untimed and kept: what every ember tree must be
    reference = work / f"{name}-reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir()
    skopeo(reference / "layout")
    expected = umoci("unpack", reference / "layout", reference / "bundle")
    checked = [0]

    def check(contestant: str) -> None:
        """Untimed, after each run: served by the agent if so timed; ember's tree complete."""
        if contestant in agents:
            agents[contestant].confirm_served(last_pid.pop(contestant), "image unpack")
        if contestant != anchor_name:
            require_same_tree(f"{name}: {contestant}", expected, ember_root)
            checked[0] += 1

    contestants = {
        CLI: ember_cli,
        VIA_AGENT: lambda: ember_via_agent(VIA_AGENT),
        VIA_SHARING_AGENT: lambda: ember_via_agent(VIA_SHARING_AGENT),
        "library": ember_library,
        anchor_name: anchor,
    }
    if base is not None:
        contestants[via_base] = lambda: ember_via_agent(via_base, base[1])
    try:
        full = alternate(contestants, runs, setup=clean, after=check)
    finally:
        for agent in agents.values():
            agent.close()
    print(f"{name}: all {checked[0]} trees ember made equal umoci's; every command timed "
          "via an agent was run by it")  # fmt: skip
    pulls = alternate(
        {"ember pull (library)": ember_pull, "skopeo copy": skopeo}, runs, setup=clean
    )
    clean("")
    shutil.rmtree(reference, ignore_errors=True)
    before = base_lines(f"{name}: pull+unpack via the agent", full, VIA_AGENT, base[0] if base else None)
    return before + [
        print_ratio(f"{name}: pull+unpack, CLI", full[CLI], full[anchor_name]),
        print_ratio(
            f"{name}: pull+unpack, CLI via the agent", full[VIA_AGENT], full[anchor_name]
        ),
        print_ratio(f"{name}: pull+unpack, library (in-process)", full["library"], full[anchor_name]),
        print_ratio(
            f"{name}: pull+unpack via the agent, its runner pre-faulted or not",
            full[VIA_AGENT], full[VIA_SHARING_AGENT],
        ),  # fmt: skip
        print_ratio(f"{name}: pull only", pulls["ember pull (library)"], pulls["skopeo copy"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to docs/performance.md"
    )
    parser.add_argument(
        "--scratch", choices=["tmp", "ext4"], default="ext4",
        help="where the contestants write: a fresh loop-mounted ext4 (default), or the temp "
        "dir's file system (here the root, mounted with discard)",
    )  # fmt: skip
    parser.add_argument(
        "--anchor", choices=sorted(ANCHORS), default="unpack",
        help="umoci unpack (default: the goals' anchor, with its SHA-256 mtree manifest) or "
        "umoci raw unpack (the same tree, no manifest)",
    )  # fmt: skip
    parser.add_argument(
        "--latency", type=float, default=0.0,
        help="milliseconds a proxy holds each blob GET (a distant registry)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=0.0,
        help="megabytes a second at which a proxy sends each blob body (a slow link)",
    )  # fmt: skip
    parser.add_argument("--images", default="multilayer,debian")
    parser.add_argument(
        "--base", metavar="REV",
        help="also time the agent of this commit (its src/ on PYTHONPATH), alternating",
    )  # fmt: skip
    args = parser.parse_args()
    builders = {"multilayer": build_multilayer_layout, "debian": build_debian_layout}
    images = {name: builders[name]() for name in args.images.split(",")}
    where = (
        "work dir on a fresh loop-mounted ext4" if args.scratch == "ext4" else "work dir in /tmp"
    )
    if args.anchor == "raw":
        where += "; anchor umoci raw unpack (no mtree manifest)"
    where += "; each ember tree checked equal to umoci's, each via-agent run found in the agent's log"
    if args.latency:
        where += f"; through a proxy holding each blob GET {args.latency:g} ms"
    if args.rate:
        where += f"; through a proxy sending each blob body at {args.rate:g} MB/s"
    with contextlib.ExitStack() as stack:
        reg = stack.enter_context(registry())
        host = reg.host
        if args.latency or args.rate:
            behaviour = Behaviour(
                blob_delay=args.latency / 1000, blob_rate=args.rate * 1e6 if args.rate else None
            )
            proxy = stack.enter_context(misbehaving_proxy(reg.host, behaviour))
            host = proxy.host
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-bench-pull-")))
        work = stack.enter_context(scratch_ext4(tmp)) if args.scratch == "ext4" else tmp
        base = (args.base, source_tree(args.base, tmp / "base")) if args.base else None
        lines = []
        for name, layout in images.items():
            ref = push_layout(layout, reg, f"bench/{name}").replace(reg.host, host, 1)
            lines.extend(bench_image(name, ref, work, args.runs, base, args.anchor))
    if not args.no_record:
        for line in lines:
            record(SECTION, f"{line}; {where}; {machine_note()}")


if __name__ == "__main__":
    main()
