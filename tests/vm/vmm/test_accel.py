"""Accelerator choice: the env override, the cache, and one real probe."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ember.home import Home
from ember.vm.kernel import KernelInfo
from ember.vm.vmm.accel import cache_key, cache_path, detect_accel, kvm_usable_device
from ember.vm.vmm.errors import VMMError


def test_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_ACCEL", "tcg")
    assert detect_accel(Home(tmp_path), Path("/nonexistent")) == "tcg"
    monkeypatch.setenv("EMBER_ACCEL", "hvf")
    with pytest.raises(VMMError, match="EMBER_ACCEL"):
        detect_accel(Home(tmp_path), Path("/nonexistent"))


@pytest.mark.vm
def test_probe_once_then_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel: KernelInfo
) -> None:
    monkeypatch.delenv("EMBER_ACCEL", raising=False)
    home = Home(tmp_path)
    first = detect_accel(home, kernel.vmlinux, quiet=True)
    assert first in ("kvm", "tcg")
    if not kvm_usable_device():
        assert first == "tcg"
        return
    key = cache_key(kernel.vmlinux)
    assert json.loads(cache_path(home).read_text()) == {key: first}
    # the cached answer is used as is: plant the other one and see it come back
    other = "kvm" if first == "tcg" else "tcg"
    cache_path(home).write_text(json.dumps({key: other}))
    assert detect_accel(home, kernel.vmlinux, quiet=True) == other


@pytest.mark.vm
def test_a_fallback_to_tcg_is_a_warning_of_the_vm_logger(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    kernel: KernelInfo,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The CLI shows ember.vm's warnings as ``ember: ...`` lines (``warnings_as_messages``);
    the probe's verdict is said when it is made, not again when the cache answers."""
    monkeypatch.delenv("EMBER_ACCEL", raising=False)
    home = Home(tmp_path)
    with caplog.at_level(logging.WARNING, "ember.vm"):
        accel = detect_accel(home, kernel.vmlinux)
        assert detect_accel(home, kernel.vmlinux) == accel
        detect_accel(home, kernel.vmlinux, quiet=True)
    said = [r.getMessage() for r in caplog.records if r.name == "ember.vm"]
    if accel == "kvm":
        assert said == []
    elif kvm_usable_device():
        # why: the probe timed out or failed, or /dev/kvm is root's group (this host's),
        # which a confined VMM is never given
        assert len(said) == 1, said
        assert said[0].startswith("/dev/kvm ") and said[0].endswith(
            ": using TCG (software emulation, slower)"
        ), said
    else:  # no probe, nothing cached: each detection says it
        assert said == ["/dev/kvm is not available: using TCG (software emulation, slower)"] * 2
