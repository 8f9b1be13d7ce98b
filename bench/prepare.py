"""Snapshot chains and machine root disks.

1. Cold prepare: ``ember image prepare REF`` (pull into an empty content store,
   build one ext4 snapshot per layer and check it) against ``skopeo copy`` +
   ``umoci unpack`` + ``mkfs.ext4 -d`` of the same image into an ext4 image of
   the same size, for the multi-layer test image and the debootstrap minbase
   image pushed to a Debian docker-registry on loopback; alternating, medians.
   ember is timed as the CLI, as the CLI served by ``ember agent`` (started
   for the fresh home before each timed run, untimed) and in-process; with
   ``--base REV`` also by that commit's agent (its ``src/`` on ``PYTHONPATH``),
   alternating: before and after a change in one run.  Goal: ember <= 0.5x.
2. Machine root disks: for images of 10 MB, 100 MB and 1 GB, the time of
   ``clone_root_disk`` (reflink clone + resize2fs to 8 GiB) for ten machines,
   and the pool space those ten disks take.  Goal: flat, under 50 ms, and ten
   machines costing little more disk than one.

    .venv/bin/python bench/prepare.py [--runs N] [--no-record] [--skip-prepare] [--skip-clone]
                                      [--images multilayer,debian] [--latency MS] [--rate MBPS]
                                      [--base REV]

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
import subprocess
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
    alternate,
    at_base,
    base_lines,
    fmt_seconds,
    machine_note,
    print_ratio,
    record,
    registry,
    source_tree,
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


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, env=env, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


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


# -- 1. cold prepare against skopeo + umoci + mkfs.ext4 -d --------------------------------


def bench_prepare(
    name: str, ref: str, work: Path, runs: int, base: tuple[str, Path] | None = None
) -> list[str]:
    """``base``: (commit, its src/) whose agent is timed too, alternating (before/after)."""
    home_root = work / f"{name}-home"
    layout, bundle, disk = work / f"{name}-layout", work / f"{name}-bundle", work / f"{name}.ext4"
    lib_homes: list[Home] = []
    agents = {VIA_AGENT: HostAgent(EMBER)}
    via_base = at_base(VIA_AGENT, base[0]) if base else ""
    if base is not None:
        agents[via_base] = HostAgent(EMBER, pythonpath=base[1])

    def setup(contestant: str) -> None:
        for agent in agents.values():
            agent.stop()
        for path in (layout, bundle):
            shutil.rmtree(path, ignore_errors=True)
        disk.unlink(missing_ok=True)
        if contestant == CLI or contestant in agents:
            new_home(home_root, DISK_SIZE, "8G")
        if contestant == "library":
            for old in lib_homes:
                close_pool(old)
                shutil.rmtree(old.root, ignore_errors=True)
            # a fresh path each time: the database layer caches engines per URL
            lib_homes[:] = [new_home(work / f"{name}-lib-{time.monotonic_ns()}", DISK_SIZE, "8G")]
        os.sync()  # do not bill one contestant for the other's dirty pages
        if contestant in agents:
            agents[contestant].start(home_root)

    def ember() -> None:
        env = {**os.environ, "EMBER_HOME": str(home_root), "EMBER_AGENT": "0"}
        run([EMBER, "image", "prepare", ref, "--json"], env)

    def ember_via_agent(pythonpath: Path | None = None) -> None:
        env = {**os.environ, "EMBER_HOME": str(home_root)}
        if pythonpath is not None:  # the client of that commit: its agent serves only it
            env["PYTHONPATH"] = str(pythonpath)
        run([EMBER, "image", "prepare", ref, "--json"], env)

    def library() -> None:
        """The same work without the CLI's interpreter start and imports."""
        home = lib_homes[0]
        # as the CLI does: each layer's disk built as its blob arrives
        with ImageService(home).pulling(ref, progress=False) as pulled:
            prepare_image(
                home, pulled.image, layer_path=pulled.layer_path, open_layer=pulled.open_layer
            )

    def anchor() -> None:
        run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:latest"])
        run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)])
        run(["mkfs.ext4", "-q", "-F", "-d", str(bundle / "rootfs"), str(disk), DISK_SIZE])

    contestants = {
        CLI: ember,
        VIA_AGENT: ember_via_agent,
        "library": library,
        "skopeo+umoci+mkfs": anchor,
    }
    if base is not None:
        contestants[via_base] = lambda: ember_via_agent(base[1])
    try:
        timings = alternate(contestants, runs, setup=setup)
    finally:
        for agent in agents.values():
            agent.stop()
        close_pool(Home(home_root))
        for old in lib_homes:
            close_pool(old)
    anchor_t = timings["skopeo+umoci+mkfs"]
    before = base_lines(
        f"cold prepare, {name} image, via the agent", timings, VIA_AGENT,
        base[0] if base else None,
    )  # fmt: skip
    return before + [
        print_ratio(f"cold prepare, {name} image, CLI", timings[CLI], anchor_t),
        print_ratio(f"cold prepare, {name} image, CLI via the agent", timings[VIA_AGENT], anchor_t),
        print_ratio(f"cold prepare, {name} image, library", timings["library"], anchor_t),
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
                for name, layout in images.items():
                    ref = push_layout(layout, reg, f"bench/{name}").replace(reg.host, host, 1)
                    found = bench_prepare(name, ref, work, args.runs, base)
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
