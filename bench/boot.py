"""Boot time of ``ember run`` against the floor, host-side start cost, host memory.

1. Time from starting ``ember run --rm IMAGE echo ...`` to the program's first
   output line on ember's stdout, warm (image prepared, the machine template of its
   shape built: the machine starts by restoring it), warm with templates off (the
   guest kernel boots), and cold (fresh state dir: pull + prepare; kernel,
   accelerator answer and templates shared), against the floor: QEMU with the same kernel, accelerator and CPU options and a one-line
   busybox initramfs (``echo``, then poweroff), its serial console on a pipe.
   Alternating runs, medians, ratio.  Goal: warm <= 1.3x the floor.
2. Host-side work of a warm start (library): create (image lookup, root disk
   clone, network, run config, initrd) + monitor start + VMM spawn, until the
   monitor reports the VMM started.  Goal: < 150 ms.
3. Host memory per machine: PSS of QEMU and of the monitor for machines idling
   after boot (guest memory size as configured, default 512 MiB).
4. Wall time of ``ember run -d``, warm (``--only-detached``: this alone).

Everything runs inside a network namespace the bench creates (TAPs and nftables
rules never touch the host's own namespace).

    .venv/bin/python bench/boot.py [--runs N] [--no-record] [--skip-cold] [--debian]
                                   [--skip-boot | --only-detached]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.images import build_busybox_layout, build_debian_layout, layout_ref  # noqa: E402
from tests.vm.vmm.kernelcache import cached_kernel, share_kernels  # noqa: E402

from bench._common import (  # noqa: E402
    Timing,
    fmt_seconds,
    machine_note,
    print_ratio,
    record,
)
from ember.home import Home  # noqa: E402
from ember.snapshots.pool import close_pool  # noqa: E402
from ember.vm.cpio import CpioWriter  # noqa: E402
from ember.vm.vmm.accel import detect_accel  # noqa: E402
from ember.vm.vmm.qemu import find_qemu, host_tsc_khz  # noqa: E402

SECTION = "Machines: boot (bench/boot.py)"
EMBER = str(Path(sys.executable).with_name("ember"))
MARK = "boot-bench-hello"


def ip_netns(*args: str) -> None:
    subprocess.run(["ip", "netns", *args], check=True, capture_output=True)


def make_home(root: Path) -> Home:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(
        json.dumps({"snapshots": {"pool_size": "4G", "base_size": "1G"}})
    )
    home = Home(root)
    share_kernels(home)
    return home


def first_line_time(argv: list[str], env: dict[str, str] | None, mark: str) -> float:
    """Seconds from spawning ``argv`` to a line containing ``mark`` on its stdout; the
    process is then waited for (its exit is not part of the time)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    buf = b""
    found = None
    fd = proc.stdout.fileno()
    while found is None:
        ready, _, _ = select.select([fd], [], [], 120)
        if not ready:
            proc.kill()
            raise SystemExit(f"no output from {' '.join(argv[:6])} within 120 s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit(f"{' '.join(argv[:6])} ended without printing {mark!r}")
        buf += chunk
        if mark.encode() in buf:
            found = time.perf_counter() - start
    proc.stdout.close()
    if proc.wait(120) != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed with {proc.returncode}")
    return found


def floor_initrd(dest: Path, then: str = "/bin/busybox poweroff -f") -> Path:
    busybox = shutil.which("busybox")
    if not busybox:
        raise SystemExit("busybox-static is needed for the floor")
    w = CpioWriter()
    w.add_dir("bin")
    w.add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    init = f"#!/bin/busybox sh\n/bin/busybox echo {MARK}\n{then}\n"
    w.add_file("init", init.encode(), 0o755)
    dest.write_bytes(w.getvalue())
    return dest


def floor_argv(vmlinux: Path, initrd: Path, accel: str) -> list[str]:
    """Same kernel, machine, CPU model and kernel arguments as ember's, no devices."""
    append = "console=ttyS0 panic=-1 quiet loglevel=4"
    cpu = "host" if accel == "kvm" else "max"
    tsc = host_tsc_khz()
    if accel == "tcg" and tsc:
        append += f" tsc_early_khz={tsc}"
    return [
        find_qemu(), "-M", "microvm,x-option-roms=off,isa-serial=on", "-accel", accel,
        "-cpu", cpu, "-m", "512", "-smp", "1", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-kernel", str(vmlinux), "-initrd", str(initrd),
        "-append", append, "-serial", "stdio",
    ]  # fmt: skip


def floor_memory(argv: list[str]) -> float:
    """PSS (MiB) of a bare QEMU whose guest idles after boot (same -m as ember's default)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and MARK.encode() not in proc.stdout.readline():
            pass
        time.sleep(2)
        return pss_kib(proc.pid) / 1024
    finally:
        proc.kill()
        proc.wait()


def ember_env(home: Home) -> dict[str, str]:
    return {**os.environ, "EMBER_HOME": str(home.root)}


def run_argv(ns: str, image: str) -> list[str]:
    return ["ip", "netns", "exec", ns, EMBER, "run", "--rm", image, "echo", MARK]


def wait_for_template(ns: str, home: Home, image: str, timeout: float = 180) -> None:
    """Run one machine (it boots and has the template of its shape built in the
    background), then wait until that template is ready, so warm runs restore it."""
    env = ember_env(home)
    subprocess.run(
        ["ip", "netns", "exec", ns, EMBER, "run", "--name", "tpl-warmup", image, "true"],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    st = json.loads(
        subprocess.run(
            [EMBER, "inspect", "tpl-warmup"], check=True, capture_output=True, env=env
        ).stdout  # fmt: skip
    )[0]
    subprocess.run([EMBER, "rm", "tpl-warmup"], check=True, capture_output=True, env=env)
    key = st["labels"].get("ember.template")
    if not key:
        raise SystemExit("this machine shape gets no template (templates off?)")
    state = home.kernels / "templates" / f"{key}.vmstate"
    deadline = time.monotonic() + timeout
    while not state.is_file():
        if time.monotonic() > deadline:
            raise SystemExit(f"template {key} was not built within {timeout:.0f} s")
        time.sleep(0.2)


def host_side(ns: str, home: Home, image: str, runs: int) -> Timing:
    """create + monitor + VMM spawn, in a child inside the namespace (library calls)."""
    code = f"""
import json, os, sys, time
from ember.home import Home
from ember.machines import lifecycle
from pathlib import Path
home = Home(Path({str(home.root)!r}))
out = []
for _ in range({runs + 1}):
    t0 = time.perf_counter()
    mon = lifecycle.start_monitor(home)
    st = lifecycle.create(home, lifecycle.RunRequest(image={image!r}, args=("true",), auto_remove=True))
    mon.hand_over(st)
    line = os.read(mon.sync_r, 4096)
    t1 = time.perf_counter()
    assert b'"started"' in line, line
    while os.read(mon.sync_r, 4096):
        pass
    mon.close()
    os.waitpid(mon.pid, 0)
    out.append([t1 - t0, st.labels.get("ember.timings.create", "")])
print(json.dumps(out[1:]))
"""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True, text=True, env=ember_env(home), check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"host-side measurement failed: {res.stderr[-2000:]}")
    samples = json.loads(res.stdout)
    print("  create phases (s):", "; ".join(s[1] for s in samples))
    return Timing("host-side warm start", [s[0] for s in samples])


#: when ``ember run -d`` returns (docs/machines.md, "The monitor")
DETACHED_UNTIL = (
    "until the machine started: a restored guest answered its config, a booting VMM "
    "is still up 0.5 s after its start"
)


def cli_detached(ns: str, home: Home, image: str, runs: int) -> Timing:
    """Wall time of ``ember run -d`` (it returns once the machine started, see
    ``DETACHED_UNTIL``): what a user waits for, the CLI's own interpreter start-up and
    imports included."""
    t = Timing("ember run -d (CLI process, until the machine started)")
    env = ember_env(home)
    for i in range(runs + 1):
        name = f"detached{i}"
        start = time.perf_counter()
        subprocess.run(
            ["ip", "netns", "exec", ns, EMBER, "run", "-d", "--name", name, image, "sleep", "1000"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        subprocess.run([EMBER, "rm", "-f", name], check=True, capture_output=True, env=env)
        if i:
            t.samples.append(elapsed)
    return t


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def memory(ns: str, home: Home, image: str, machines: int = 3) -> tuple[float, float, float]:
    """Median PSS (MiB) of QEMU, of the monitor, and their sum, for idle machines."""
    names = [f"mem{i}" for i in range(machines)]
    env = ember_env(home)
    try:
        for n in names:
            subprocess.run(
                ["ip", "netns", "exec", ns, EMBER, "run", "-d", "--name", n, image,
                 "sh", "-c", "echo up; exec sleep 1000"],
                check=True, capture_output=True, env=env,
            )  # fmt: skip
        for n in names:  # wait until each program runs (booted, idle)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                logs = subprocess.run([EMBER, "logs", n], capture_output=True, text=True, env=env)
                if "up" in logs.stdout:
                    break
                time.sleep(0.3)
        time.sleep(2)
        qemu, mon = [], []
        for n in names:
            st = json.loads(
                subprocess.run(
                    [EMBER, "inspect", n], capture_output=True, text=True, env=env, check=True
                ).stdout  # fmt: skip
            )[0]
            qemu.append(pss_kib(st["vmm_pid"]) / 1024)
            mon.append(pss_kib(st["monitor_pid"]) / 1024)
    finally:
        subprocess.run([EMBER, "rm", "-f", *names], capture_output=True, env=env)
    qemu.sort()
    mon.sort()
    q, m = qemu[len(qemu) // 2], mon[len(mon) // 2]
    return q, m, q + m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--debian", action="store_true", help="also the debootstrap image")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--skip-boot", action="store_true", help="only host-side time and memory")
    only.add_argument("--only-detached", action="store_true",
                      help="only `ember run -d` (warm: from the template of its shape)")  # fmt: skip
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespace, TAPs, loop devices)")

    kernel = cached_kernel()
    images = {"busybox": layout_ref(build_busybox_layout())}
    if args.debian:
        images["debian"] = layout_ref(build_debian_layout())
    ns = f"ember-bench-{os.getpid()}"
    ip_netns("add", ns)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="ember-bench-boot-"))
    homes: list[Home] = []
    lines: list[str] = []
    try:
        home = make_home(tmp / "warm")
        homes.append(home)
        accel = detect_accel(home, kernel.vmlinux)
        initrd = floor_initrd(tmp / "floor.cpio")
        floor = floor_argv(kernel.vmlinux, initrd, accel)
        note = f"{accel}, kernel {kernel.version}; {machine_note()}"
        print(f"accelerator: {accel}")

        for label, image in images.items():
            if args.skip_boot:
                first_line_time(run_argv(ns, image), ember_env(home), MARK)
                continue
            if args.only_detached:
                first_line_time(run_argv(ns, image), ember_env(home), MARK)
                wait_for_template(ns, home, image)
                continue
            # prepare once (untimed): the warm runs find the image and its snapshots,
            # and the machine template of their shape (ember.vm.template)
            first_line_time(run_argv(ns, image), ember_env(home), MARK)
            wait_for_template(ns, home, image)
            no_templates = {**ember_env(home), "EMBER_TEMPLATES": "0"}
            t_floor = Timing("floor (QEMU + busybox initramfs)")
            t_warm = Timing("ember run (warm, from the template)")
            t_boot = Timing("ember run (warm, templates off: kernel boot)")
            for _ in range(args.runs):  # alternating, so drift hits all alike
                t_floor.samples.append(first_line_time(floor, None, MARK))
                t_warm.samples.append(first_line_time(run_argv(ns, image), ember_env(home), MARK))
                t_boot.samples.append(first_line_time(run_argv(ns, image), no_templates, MARK))
            line = print_ratio(f"{label}: first output line, warm", t_warm, t_floor)
            lines.append(f"{line}; {note}")
            line = print_ratio(f"{label}: first output line, warm, templates off", t_boot, t_floor)
            lines.append(f"{line}; {note}")
            if args.skip_cold:
                continue
            t_cold = Timing("ember run (cold: pull + prepare, then start; template shared)")
            for i in range(max(1, min(args.runs, 3))):
                h = make_home(tmp / f"cold-{label}-{i}")
                homes.append(h)
                shutil.copy(home.root / "accel.json", h.root / "accel.json")
                t_cold.samples.append(first_line_time(run_argv(ns, image), ember_env(h), MARK))
            # not round by round: the cold runs come after all the floor's
            line = print_ratio(f"{label}: first output line, cold", t_cold, t_floor, rounds=False)
            lines.append(f"{line}; {note}")

        if not args.only_detached:
            hs = host_side(ns, home, images["busybox"], args.runs)
            print(hs)
            goal = "under" if hs.median < 0.150 else "OVER"
            lines.append(
                f"busybox: host-side warm start (create: image lookup, root disk clone, "
                f"network, run config, initrd; monitor start; VMM spawn) median "
                f"{fmt_seconds(hs.median)} (n={len(hs.samples)}), {goal} the 150 ms goal; {note}"
            )
        cli = cli_detached(ns, home, images["busybox"], args.runs)
        print(cli)
        how = " (`bench/boot.py --only-detached`)" if args.only_detached else ""
        lines.append(
            f"busybox: `ember run -d` wall time {DETACHED_UNTIL} (CLI start-up, imports, "
            f"create, monitor, VMM spawn, the guest's answer) median {fmt_seconds(cli.median)} "
            f"(n={len(cli.samples)}){how}; {note}"
        )
        if not args.only_detached:
            q, m, total = memory(ns, home, images["busybox"])
            idle = floor_initrd(tmp / "idle.cpio", "/bin/busybox sleep 1000")
            bare = floor_memory(floor_argv(kernel.vmlinux, idle, accel))
            print(f"memory per idle machine: QEMU PSS {q:.1f} MiB, monitor PSS {m:.1f} MiB; "
                  f"bare QEMU (floor) {bare:.1f} MiB")  # fmt: skip
            lines.append(
                f"busybox: host memory per idle machine (512 MiB guest): QEMU PSS {q:.1f} MiB + "
                f"monitor PSS {m:.1f} MiB = {total:.1f} MiB (median of 3 machines) vs a bare QEMU "
                f"with the floor's initramfs {bare:.1f} MiB: ember's overhead "
                f"{total - bare:.1f} MiB per machine; {note}"
            )
    finally:
        for h in homes:
            close_pool(h)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_record:
        for line in lines:
            record(SECTION, line)


if __name__ == "__main__":
    main()
