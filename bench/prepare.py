"""Snapshot chains and machine root disks.

1. Cold prepare: ``ember image prepare REF`` (pull into an empty content store,
   build one ext4 snapshot per layer and check it) against ``skopeo copy`` +
   ``umoci unpack`` + ``mkfs.ext4 -d`` of the same image into an ext4 image of
   the same size, for the multi-layer test image and the debootstrap minbase
   image pushed to a Debian docker-registry on loopback; alternating, medians.
   ember is timed as the CLI, as the CLI served by ``ember agent`` (started
   for the fresh home before each timed run, untimed) and in-process (the
   library calls the CLI command makes, pull and ``prepare_image``, in this
   already-started Python: what ``ember run`` does for an image it has not
   prepared yet, before it clones the machine's root disk); with ``--base
   REV`` also by that commit's agent (its ``src/`` on ``PYTHONPATH``),
   alternating: before and after a change in one run.  Goal: ember <= 0.5x.

   Untimed for ember: its snapshot pool (an XFS file system in a loop-mounted
   sparse file, made once per host) is set up in each fresh home before the
   run.  Timed by default (``--empty-base timed``): the empty ext4 of the base
   size that ember formats once per host and size and keeps in its pool
   (``bases/``, cloned for every new base layer): it is removed after the pool
   is set up, so each timed prepare formats it as a fresh host's first one
   does; ``--empty-base cached`` leaves it there, untimed.  Its making is also
   timed on its own in every setup and printed (and recorded) either way.

   Checked, untimed, after every run: each ember contestant's committed disk,
   mounted read-only (``mount -o ro,loop``), holds what ``umoci unpack`` gives
   for the same image (``tests/support/treecmp.py``, ``lost+found`` ignored),
   and each command timed "via the agent" was run by the agent (its log names
   the client's pid; a client the agent declines runs the command itself,
   silently).  Either failing ends the bench before any ratio is printed or
   recorded.

   ``--anchor unpack`` (default; the anchor the goals name) uses ``umoci
   unpack``, which also writes an mtree manifest of the tree, hashing every
   file with SHA-256 (work ember does not do); ``--anchor raw`` uses ``umoci raw
   unpack``, the same tree without the manifest.

   ``--scratch ext4`` (the default) puts the work of the cold prepare (homes and
   their pools, layouts, umoci's tree, the anchor's ext4 image) on a fresh
   loop-mounted ext4 made for the run, not mounted with ``discard``; ``--scratch
   tmp`` on the temporary directory's file system.  The fresh ext4 is the fair
   default: ember writes into fresh loop-mounted ext4 disks in its pool, while
   the anchor's tree went to this host's root, mounted with ``discard``, where
   each file created right after the previous run's tree was deleted costs ~2x
   as much (docs/performance.md).
2. Machine root disks: for images of 10 MB, 100 MB and 1 GB, the time of
   ``clone_root_disk`` (reflink clone + resize2fs to 8 GiB) for ten machines,
   and the pool space those ten disks take.  Goal: flat, under 50 ms, and ten
   machines costing little more disk than one.

    .venv/bin/python bench/prepare.py [--runs N] [--no-record] [--skip-prepare] [--skip-clone]
                                      [--images multilayer,debian] [--latency MS] [--rate MBPS]
                                      [--base REV] [--anchor unpack|raw] [--scratch ext4|tmp]
                                      [--empty-base timed|cached]

``--latency MS`` holds every blob GET that long, ``--rate MBPS`` sends each blob
body at that many megabytes a second (a proxy in front of the registry, for every
contestant): a distant registry, a slow link.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
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
    fmt_seconds,
    machine_note,
    mounted_ro,
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
from ember.images.service import build_image  # noqa: E402
from ember.oci import mediatypes as mt  # noqa: E402
from ember.oci.config import parse_config  # noqa: E402
from ember.oci.digest import Digest  # noqa: E402
from ember.oci.manifest import ImageManifest, parse_manifest  # noqa: E402
from ember.snapshots import Snapshotter  # noqa: E402
from ember.snapshots.chain import clone_root_disk, prepare_image  # noqa: E402
from ember.snapshots.pool import close_pool  # noqa: E402
from ember.store.content import ContentStore  # noqa: E402

SECTION = "Snapshots: prepare and root disks (bench/prepare.py)"
EMBER = str(Path(sys.executable).with_name("ember"))
DISK_SIZE = "2G"  # ember's base ext4 and the anchor's mkfs.ext4 image
GiB = 1 << 30
CLI, VIA_AGENT = "ember image prepare", "ember image prepare via the agent"


#: the anchors (--anchor): the goals' ``umoci unpack`` (tree and mtree manifest), or the
#: same tree alone
ANCHORS = {"unpack": "skopeo+umoci+mkfs", "raw": "skopeo+umoci raw+mkfs"}


def new_home(root: Path, base_size: str, pool_size: str) -> Home:
    if root.exists():
        close_pool(Home(root))
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps({"snapshots": {"base_size": base_size, "pool_size": pool_size}})
    )
    home = Home(root)
    Snapshotter(home)  # the pool exists on a working host: not part of a prepare
    return home


def remake_empty_base(home: Home, keep: bool) -> float:
    """Remove the cached empty base disk(s) that setting up ``home``'s pool made, make the
    one of the configured size again as a prepare would (``Snapshotter._empty_base``:
    mkfs.ext4 of a sparse file in the pool, fsync, rename) and time that; then remove it
    again unless ``keep``, so that the next prepare makes it, timed."""
    snap = Snapshotter(home)
    for cached in snap.bases.iterdir():
        cached.unlink()
    os.sync()
    start = time.perf_counter()
    made = snap._empty_base(snap.config.base_size)
    seconds = time.perf_counter() - start
    if not keep:
        made.unlink()
    return seconds


# -- 1. cold prepare against skopeo + umoci + mkfs.ext4 -d --------------------------------


def bench_prepare(
    name: str,
    ref: str,
    work: Path,
    runs: int,
    base: tuple[str, Path] | None = None,
    anchor_kind: str = "unpack",
    base_timed: bool = True,
) -> list[str]:
    """``base``: (commit, its src/) whose agent is timed too, alternating (before/after)."""
    home_root = work / f"{name}-home"
    layout, bundle, disk = work / f"{name}-layout", work / f"{name}-bundle", work / f"{name}.ext4"
    anchor_name = ANCHORS[anchor_kind]
    lib_homes: list[Home] = []
    agents = {VIA_AGENT: HostAgent(EMBER)}
    via_base = at_base(VIA_AGENT, base[0]) if base else ""
    if base is not None:
        agents[via_base] = HostAgent(EMBER, pythonpath=base[1])
    base_made: list[float] = []  # seconds to make the empty base, each setup
    last: dict[str, tuple[int, Path]] = {}  # contestant -> (client pid or 0, its disk)

    def setup(contestant: str) -> None:
        for agent in agents.values():
            agent.stop()
        for path in (layout, bundle):
            shutil.rmtree(path, ignore_errors=True)
        disk.unlink(missing_ok=True)
        if contestant == CLI or contestant in agents:
            base_made.append(remake_empty_base(new_home(home_root, DISK_SIZE, "8G"), not base_timed))
        if contestant == "library":
            for old in lib_homes:
                close_pool(old)
                shutil.rmtree(old.root, ignore_errors=True)
            # a fresh path each time: the database layer caches engines per URL
            lib_homes[:] = [new_home(work / f"{name}-lib-{time.monotonic_ns()}", DISK_SIZE, "8G")]
            base_made.append(remake_empty_base(lib_homes[0], not base_timed))
        os.sync()  # do not bill one contestant for the other's dirty pages
        if contestant in agents:
            agents[contestant].start(home_root)

    def cli(contestant: str, env: dict[str, str]) -> None:
        pid, out = run_command([EMBER, "image", "prepare", ref, "--json"], env)
        last[contestant] = (pid, Path(json.loads(out)["path"]))

    def ember() -> None:
        cli(CLI, {**os.environ, "EMBER_HOME": str(home_root), "EMBER_AGENT": "0"})

    def library() -> None:
        """The same work without the CLI's interpreter start and imports."""
        home = lib_homes[0]
        # as the CLI does: each layer's disk built as its blob arrives
        with ImageService(home).pulling(ref, progress=False) as pulled:
            prepared = prepare_image(
                home, pulled.image, layer_path=pulled.layer_path, open_layer=pulled.open_layer
            )
        last["library"] = (0, prepared.path)

    def anchor() -> None:
        run_command(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:latest"])
        rootfs = umoci(anchor_kind, layout, bundle)
        run_command(["mkfs.ext4", "-q", "-F", "-d", str(rootfs), str(disk), DISK_SIZE])

    # umoci's tree of the image, made once untimed and kept: what every ember disk must hold
    reference = work / f"{name}-reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir()
    run_command(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                 f"oci:{reference / 'layout'}:latest"])  # fmt: skip
    expected = umoci("unpack", reference / "layout", reference / "bundle")
    checked = [0]

    def check(contestant: str) -> None:
        """Untimed, after each run: served by the agent if so timed; ember's disk complete."""
        if contestant == anchor_name:
            return
        pid, got = last.pop(contestant)
        if contestant in agents:
            agents[contestant].confirm_served(pid, "image prepare")
        with mounted_ro(got) as root:
            require_same_tree(f"cold prepare, {name}: {contestant}", expected, root)
        checked[0] += 1

    contestants = {
        CLI: ember,
        VIA_AGENT: lambda: cli(VIA_AGENT, agent_env(home_root)),
        "library": library,
        anchor_name: anchor,
    }
    if base is not None:
        contestants[via_base] = lambda: cli(via_base, agent_env(home_root, base[1]))
    try:
        timings = alternate(contestants, runs, setup=setup, after=check)
    finally:
        for agent in agents.values():
            agent.close()
        close_pool(Home(home_root))
        for old in lib_homes:
            close_pool(old)
    shutil.rmtree(reference, ignore_errors=True)
    print(f"cold prepare, {name}: all {checked[0]} disks ember committed hold umoci's tree; "
          "every command timed via an agent was run by it")  # fmt: skip
    anchor_t = timings[anchor_name]
    before = base_lines(
        f"cold prepare, {name} image, via the agent", timings, VIA_AGENT,
        base[0] if base else None,
    )  # fmt: skip
    made = statistics.median(base_made)
    base_line = (
        f"cold prepare, {name} image: ember's empty {DISK_SIZE} base ext4 (made once per host "
        f"and size, kept in its pool) took {fmt_seconds(made)} to make (median of "
        f"{len(base_made)}, {fmt_seconds(min(base_made))}-{fmt_seconds(max(base_made))}, timed "
        "alone in each setup); "
        + ("each timed ember prepare made it again (--empty-base timed)" if base_timed
           else "NOT in ember's times above: cached before each run (--empty-base cached)")
    )  # fmt: skip
    print(base_line)
    return before + [
        print_ratio(f"cold prepare, {name} image, CLI", timings[CLI], anchor_t),
        print_ratio(f"cold prepare, {name} image, CLI via the agent", timings[VIA_AGENT], anchor_t),
        print_ratio(f"cold prepare, {name} image, library (in-process)", timings["library"], anchor_t),
        base_line,
    ]


