"""``python -m tests.support.seccomp_exec CMD ARGS...``: run CMD under a seccomp filter
that allows everything (a filter all the same: /proc/PID/status counts it).

Root may install one without no_new_privs (CAP_SYS_ADMIN), so nothing else about
the process changes."""

from __future__ import annotations

import ctypes
import os
import struct
import sys

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000


def install_allow_all() -> None:
    program = ctypes.create_string_buffer(struct.pack("=HBBI", BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog, native layout
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(fprog)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, buf, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    install_allow_all()
    os.execvp(sys.argv[1], sys.argv[1:])
