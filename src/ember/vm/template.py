"""Machine templates: boot once, save, and start every later machine from the save.

A guest kernel spends most of a micro-VM's start in work that is the same for
every machine of one *shape* (kernel, base initramfs, memory, vCPUs, NICs, kernel
arguments, VMM): booting, then loading the virtio transport and the ext4 modules.
A template is that work done once: a VM booted with a run config that only says
``template``, whose ember-init stops after the device-independent modules and
waits on the control port, saved there with the VMM's own state-saving (QEMU:
its migration stream into a file, ~70 MB for a 512 MiB guest because untouched
pages are not written).  A machine of the same shape then starts by restoring
that state (~0.25 s under TCG, against ~1.6 s for a kernel boot) with its own
disk, TAP and log channels, and its monitor sends the real run config, the host's
clock and fresh randomness over the control port; ember-init loads the drivers
whose probe must see this machine's devices (virtio-blk, virtio-net), reseeds the
kernel's random number generator, and goes on as after a boot.

Security: every restored copy starts from the same kernel memory (same KASLR
offsets, same random state until the reseed, which happens before the program
runs).  ``machines.templates: false`` in config.json turns templates off.

Templates are built in the background by the first machine of a shape that finds
none (``python -m ember.vm.template``), so that machine boots normally; a template
that fails to restore is removed and the machine falls back to a boot.

The builder's QEMU is not confined (``ember.vm.vmm.jail``): it runs as root without
QEMU's seccomp filter, because it saves the state through QMP into an ``exec:``
migration (a ``cat`` QEMU spawns) and runs no tenant code, only ember-init up to its
template point.  The machines that restore the template are confined: their QEMU reads
the saved state from a descriptor the monitor opened (``-incoming fd:N``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ember import jsonutil
from ember.fsutil import atomic_write, fsync_dir, stale_work_dirs
from ember.home import Home
from ember.locks import FileLock, is_held, try_lock
from ember.process import die_with_parent
from ember.vm.errors import ConfigUnanswered, TemplateError
from ember.vm.initramfs import write_machine_initrd
from ember.vm.runconfig import SEED_BYTES, RunConfig, restore_message

#: bump when what a template holds changes (init protocol, module split)
TEMPLATE_VERSION = 2
#: drivers that bind to per-machine devices: loaded after the restore, so they probe the
#: restored machine's disk (its size) and NIC rather than the template's placeholders
LATE_MODULES = ("virtio_blk", "virtio_net")
READY_MARK = b"ember-init: template ready"
BUILD_TIMEOUT = 120.0


@functools.cache
def _vmm_code_fingerprint() -> bytes:
    """The source of the modules that make the VMM's command line and the template's
    config, this one's too (read once per process, by path: not imported for this)."""
    here = Path(__file__).parent
    h = hashlib.sha256(repr(LATE_MODULES).encode())
    for source in (here / "vmm" / "qemu.py", here / "runconfig.py", Path(__file__)):
        with contextlib.suppress(OSError):
            h.update(source.read_bytes())
    return h.digest()


@functools.cache
def _host_cpu_fingerprint() -> bytes:
    """The host kernel's release and the CPU's feature flags (one per CPU model line)."""
    h = hashlib.sha256(os.uname().release.encode())
    with contextlib.suppress(OSError):
        flags = {line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith(("flags", "model name"))}  # fmt: skip
        h.update("\n".join(sorted(flags)).encode())
    return h.digest()


@dataclass(frozen=True)
class TemplateShape:
    """Everything a restored machine must share with its template."""

    kernel: Path
    #: the cached base initramfs (ember-init + modules) the template booted with
    base_initrd: Path
    accel: str
    memory_mib: int
    cpus: int
    #: kernel arguments after the VMM's own (a machine with its own --kernel-arg differs)
    cmdline: tuple[str, ...]
    nics: int
    vmm_binary: str

    def key(self) -> str:
        h = hashlib.sha256(f"v{TEMPLATE_VERSION}".encode())
        # how ember drives the VMM (its command line, devices, the late modules): a
        # restore needs the device set its state was saved with, and a change there
        # without a TEMPLATE_VERSION bump restored old templates
        h.update(_vmm_code_fingerprint())
        if self.accel == "kvm":
            # the guest kernel picked its code paths for the host CPU it was saved on: a
            # host update that hides a feature (microcode, a mitigation) must not restore it
            h.update(_host_cpu_fingerprint())
        for path in (self.kernel, self.base_initrd, Path(self.vmm_binary)):
            # by the real file: homes that share a kernel directory share its templates
            real = path.resolve()
            st = real.stat()
            h.update(f"{real}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}\0".encode())
        h.update(
            json.dumps(
                [self.accel, self.memory_mib, self.cpus, list(self.cmdline), self.nics]
            ).encode()
        )
        return h.hexdigest()[:24]


