"""Which accelerator to use: KVM when it actually boots a guest, else TCG.

Some hosts have a ``/dev/kvm`` that cannot run a standard kernel (this project's
machines only run PVM guest kernels: a normal kernel hangs with no output).  So
the only trustworthy test is a boot: the guest kernel with no initrd and
``panic=-1`` panics on the missing root file system and QEMU (``-no-reboot``)
exits; under a working KVM that takes well under a second.  The answer is cached
in ``$EMBER_HOME/accel.json`` per (host boot, kernel), so the probe runs once.
``EMBER_ACCEL=kvm|tcg`` skips the probe.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
from pathlib import Path

from ember import jsonutil
from ember.fsutil import atomic_write
from ember.home import Home
from ember.process import boot_id
from ember.vm.vmm.base import ACCELS
from ember.vm.vmm.errors import VMMError
from ember.vm.vmm.jail import (
    SANDBOX,
    Identity,
    can_confine,
    enter,
    kvm_group,
    lease_identity,
    loop_mounts,
)
from ember.vm.vmm.qemu import VMM_ENVIRONMENT, find_qemu, open_readable

PROBE_TIMEOUT = 10.0
_MARKER = b"Linux version"

log = logging.getLogger("ember.vm")


def cache_path(home: Home) -> Path:
    return home.accel_cache


def _boot_key() -> str:
    """The boot part of a cache key: a reboot may bring another host kernel or KVM, so a
    probe's answer holds for one boot."""
    return boot_id() or "unknown"


def cache_key(kernel: Path) -> str:
    st = kernel.stat()
    return f"{_boot_key()}:{kernel.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def kvm_usable_device() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Boot ``kernel`` under KVM to a root-fs panic: None if that completed in time, else
    why not (words that follow "/dev/kvm").

    The probe's QEMU is confined as a machine's is (``jail``: a leased uid, empty
    network and IPC namespaces, the seccomp filters, death with its parent): the kernel
    may be one a user gave (``--kernel``), and a root QEMU running it with the host's
    namespaces was out of every confinement.  Its console is a pipe."""
    lease = lease_identity() if can_confine() else None
    identity = None
    kernel_fd = -1
    try:
        if lease is not None:
            try:
                groups = kvm_group()
            except VMMError:  # group root: a confined QEMU may not open it
                return "belongs to group root, which a confined VMM is never given"
            identity = Identity(lease.identity.uid, lease.identity.gid, groups)
        kernel_fd = open_readable(kernel, identity)  # (a root-only --kernel: a copy)
        argv = [
            find_qemu(), "-M", "microvm,x-option-roms=off", "-accel", "kvm", "-cpu", "host",
            "-m", "128", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-sandbox", SANDBOX, "-kernel", f"/proc/self/fd/{kernel_fd}",
            "-append", "console=ttyS0 panic=-1 loglevel=4", "-serial", "stdio",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                check=False, pass_fds=(kernel_fd,), cwd="/", env=VMM_ENVIRONMENT,
                preexec_fn=functools.partial(  # noqa: PLW1509
                    enter, identity, kvm=True, parent=os.getpid(),
                    detach=loop_mounts() if identity is not None else (),
                ),  # fmt: skip
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return "does not boot this kernel (probe timed out)"
        except (OSError, subprocess.SubprocessError) as e:
            raise VMMError(f"cannot run {argv[0]}: {e}") from e
        if proc.returncode == 0 and _MARKER in proc.stdout:
            return None
        return "does not boot this kernel (the probe failed)"
    finally:
        if kernel_fd >= 0:
            os.close(kernel_fd)
        if lease is not None:
            lease.release()


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = jsonutil.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and v in ACCELS}


def detect_accel(home: Home, kernel: Path | None = None, *, quiet: bool = False) -> str:
    """``"kvm"`` or ``"tcg"`` for booting ``kernel`` (default: the installed kernel).  A
    fallback to TCG is reported as a warning of the ``ember.vm`` logger (not when ``quiet``;
    the CLI shows it as an ``ember:`` line)."""
    forced = os.environ.get("EMBER_ACCEL")
    if forced:
        if forced not in ACCELS:
            raise VMMError(f"EMBER_ACCEL must be one of {', '.join(ACCELS)}, not {forced!r}")
        return forced
    if not kvm_usable_device():
        if not quiet:
            log.warning("/dev/kvm is not available: using TCG (software emulation, slower)")
        return "tcg"
    if kernel is None:
        from ember.vm.kernel import find_kernel

        kernel = find_kernel(home).vmlinux
    path = cache_path(home)
    key = cache_key(kernel)
    cached = _read_cache(path)
    if key in cached:
        return cached[key]
    why_not = probe_kvm(kernel)
    accel = "kvm" if why_not is None else "tcg"
    if why_not is not None and not quiet:
        log.warning("/dev/kvm %s: using TCG (software emulation, slower)", why_not)
    cached = {k: v for k, v in _read_cache(path).items() if k.startswith(_boot_key())}
    cached[key] = accel
    atomic_write(path, json.dumps(cached, indent=1).encode())
    return accel
