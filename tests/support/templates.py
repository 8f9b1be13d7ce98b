"""Machine-template files as a build leaves them, for tests of what prunes them."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ember.home import Home
from ember.vm.template import TemplateShape


def make_template(home: Home, tmp_path: Path, name: str = "a") -> tuple[TemplateShape, str]:
    """A template's files as a build leaves them (shape file, initrd, state, lock) for
    a shape over real files standing in for kernel, base initramfs and QEMU."""
    inputs = tmp_path / f"inputs-{name}"
    inputs.mkdir()
    for f in ("vmlinuz", "initrd.img", "qemu"):
        (inputs / f).write_bytes(f"{name} {f}".encode())
    shape = TemplateShape(
        kernel=inputs / "vmlinuz", base_initrd=inputs / "initrd.img", accel="tcg",
        memory_mib=512, cpus=1, cmdline=(), nics=1, vmm_binary=str(inputs / "qemu"),
    )  # fmt: skip
    key, d = shape.key(), home.templates
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{key}.json").write_text(json.dumps(asdict(shape), default=str))
    (d / f"{key}.initrd").write_bytes(b"i" * 1000)
    (d / f"{key}.vmstate").write_bytes(b"s" * 5000)
    (d / f"{key}.lock").touch()
    return shape, key


def age(home: Home, key: str, seconds: float) -> None:
    meta = home.templates / f"{key}.json"
    then = time.time() - seconds
    os.utime(meta, (then, then))