# -- 2. machine root disks -----------------------------------------------------------------


def synthetic_image(home: Home, size: int, work: Path) -> object:
    """One uncompressed layer holding ``size`` bytes of random data in 16 MiB files."""
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    chunk, left, i = 16 << 20, size, 0
    while left > 0:
        n = min(chunk, left)
        (tree / f"f{i:04d}").write_bytes(os.urandom(n))
        left, i = left - n, i + 1
    tar_path = work / "layer.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname="data")
    shutil.rmtree(tree)
    h = hashlib.sha256()
    with open(tar_path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    digest = Digest("sha256", h.hexdigest())
    tar_size = tar_path.stat().st_size
    store = ContentStore(home.content)
    with store.writer(digest, tar_size) as w, open(tar_path, "rb") as f:
        w.reset()
        while block := f.read(1 << 20):
            w.write(block)
        w.commit()
    tar_path.unlink()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [str(digest)]}}
    ).encode()
    config_digest = store.put_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": str(config_digest), "size": len(config)},
            "layers": [{"mediaType": mt.OCI_LAYER_TAR, "digest": str(digest), "size": tar_size}],
        }
    ).encode()
    m = parse_manifest(manifest, mt.OCI_MANIFEST)
    assert isinstance(m, ImageManifest)
    return build_image("bench/synthetic", store.put_bytes(manifest), m, config_digest, parse_config(config))


