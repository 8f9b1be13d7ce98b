"""The pull progress display: drawn with rich on a terminal, nothing otherwise."""

from __future__ import annotations

import io

from rich.console import Console

from ember.images.progress import PullProgress, RichPullProgress, make_progress
from ember.oci.digest import Digest
from ember.oci.manifest import Descriptor


def test_rich_display_shows_each_blob_and_the_total() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", Digest.of(b"layer"), 2048)
    with RichPullProgress(console) as display:
        display.set_total(2048)
        advance = display.blob(desc, "layer")
        advance(1024)
        advance(1024)
        display.message("pulled")
    text = out.getvalue()
    assert f"layer {desc.digest.short}" in text and "total" in text and "pulled" in text


def test_no_display_when_not_asked() -> None:
    assert type(make_progress(False)) is PullProgress
    assert isinstance(make_progress(True), RichPullProgress)
