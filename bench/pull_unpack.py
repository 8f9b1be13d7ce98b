"""Pull + unpack with a fresh store: ember vs ``skopeo copy`` + ``umoci unpack``.

For the multi-layer test image and the debootstrap minbase image, both pushed
to a Debian docker-registry on loopback: ``ember image unpack REF DIR`` (pull
into an empty ``$EMBER_HOME``, then apply the layers) against ``skopeo copy
docker://REF oci:DIR`` followed by ``umoci unpack``, alternating, median of N
runs each.  Prints the ratio ember/anchor (goal <= 0.5) and appends it to
docs/performance.md.

    .venv/bin/python bench/pull_unpack.py [--runs N] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.images import build_debian_layout, build_multilayer_layout, push_layout  # noqa: E402

from bench._common import alternate, machine_note, print_ratio, record, registry  # noqa: E402

SECTION = "Pull + unpack (bench/pull_unpack.py)"
EMBER = str(Path(sys.executable).with_name("ember"))


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def bench_image(name: str, ref: str, work: Path, runs: int) -> str:
    home, ember_root = work / f"{name}-home", work / f"{name}-ember-root"
    layout, bundle = work / f"{name}-layout", work / f"{name}-bundle"

    def clean(_: str) -> None:
        for path in (home, ember_root, layout, bundle):
            shutil.rmtree(path, ignore_errors=True)
        os.sync()  # do not bill one contestant for the other's dirty pages

    def ember() -> None:
        env = {**os.environ, "EMBER_HOME": str(home)}
        run([EMBER, "image", "unpack", ref, str(ember_root)], env)

    def anchor() -> None:
        run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:latest"])
        run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)])

    timings = alternate({"ember": ember, "skopeo+umoci": anchor}, runs, setup=clean)
    clean("")
    return print_ratio(f"{name} image", timings["ember"], timings["skopeo+umoci"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/performance.md")
    args = parser.parse_args()
    images = {"multilayer": build_multilayer_layout(), "debian": build_debian_layout()}
    with registry() as reg, tempfile.TemporaryDirectory(prefix="ember-bench-pull-") as tmp:
        lines = []
        for name, layout in images.items():
            ref = push_layout(layout, reg, f"bench/{name}")
            lines.append(bench_image(name, ref, Path(tmp), args.runs))
    if not args.no_record:
        for line in lines:
            record(SECTION, f"{line}; {machine_note()}")


if __name__ == "__main__":
    main()
