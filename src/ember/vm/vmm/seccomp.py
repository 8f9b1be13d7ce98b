"""ember's own seccomp filter for a tenant machine's VMM, under QEMU's ``-sandbox``.

QEMU's filter is a deny-list of what QEMU itself never needs (fork, exec, set*id,
obsolete calls).  It leaves callable much of the kernel that an escaped QEMU could
use against the host or other machines: io_uring (whose operations seccomp never
sees), bpf, the key rings, perf events, userfaultfd, ptrace and cross-process
memory and descriptor access, module loading, the new mount API, port I/O, and
prctl(PR_SET_PDEATHSIG), which undoes the death of a VMM with its monitor.  This
filter refuses those (EPERM; io_uring ENOSYS, which QEMU takes as "not here" and
polls instead).  Filters stack, so QEMU's still applies on top.

Pure: ``program()`` is the BPF program as bytes; ``jail`` installs it.  x86-64 only
(the system call numbers are that ABI's); elsewhere no filter of ember's is added.
"""

from __future__ import annotations

import errno
import struct

# x86-64 system call numbers refused with EPERM
DENIED = {
    "ptrace": 101, "personality": 135, "modify_ldt": 154, "pivot_root": 155, "chroot": 161,
    "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248, "request_key": 249,
    "keyctl": 250, "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
}  # fmt: skip
# refused with ENOSYS: QEMU probes io_uring for its event loop and falls back to poll
NOT_HERE = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}
PRCTL = 157
PR_SET_PDEATHSIG = 1

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
# offsets in struct seccomp_data: nr, arch, instruction pointer, args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter: another ABI killed (QEMU's filter kills them too), the x32 calls and
    ``DENIED`` EPERM, ``NOT_HERE`` ENOSYS, prctl(PR_SET_PDEATHSIG) EPERM, the rest allowed."""
    checks = [(nr, "deny") for nr in sorted(DENIED.values())]
    checks += [(nr, "enosys") for nr in sorted(NOT_HERE.values())]
    head = [
        _insn(_LD_W_ABS, _ARCH),
        _insn(_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _insn(_RET_K, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, _NR),
    ]
    # layout after ``head``: the x32 test, one test per number, the prctl test (3
    # instructions), then ALLOW, ENOSYS, EPERM: each jump counts what lies between
    n = len(checks)
    allow = 1 + n + 3  # index of ALLOW, counted from the x32 test
    enosys, deny = allow + 1, allow + 2
    body = [_insn(_JGE_K, X32_SYSCALL_BIT, deny - 1, 0)]
    for i, (nr, kind) in enumerate(checks, start=1):
        target = deny if kind == "deny" else enosys
        body.append(_insn(_JEQ_K, nr, target - i - 1, 0))
    at = 1 + n  # the prctl test
    body += [
        _insn(_JEQ_K, PRCTL, 0, allow - at - 1),
        _insn(_LD_W_ABS, _ARG0_LOW),
        _insn(_JEQ_K, PR_SET_PDEATHSIG, deny - (at + 2) - 1, allow - (at + 2) - 1),
        _insn(_RET_K, _RET_ALLOW),
        _insn(_RET_K, _RET_ERRNO | errno.ENOSYS),
        _insn(_RET_K, _RET_ERRNO | errno.EPERM),
    ]
    insns = head + body
    if any(b[2] > 255 or b[3] > 255 for b in insns):  # (jt, jf are one byte each)
        raise ValueError("seccomp program too long for its jumps")
    return b"".join(insns)
