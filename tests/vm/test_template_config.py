"""The run config records of templates (pure): render, parse, the restore message."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from ember.home import Home
from ember.vm.errors import InvalidRunConfig, NoCommand
from ember.vm.runconfig import RunConfig, restore_message
from ember.vm.template import LATE_MODULES, TemplateShape, _shape_from_json, template_config


def test_template_config_has_no_command_and_names_the_late_modules() -> None:
    rendered = template_config().render()
    assert b"\ntemplate\n" in rendered and rendered.endswith(b"end\n")
    back = RunConfig.parse(rendered)
    assert back.template and back.argv == () and back.late == LATE_MODULES


def test_an_ordinary_config_still_needs_a_command() -> None:
    with pytest.raises(NoCommand):
        RunConfig(argv=())


def test_restore_message_adds_clock_and_seed_before_end() -> None:
    rc = RunConfig(argv=("echo", "hi"), macs=(("eth0", "02:ee:ac:1e:00:02"),))
    msg = restore_message(rc.render(), 1_795_862_814_123_456_789, bytes(range(64)))
    lines = msg.decode().splitlines()
    assert lines[-1] == "end"
    assert lines[-3] == "clock 1795862814 123456789"
    assert lines[-2] == "seed " + bytes(range(64)).hex()
    assert RunConfig.parse(msg).macs == (("eth0", "02:ee:ac:1e:00:02"),)


@pytest.mark.parametrize("seed", [b"", b"x" * 15, b"x" * 257])
def test_restore_message_refuses_a_bad_seed(seed: bytes) -> None:
    with pytest.raises(InvalidRunConfig, match="seed"):
        restore_message(RunConfig(argv=("true",)).render(), 0, seed)


def test_restore_message_needs_a_rendered_config() -> None:
    with pytest.raises(InvalidRunConfig, match="end record"):
        restore_message(b"ember-run-config 1\narg true\n", 0, b"x" * 64)


@pytest.mark.parametrize("mac", ["02:ee:ac:1e:00", "02:EE:AC:1E:00:02", "02-ee-ac-1e-00-02", "zz:ee:ac:1e:00:02"])
def test_bad_mac_is_refused(mac: str) -> None:
    with pytest.raises(InvalidRunConfig, match="MAC"):
        RunConfig(argv=("true",), macs=(("eth0", mac),))


def test_records_appear_once() -> None:
    data = RunConfig(argv=("true",)).render().replace(b"end\n", b"template\ntemplate\nend\n")
    with pytest.raises(InvalidRunConfig, match="twice"):
        RunConfig.parse(data)


def test_shape_key_follows_its_inputs(tmp_path: Path) -> None:
    kernel, initrd, vmm = (tmp_path / n for n in ("vmlinux", "base.cpio", "qemu"))
    for p in (kernel, initrd, vmm):
        p.write_bytes(b"x")
    shape = TemplateShape(kernel, initrd, "tcg", 512, 1, (), 1, str(vmm))
    same = _shape_from_json(json.loads(json.dumps(asdict(shape), default=str)))
    assert same == shape and same.key() == shape.key()
    other_memory = TemplateShape(kernel, initrd, "tcg", 256, 1, (), 1, str(vmm))
    assert other_memory.key() != shape.key()
    before = shape.key()
    initrd.write_bytes(b"a new ember-init")  # a rebuilt base initramfs makes a new template
    assert shape.key() != before


def test_shape_key_follows_how_ember_drives_the_vmm_and_the_host_cpu_under_kvm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change to ember's QEMU command line (devices, options) or late modules without a
    TEMPLATE_VERSION bump kept restoring old templates; under KVM so did a host whose CPU
    features changed (a microcode update, a mitigation)."""
    from ember.vm import template

    kernel, initrd, vmm = (tmp_path / n for n in ("vmlinux", "base.cpio", "qemu"))
    for p in (kernel, initrd, vmm):
        p.write_bytes(b"x")
    tcg = TemplateShape(kernel, initrd, "tcg", 512, 1, (), 1, str(vmm))
    kvm = TemplateShape(kernel, initrd, "kvm", 512, 1, (), 1, str(vmm))
    keys = (tcg.key(), kvm.key())
    monkeypatch.setattr(template, "_vmm_code_fingerprint", lambda: b"another qemu.py")
    assert tcg.key() != keys[0] and kvm.key() != keys[1]
    monkeypatch.undo()
    monkeypatch.setattr(template, "_host_cpu_fingerprint", lambda: b"fewer flags")
    assert tcg.key() == keys[0] and kvm.key() != keys[1]  # TCG emulates its own CPU