def pool_used(snap: Snapshotter) -> int:
    os.sync()
    st = os.statvfs(snap.pool.root)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def bench_clones(label: str, size: int, work: Path, machines: int = 10) -> str:
    home = new_home(work / f"clone-{label}", "4G", "16G")
    try:
        image = synthetic_image(home, size, work)
        prepared = prepare_image(home, image)  # type: ignore[arg-type]
        snap = Snapshotter(home)
        image_used = snap.usage(prepared.snapshot).size
        before = pool_used(snap)
        times = []
        for i in range(machines):
            t0 = time.perf_counter()
            clone_root_disk(home, image, f"m{i}", 8 * GiB)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
        added = pool_used(snap) - before
        line = (
            f"root disks of a {label} image (snapshot uses {image_used / 2**20:.0f} MiB): "
            f"clone+grow to 8 GiB median {fmt_seconds(statistics.median(times))}, "
            f"max {fmt_seconds(max(times))} over {machines} machines; the {machines} disks "
            f"added {added / 2**20:.1f} MiB to the pool ({added / machines / 2**20:.2f} MiB each)"
        )
        print(line)
        return line
    finally:
        close_pool(home)
        shutil.rmtree(home.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/performance.md")
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument("--skip-clone", action="store_true")
    parser.add_argument(
        "--latency", type=float, default=0.0,
        help="milliseconds a proxy holds each blob GET (a distant registry), for every contestant",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=0.0,
        help="megabytes a second at which a proxy sends each blob body (a slow link)",
    )  # fmt: skip
    parser.add_argument(
        "--base", metavar="REV",
        help="also time the agent of this commit (its src/ on PYTHONPATH), alternating",
    )  # fmt: skip
    parser.add_argument(
        "--images",
        default="multilayer,debian",
        help="comma-separated images for the cold prepare (default: multilayer,debian)",
    )
    parser.add_argument(
        "--anchor", choices=sorted(ANCHORS), default="unpack",
        help="umoci unpack (default: the goals' anchor, with its SHA-256 mtree manifest) or "
        "umoci raw unpack (the same tree, no manifest)",
    )  # fmt: skip
    parser.add_argument(
        "--scratch", choices=["tmp", "ext4"], default="ext4",
        help="where the cold prepare writes: a fresh loop-mounted ext4 (default), or the temp "
        "dir's file system (here the root, mounted with discard)",
    )  # fmt: skip
    parser.add_argument(
        "--empty-base", choices=["timed", "cached"], default="timed",
        help="ember's cached empty base ext4 made in each timed prepare (default, as on a "
        "fresh host), or made before it, untimed",
    )  # fmt: skip
    args = parser.parse_args()
    builders = {"multilayer": build_multilayer_layout, "debian": build_debian_layout}
    chosen = [n.strip() for n in args.images.split(",") if n.strip()]
    if not chosen or any(n not in builders for n in chosen):
        parser.error(f"--images takes a comma-separated subset of {', '.join(builders)}")
    lines = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-prepare-") as tmp:
        work = Path(tmp)
        base = (args.base, source_tree(args.base, work / "base")) if args.base else None
        if not args.skip_prepare:
            images = {name: builders[name]() for name in chosen}
            with contextlib.ExitStack() as stack:
                reg = stack.enter_context(registry())
                host = reg.host
                if args.latency or args.rate:
                    behaviour = Behaviour(
                        blob_delay=args.latency / 1000,
                        blob_rate=args.rate * 1e6 if args.rate else None,
                    )
                    host = stack.enter_context(misbehaving_proxy(reg.host, behaviour)).host
                scratch = (
                    stack.enter_context(scratch_ext4(work)) if args.scratch == "ext4" else work
                )
                where = (
                    "work dir on a fresh loop-mounted ext4" if args.scratch == "ext4"
                    else "work dir in /tmp"
                )  # fmt: skip
                if args.anchor == "raw":
                    where += "; anchor umoci raw unpack (no mtree manifest)"
                where += (
                    "; ember's empty base ext4 made in each timed prepare" if args.empty_base == "timed"
                    else "; ember's empty base ext4 cached, untimed"
                )  # fmt: skip
                where += "; each ember disk checked equal to umoci's tree, each via-agent run found in the agent's log"
                for name, layout in images.items():
                    ref = push_layout(layout, reg, f"bench/{name}").replace(reg.host, host, 1)
                    found = bench_prepare(
                        name, ref, scratch, args.runs, base, args.anchor, args.empty_base == "timed"
                    )
                    found = [f"{x}; {where}" for x in found]
                    if args.latency:
                        found = [f"{x}; through a proxy holding each blob GET {args.latency:g} ms" for x in found]
                    if args.rate:
                        found = [f"{x}; through a proxy sending each blob body at {args.rate:g} MB/s" for x in found]
                    lines.extend(found)
        if not args.skip_clone:
            for label, size in (("10 MB", 10 << 20), ("100 MB", 100 << 20), ("1 GB", 1 << 30)):
                lines.append(bench_clones(label, size, work))
    if not args.no_record:
        for line in lines:
            record(SECTION, f"{line}; {machine_note()}")


if __name__ == "__main__":
    main()