@dataclass(frozen=True)
class Template:
    #: the VMM's saved state
    state: Path
    #: the initramfs the template booted with: a restore must be given the same one
    initrd: Path


def find_template(home: Home, shape: TemplateShape) -> Template | None:
    """The ready template of this shape, if one was built (its state file is written last).
    Finding it counts as using it (``prune_unused`` goes by that)."""
    key = shape.key()
    d = home.templates
    state, initrd = d / f"{key}.vmstate", d / f"{key}.initrd"
    if state.is_file() and initrd.is_file():
        with contextlib.suppress(OSError):
            os.utime(d / f"{key}.json")  # last used: the shape file's mtime
        return Template(state, initrd)
    return None


#: ``ember gc`` removes templates no machine started from for this long
UNUSED_FOR = 7 * 86400.0


def prune_unused(
    home: Home, older_than: float = UNUSED_FOR, *, dry_run: bool = False
) -> list[tuple[str, int]]:
    """Remove templates whose inputs changed or that no machine used for ``older_than``
    seconds (each holds ~70 MB; the next machine of that shape builds one again), and
    failed-build markers past their retry time.  Returns the keys removed and their bytes.
    A template a builder holds (its lock) is left alone."""
    d = home.templates
    return _prune(d, older_than, dry_run=dry_run) if d.is_dir() else []


def _prune(d: Path, older_than: float, *, dry_run: bool = False) -> list[tuple[str, int]]:
    now, removed = time.time(), []
    for meta in sorted(d.glob("*.json")):
        key = meta.name[: -len(".json")]
        try:
            stale = _shape_from_json(jsonutil.loads(meta.read_bytes())).key() != key
            unused = now - meta.stat().st_mtime > older_than
        except (OSError, ValueError, KeyError, TemplateError):
            stale, unused = True, True
        if not (stale or unused) or building(d, key):
            continue
        size = _template_bytes(d, key)
        if dry_run or _remove(d, key, lock=True):
            removed.append((key, size))
    for marker in (*d.glob("*.failed"), *d.glob("*.discarded")):
        with contextlib.suppress(OSError):
            if now - marker.stat().st_mtime > RETRY_AFTER and not dry_run:
                marker.unlink()
    return removed


def _template_bytes(d: Path, key: str) -> int:
    return sum(_size(d / f"{key}{suffix}") for suffix in _FILES)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def building(d: Path, key: str) -> bool:
    """Whether a builder holds this shape's lock right now."""
    return is_held(d / f"{key}.lock")


#: the files of one template, KEY + suffix (a builder may hold the lock: see _remove)
_FILES = (".vmstate", ".initrd", ".json", ".failed")


def _remove(d: Path, key: str, *, lock: bool = False) -> bool:
    """Remove a template's files (False: not done).  With ``lock``, its lock file too, for
    a shape nothing builds again: taken first and unlinked while held, and nothing is
    removed when a builder holds it (one that took it between its caller's look and this
    held a lock on a file that then had no name, and a third process made a new one and
    built beside it; ``FileLock`` re-checks the name of what it took)."""
    held = None
    if lock:
        held = try_lock(d / f"{key}.lock")
        if held is None:
            return False  # a builder holds it: its template stays
    try:
        for suffix in (*_FILES, ".lock") if lock else _FILES:
            with contextlib.suppress(FileNotFoundError):
                (d / f"{key}{suffix}").unlink()
    finally:
        if held is not None:
            held.release()
    return True