def test_a_failed_build_is_not_retried_at_once(tmp_path: Path) -> None:
    """A shape whose template cannot be built (here: a kernel QEMU cannot boot) leaves
    a marker; builds of that shape are then not started again for a while."""

    from ember.home import Home
    from ember.vm.template import build_in_background

    home = Home(tmp_path / "home")
    shape = _unbootable_shape(tmp_path)
    res = _run_builder(home, shape)
    assert res.returncode == 1, res.stderr
    assert b"template build failed" in res.stderr
    marker = home.templates / f"{shape.key()}.failed"
    assert marker.is_file()
    assert not list(home.templates.glob("*.vmstate"))
    build_in_background(home, shape)  # within RETRY_AFTER: starts nothing
    # (a builder it starts has its build.log opened before it returns)
    assert not (home.templates / "build.log").exists()
    assert not list(home.templates.glob(".build-*"))


def test_the_builder_refuses_a_bad_shape(tmp_path: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "ember.vm.template"], input=b'{"kernel": 1}',
        env={"EMBER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True,
    )  # fmt: skip
    assert res.returncode == 2 and b"bad shape" in res.stderr


def test_no_more_than_max_builders_at_once(tmp_path: Path) -> None:
    """Review finding: every --memory/--cpus value is a shape, each shape started a
    builder (a root VM) at once: a loop over values ran as many as it liked."""

    from ember.home import Home
    from ember.locks import FileLock
    from ember.vm.template import MAX_BUILDERS

    home = Home(tmp_path / "home")
    home.templates.mkdir(parents=True)
    shape = _unbootable_shape(tmp_path)
    busy = [FileLock(home.templates / f".builder-{i}.lock") for i in range(MAX_BUILDERS)]
    for lock in busy:  # what running builders hold
        lock.acquire()
    try:
        res = _run_builder(home, shape)
    finally:
        for lock in busy:
            lock.release()
    assert res.returncode == 0 and b"enough builders are running" in res.stderr, res.stderr
    assert not (home.templates / f"{shape.key()}.failed").exists()  # not tried at all


def test_a_template_discarded_twice_is_not_built_again_at_once(tmp_path: Path) -> None:
    """Review finding: a template that never restores was discarded and rebuilt by the
    next machine of its shape, each time a root boot and a failed restore.  It is
    rebuilt once; a second discard within the retry time blocks the shape's builds."""
    from ember.vm.template import Template, build_in_background, discard_template

    home = Home(tmp_path / "home")
    home.templates.mkdir(parents=True)
    shape = _unbootable_shape(tmp_path)
    key = shape.key()

    def discard() -> None:
        for suffix in (".vmstate", ".initrd", ".json"):
            (home.templates / f"{key}{suffix}").write_bytes(b"x")
        discard_template(
            Template(home.templates / f"{key}.vmstate", home.templates / f"{key}.initrd")
        )

    discard()
    assert sorted(p.name for p in home.templates.iterdir()) == [f"{key}.discarded"]
    discard()  # the rebuilt one failed too
    assert f"{key}.failed" in [p.name for p in home.templates.iterdir()]
    build_in_background(home, shape)  # within RETRY_AFTER: starts nothing
    assert not (home.templates / "build.log").exists()


def test_a_discard_leaves_a_template_published_since_the_failed_one(tmp_path: Path) -> None:
    """The failed restore's discard removed whatever had the key's name by then: a good
    template a build had just published went with the one that failed."""
    from ember.vm.template import Template, discard_template, state_identity

    d = tmp_path / "templates"
    d.mkdir()
    template = Template(d / "k.vmstate", d / "k.initrd")
    for suffix in (".vmstate", ".initrd", ".json"):
        (d / f"k{suffix}").write_bytes(b"failed")
    failed = state_identity(template)
    new = d / "new.vmstate"
    new.write_bytes(b"published since")
    new.replace(template.state)  # a build renames its state file in last
    discard_template(template, failed)
    assert template.state.read_bytes() == b"published since"
    discard_template(template, state_identity(template))  # that one failing: it goes
    assert not template.state.exists()


def _unbootable_shape(tmp_path: Path) -> TemplateShape:
    """A shape whose kernel QEMU refuses at once (no VM boots)."""
    from ember.vm.vmm.qemu import find_qemu

    kernel, initrd = tmp_path / "vmlinux", tmp_path / "base.cpio"
    kernel.write_bytes(b"\x7fELF not a kernel")
    initrd.write_bytes(b"")
    return TemplateShape(kernel, initrd, "tcg", 128, 1, (), 0, find_qemu())


def _run_builder(home: Home, shape: TemplateShape) -> subprocess.CompletedProcess[bytes]:
    """``python -m ember.vm.template`` for ``shape``, with ``home`` as its state dir."""
    return subprocess.run(
        [sys.executable, "-m", "ember.vm.template"],
        input=json.dumps(asdict(shape), default=str).encode(),
        env={"EMBER_HOME": str(home.root), "PATH": "/usr/bin:/bin"},
        capture_output=True, timeout=120,
    )  # fmt: skip
