"""What the applier child's own interpreter may do inside the root it applies to: read
no file there that the layer did not ask it to write.

The child runs as root with every capability, chroot-ed into files a layer wrote.
Python itself reads files when it imports a module or looks up the source line of
a traceback; inside the chroot those are the layer's.  A layer that planted a
``# coding: NAME`` line at the path of a source file of the applier and a module
``encodings/NAME.py`` had its code run as root when the child described an
internal error (code that can leave a chroot)."""

from __future__ import annotations

import encodings
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.process import reap_exiting
from ember.unpack import UnpackError, applier, sandbox
from tests.unpack.layers import Layers, reg

CODEC = "embertrap"


def _broken_finish(self: applier.LayerApplier) -> None:
    raise RuntimeError("boom")


@pytest.fixture(params=["forked", "spare"])
def broken_applier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An applier with a bug that ends every layer in an internal error, in the child
    forked by the apply and in a spare session child forked after the change."""
    monkeypatch.setattr(applier.LayerApplier, "_finish_dirs", _broken_finish)
    reap_exiting()
    if request.param == "spare":
        sandbox.fork_spare_session()
    try:
        yield
    finally:
        leftover = sandbox.dismiss_spare()
        if leftover is not None:
            os.waitpid(leftover, 0)


def test_an_internal_error_reads_no_source_file_of_the_root(
    broken_applier: None, root: Path, layers: Layers
) -> None:
    cookie = f"# -*- coding: {CODEC} -*-\n".encode()
    sources = {sandbox.__file__, applier.__file__, __file__}
    trap = [reg(path.lstrip("/"), cookie) for path in sorted(sources)]
    trap.append(reg(
        f"{Path(encodings.__file__).parent}/{CODEC}.py".lstrip("/"),
        b"open('/CODE_RAN', 'w').write('layer code ran as root')\n",
    ))
    with pytest.raises(UnpackError, match=r"internal error in the layer applier: RuntimeError: boom "
                                          r"\[.*_broken_finish:\d+\]"):
        layers.apply(root, trap)
    assert not (root / "CODE_RAN").exists()
    assert (root / __file__.lstrip("/")).read_bytes() == cookie  # the trap was laid