def state_identity(template: Template) -> tuple[int, int] | None:
    """(device, inode) of the template's state file now, None when it is gone."""
    try:
        st = os.stat(template.state)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def discard_template(template: Template, identity: tuple[int, int] | None = None) -> None:
    """A template that failed to restore is not used again.  The next machine of its
    shape builds it again, once: a second discard within RETRY_AFTER blocks builds of
    the shape for that long, as a failed build does (one that never restores cost a
    root boot to build and a failed restore per machine, over and over).

    ``identity`` (``state_identity`` of the one that failed): nothing is removed when
    another state file has its name by now (a build published a new template meanwhile:
    that one is not the one that failed)."""
    d, key = template.state.parent, template.state.stem
    if identity is not None and state_identity(template) != identity:
        return
    earlier = d / f"{key}.discarded"
    try:
        again = time.time() - earlier.stat().st_mtime < RETRY_AFTER
    except OSError:
        again = False
    _remove(d, key)
    with contextlib.suppress(OSError):
        (d / f"{key}.failed" if again else earlier).touch()


def template_config() -> RunConfig:
    return RunConfig(argv=(), template=True, late=LATE_MODULES)


# ---- building ---------------------------------------------------------------------------


class _Qmp:
    """The few QMP commands a build needs, over QEMU's unix socket (one JSON per line)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rw", encoding="utf-8")
        self._file.readline()  # the greeting
        self.call("qmp_capabilities")

    def call(self, command: str, **arguments: object) -> dict[str, object]:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg) + "\n")
        self._file.flush()
        while True:
            line = self._file.readline()
            if not line:
                raise TemplateError(f"QEMU closed its QMP socket during {command}")
            reply = jsonutil.loads(line)
            if "error" in reply:
                raise TemplateError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            if "return" in reply:
                return reply["return"] if isinstance(reply["return"], dict) else {}
            # else an asynchronous event: skip it

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def _wait_for_ready(console: Path, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TemplateError(f"the template VM ended before it was ready ({proc.returncode})")
        with contextlib.suppress(FileNotFoundError):
            if READY_MARK in console.read_bytes():
                return
        time.sleep(0.02)
    raise TemplateError("the template VM did not get ready in time")


def build_template(home: Home, shape: TemplateShape, *, wait: bool = True) -> Template | None:
    """Build the template of ``shape`` unless it exists; one builder per shape at a time.

    ``wait=False``: return None at once if another process is building it."""
    # resolved: the VMM's command line then names the real files, not a home's links
    d = home.templates.resolve()
    d.mkdir(parents=True, exist_ok=True)
    key = shape.key()
    lock = FileLock(d / f"{key}.lock")
    if not lock.acquire(blocking=wait):
        return None
    try:
        return find_template(home, shape) or _build(shape, d, key)
    finally:
        lock.release()


def _build(shape: TemplateShape, d: Path, key: str) -> Template:
    """Boot the template VM, save it, and publish its files (the shape's lock held)."""
    from ember.vm.vmm.base import Channels, Disk, Nic, VMSpec
    from ember.vm.vmm.qemu import VMM_ENVIRONMENT, QemuVM

    work = Path(tempfile.mkdtemp(dir=d, prefix=f".build-{key}-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        initrd = write_machine_initrd(
            shape.base_initrd.resolve(), template_config(), work / "initrd"
        )
        # readable by all: a restoring QEMU, which runs as a uid of its own, reads it
        # by path (ember.vm.vmm.jail); it holds ember-init, modules and a config
        # that says "template", nothing of any machine
        os.chmod(initrd, 0o644)
        placeholder = work / "placeholder.img"
        with open(placeholder, "wb") as f:
            f.truncate(1 << 20)
        channels = Channels.in_dir(work)
        spec = VMSpec(
            name=f"template-{key}",
            kernel=shape.kernel.resolve(),
            initrd=initrd,
            channels=channels,
            memory_mib=shape.memory_mib,
            cpus=shape.cpus,
            accel=shape.accel,
            cmdline=shape.cmdline,
            disks=(Disk(placeholder),),
            # no host side for the template's NICs: nothing is sent before the restore
            nics=tuple(Nic("", f"02:00:00:00:00:{i:02x}") for i in range(shape.nics)),
            vmm_log=work / "vmm.log",
        )
        argv = QemuVM(spec).argv()
        argv += ["-qmp", "unix:qmp.sock,server=on,wait=off"]
        with open(work / "vmm.log", "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                # not the caller's environment; and it dies with this builder (this
                # thread waits for it to the end): a builder killed -9 left a root,
                # unconfined QEMU running for ever, and the next run started another
                env=VMM_ENVIRONMENT,
                preexec_fn=functools.partial(die_with_parent, os.getpid()),  # noqa: PLW1509
            )  # fmt: skip
        deadline = time.monotonic() + BUILD_TIMEOUT
        _wait_for_ready(channels.console_log, proc, deadline)
        qmp = _Qmp(work / "qmp.sock")
        try:
            state_tmp, written = work / "vmstate", work / "vmstate.written"
            # the marker once cat has written the last byte: "completed" comes when QEMU
            # has sent it, and killing QEMU then could publish a cut state
            save = f"cat > {shlex.quote(str(state_tmp))} && : > {shlex.quote(str(written))}"
            qmp.call("migrate", uri=f"exec:{save}")
            while True:
                status = qmp.call("query-migrate").get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise TemplateError(f"saving the template VM: migration {status}")
                time.sleep(0.02)
            while not written.exists():
                if time.monotonic() > deadline:
                    raise TemplateError("saving the template VM: the state was not written out")
                time.sleep(0.005)
        finally:
            qmp.close()
        proc.kill()
        proc.wait()
        # the template's memory stays root's: a restore is handed it as a descriptor
        os.chmod(state_tmp, 0o600)
        for path in (state_tmp, initrd):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # the initrd first, the state last: a state file means a complete template
        atomic_write(d / f"{key}.json", json.dumps(asdict(shape), default=str).encode())
        os.replace(initrd, d / f"{key}.initrd")
        os.replace(state_tmp, d / f"{key}.vmstate")
        fsync_dir(d)
        _prune_stale(d)
        keep_at_most(d, MAX_TEMPLATES, key)
        return Template(d / f"{key}.vmstate", d / f"{key}.initrd")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def _shape_from_json(raw: object) -> TemplateShape:
    if not isinstance(raw, dict):
        raise TemplateError("template shape: not a JSON object")
    cmdline = raw["cmdline"]
    if not isinstance(cmdline, list):
        raise TemplateError("template shape: cmdline is not a list")
    return TemplateShape(
        kernel=Path(str(raw["kernel"])), base_initrd=Path(str(raw["base_initrd"])),
        accel=str(raw["accel"]), memory_mib=int(str(raw["memory_mib"])),
        cpus=int(str(raw["cpus"])), cmdline=tuple(str(a) for a in cmdline),
        nics=int(str(raw["nics"])), vmm_binary=str(raw["vmm_binary"]),
    )  # fmt: skip


def stale_build_dirs(d: Path, older_than: float, *, remove: bool = False) -> tuple[int, int]:
    """The work dirs of builders killed half-way (``.build-<key>-<mkdtemp's suffix, which
    has no "-">``) untouched for ``older_than`` seconds, while no builder holds that
    shape's lock (``fsutil.stale_work_dirs``): how many, their bytes."""

    def no_builder(name: str) -> bool:
        return not building(d, name[len(".build-"):].rpartition("-")[0])

    return stale_work_dirs(d, ".build-", older_than, no_builder, remove=remove)


def _prune_stale(d: Path) -> None:
    """Remove templates whose inputs changed or went away (a new kernel, ember-init or
    QEMU): nothing can restore them any more, and each holds ~70 MB.  Also the work
    dirs of builders killed half-way, an hour old."""
    stale_build_dirs(d, 3600, remove=True)
    _prune(d, float("inf"))


#: templates kept (~70 MB each): the shape holds --memory and --cpus, so a tenant
#: giving a new value to each run had a template built for each (a root boot) and kept
#: for a week, until the disk under the templates was full
MAX_TEMPLATES = 8


def keep_at_most(d: Path, limit: int, keep: str) -> list[tuple[str, int]]:
    """Remove the least recently used ready templates of ``d`` beyond ``limit`` (``keep``,
    the one just built, counts as one and stays); the keys removed and their bytes.
    One a builder holds is left alone.  A machine restored from one keeps running (its
    VMM read the state at its start); its next start builds or boots afresh."""
    ready = []
    for meta in d.glob("*.json"):
        key = meta.name[: -len(".json")]
        if key == keep or building(d, key) or not (d / f"{key}.vmstate").is_file():
            continue
        with contextlib.suppress(OSError):
            ready.append((meta.stat().st_mtime, key))
    ready.sort(reverse=True)  # the most recently used first
    removed = []
    for _, key in ready[max(limit - 1, 0) :]:
        size = _template_bytes(d, key)
        if _remove(d, key, lock=True):
            removed.append((key, size))
    return removed


#: after a failed build, no new attempt for this long (each costs a boot's CPU)
RETRY_AFTER = 3600.0


def _failed_marker(home: Home, key: str) -> Path:
    return home.templates / f"{key}.failed"


def build_in_background(home: Home, shape: TemplateShape) -> None:
    """Start a detached builder for ``shape`` (it gives up at once if one is running, and
    nothing starts within RETRY_AFTER of a failed build of the same shape).

    The shape goes through stdin and the state dir through the environment: the
    builder's command line names no path of the home (tools that look for a home's
    processes by their arguments look for its machines)."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - _failed_marker(home, shape.key()).stat().st_mtime < RETRY_AFTER:
            return
    argv = [sys.executable, "-m", "ember.vm.template"]
    d = home.templates.resolve()
    d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EMBER_HOME": str(home.root)}
    with open(d / "build.log", "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, env=env,
        )  # fmt: skip
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(json.dumps(asdict(shape), default=str).encode())
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    proc.returncode = 0  # detached: nobody waits for it


def send_restore_config(
    control_socket: Path,
    config: bytes,
    timeout: float = 30.0,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Connect to a restoring VM's control socket (it appears when the VMM starts), send
    the run config, and wait for ember-init's ``ok``: QEMU drops what it has not handed
    to the guest yet when the client hangs up, so the connection stays until then."""
    from ember.vm.vmm.base import ControlChannelError, open_control

    deadline = time.monotonic() + timeout
    while True:
        try:
            # short connect attempts: a VMM that died leaves a socket that refuses
            sock = open_control(control_socket, timeout=0.2)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            break
        except ControlChannelError:
            if not alive():
                raise TemplateError("the VMM ended while restoring") from None
            if time.monotonic() > deadline:
                raise TemplateError("the restored VM's control socket did not appear") from None
            time.sleep(0.003)
    try:
        # the restored kernel has the template's clock and random state: send fresh ones
        try:
            sock.sendall(restore_message(config, time.time_ns(), os.urandom(SEED_BYTES)))
        except TimeoutError:
            raise TemplateError("the restored VM did not take its config in time") from None
        except OSError as e:
            raise TemplateError(f"cannot send the restored VM its config: {e}") from None
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                chunk = sock.recv(64)
            except TimeoutError:
                raise ConfigUnanswered("the restored VM did not answer its config in time") from None
            except OSError as e:
                raise ConfigUnanswered(f"the restored VM's control channel failed: {e}") from None
            if not chunk:
                raise ConfigUnanswered("the restored VM closed its control channel before answering")
            reply += chunk
            if len(reply) > 256:
                break
        if reply != b"ok\n":
            raise ConfigUnanswered(f"the restored VM refused its config: {reply[:200]!r}")
    finally:
        sock.close()


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="ember-template-builder",
        description="Build a machine template; the shape (JSON) comes on stdin, "
        "the state dir from $EMBER_HOME.",
    )
    p.parse_args(argv)
    home = Home.from_env()
    try:
        shape = _shape_from_json(jsonutil.loads(sys.stdin.buffer.read(1 << 16)))
        key = shape.key()
    except (TemplateError, ValueError, KeyError, OSError) as e:
        print(f"template builder: bad shape: {e}", file=sys.stderr)
        return 2
    slot = _builder_slot(home)
    if slot is None:
        # each --memory/--cpus is a shape of its own: a loop over them started as many
        # root VMs at once; the machines boot without a template meanwhile
        print("template builder: enough builders are running; not building", file=sys.stderr)
        return 0
    try:
        build_template(home, shape, wait=False)
    except (TemplateError, OSError) as e:
        print(f"template build failed: {e}", file=sys.stderr)
        with contextlib.suppress(OSError):
            _failed_marker(home, key).touch()
        return 1
    finally:
        slot.release()
    return 0


#: template builders that may run at once (each boots a VM as root)
MAX_BUILDERS = 2


def _builder_slot(home: Home) -> FileLock | None:
    """One of MAX_BUILDERS builder slots, held until released; None when all are taken."""
    d = home.templates.resolve()
    d.mkdir(parents=True, exist_ok=True)
    for i in range(MAX_BUILDERS):
        lock = FileLock(d / f".builder-{i}.lock")
        if lock.acquire(blocking=False):
            return lock
    return None


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
