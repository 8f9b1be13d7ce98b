"""ember's registry server vs Debian's docker-registry (CNCF Distribution 2.8).

In one run, alternating: ``skopeo copy`` push of the debootstrap minbase image
(a fresh, empty registry for every push, so nothing is skipped or mounted),
``skopeo copy`` pull back to an OCI layout, blob GET throughput (the image's
layer) and manifest GET requests/s, both with ``wrk`` (Debian package) at
concurrency 32 over keep-alive connections.  ember is used as clients use it: through a
registry token from ``/token``; the Go registry runs without auth.  Prints
each ratio as ember/Distribution in *time* (lower is better) and in
throughput (higher is better), and appends them to docs/performance.md.

    .venv/bin/python bench/registry.py [--runs N] [--workers W] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.registry.server.support import EmberServer, Tenant  # noqa: E402
from tests.support.images import build_debian_layout, layout_ref  # noqa: E402
from tests.support.registry import Registry, start_registry  # noqa: E402

from bench._common import alternate, machine_note, print_ratio, record  # noqa: E402

SECTION = "Registry server (bench/registry.py)"
CONCURRENCY = 32


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


class Contestant:
    """One registry server that can be reset to empty between pushes."""

    def __init__(self, name: str, work: Path, workers: int) -> None:
        self.name = name
        self.work = work
        self.workers = workers
        self.generation = 0
        self.ember: EmberServer | None = None
        self.tenant: Tenant | None = None
        self.go: Registry | None = None

    @property
    def host(self) -> str:
        if self.ember is not None:
            return self.ember.host
        assert self.go is not None
        return self.go.host

    def creds(self) -> list[str]:
        return ["--creds", self.tenant.creds] if self.tenant else []

    def fresh(self) -> None:
        """Stop, and start again with empty storage."""
        self.stop()
        self.generation += 1
        root = self.work / f"{self.name}-{self.generation}"
        if self.name == "ember":
            self.ember = EmberServer(root, workers=self.workers)
            self.ember.create_org("bench")
            self.ember.start()
            self.tenant = Tenant(self.ember, "bench", self.ember.create_token("bench"))
        else:
            self.go = start_registry(root)

    def stop(self) -> None:
        if self.ember is not None:
            self.ember.stop()
            shutil.rmtree(self.ember.home, ignore_errors=True)
        if self.go is not None:
            self.go.stop()
            shutil.rmtree(self.go.root, ignore_errors=True)
        self.ember = self.go = self.tenant = None

    def auth_header(self) -> list[str]:
        """What ``wrk`` sends: a registry token from /token, as real clients use."""
        if self.tenant is None:
            return []
        token = self.tenant.registry_token("repository:bench/debian:pull")
        return ["-H", f"Authorization: Bearer {token}"]


_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def wrk(url: str, headers: list[str], seconds: int) -> tuple[float, float]:
    """(requests per second, bytes per second) from ``wrk`` (HTTP/1.1 keep-alive)."""
    out = run(["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{seconds}s", "--timeout", "60s", *headers, url])
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if "Non-2xx" in out or (errors and any(int(n) for n in errors.groups())):
        sys.exit(f"wrk saw errors against {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    assert m is not None, out
    return rps, float(m.group(1)) * _UNITS[m.group(2)]


def in_throughput(line: str) -> str:
    """Add the time ratio's inverse: the issue's goal is stated in throughput (>= 1.0)."""
    m = re.search(r"ratio ([\d.]+)x", line)
    assert m is not None
    extended = f"{line}; {1 / float(m.group(1)):.2f}x in throughput"
    print(extended)
    return extended


def throughput_line(what: str, unit: str, ours: list[float], theirs: list[float]) -> str:
    o, t = statistics.median(ours), statistics.median(theirs)
    line = (
        f"{what}: ember {o:,.0f} {unit} vs docker-registry {t:,.0f} {unit}, "
        f"ratio {o / t:.2f}x in throughput (medians of {len(ours)} alternating runs)"
    )
    print(line)
    return line


@contextmanager
def contestants(work: Path, workers: int) -> Iterator[dict[str, Contestant]]:
    both = {"ember": Contestant("ember", work, workers), "docker-registry": Contestant("docker-registry", work, 1)}
    try:
        yield both
    finally:
        for c in both.values():
            c.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="ember server processes")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    layout = build_debian_layout()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-reg-") as tmp, contestants(Path(tmp), args.workers) as cs:
        work = Path(tmp)
        out = work / "pulled"

        def push_fn(c: Contestant) -> Callable[[], object]:
            return lambda: run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *(
                ["--dest-creds", c.tenant.creds] if c.tenant else []), "--preserve-digests",
                layout_ref(layout), f"docker://{c.host}/bench/debian:v1"])

        def pull_fn(c: Contestant) -> Callable[[], object]:
            return lambda: run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", *(
                ["--src-creds", c.tenant.creds] if c.tenant else []), "--preserve-digests",
                f"docker://{c.host}/bench/debian:v1", f"oci:{out}:latest"])

        pushes = alternate({n: push_fn(c) for n, c in cs.items()}, args.runs, warmup=0,
                           setup=lambda n: cs[n].fresh())
        lines.append(in_throughput(print_ratio("skopeo push (debian minbase, fresh registry)",
                                               pushes["ember"], pushes["docker-registry"])))

        def clean(_: str) -> None:
            shutil.rmtree(out, ignore_errors=True)

        pulls = alternate({n: pull_fn(c) for n, c in cs.items()}, args.runs, setup=clean)
        lines.append(in_throughput(print_ratio("skopeo pull to an OCI layout", pulls["ember"], pulls["docker-registry"])))

        manifest = json.loads(run(["skopeo", "inspect", "--raw", layout_ref(layout)]))
        layer = max(manifest["layers"], key=lambda d: d["size"])
        blob_rates: dict[str, list[float]] = {n: [] for n in cs}
        manifest_rps: dict[str, list[float]] = {n: [] for n in cs}
        accept = ["-H", f"Accept: {manifest.get('mediaType', 'application/vnd.oci.image.manifest.v1+json')}"]
        for _ in range(args.runs):
            for n, c in cs.items():
                base = f"http://{c.host}/v2/bench/debian"
                blob_rates[n].append(wrk(f"{base}/blobs/{layer['digest']}", c.auth_header(), 5)[1])
                manifest_rps[n].append(wrk(f"{base}/manifests/v1", c.auth_header() + accept, 5)[0])
        size_mb = layer["size"] / 1e6
        lines.append(throughput_line(f"blob GET ({size_mb:.0f} MB layer, concurrency {CONCURRENCY})", "B/s",
                                     blob_rates["ember"], blob_rates["docker-registry"]))
        lines.append(throughput_line(f"manifest GET (concurrency {CONCURRENCY}, keep-alive)", "req/s",
                                     manifest_rps["ember"], manifest_rps["docker-registry"]))
    if not args.no_record:
        note = f" [{machine_note()}; ember --workers {args.workers}]"
        for line in lines:
            record(SECTION, line + note)


if __name__ == "__main__":
    main()
