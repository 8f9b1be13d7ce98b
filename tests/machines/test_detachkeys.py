"""Docker's detach keys, Ctrl-P Ctrl-Q, as typed in pieces (pure)."""

from __future__ import annotations

import pytest

from ember.machines.detachkeys import DetachKeys


def feed_all(keys: DetachKeys, *chunks: bytes) -> tuple[bytes, bool]:
    sent = b""
    for chunk in chunks:
        out, detached = keys.feed(chunk)
        sent += out
        if detached:
            return sent, True
    return sent, False


@pytest.mark.parametrize(
    ("chunks", "sent", "detached"),
    [
        ((b"ls\r",), b"ls\r", False),
        ((b"ab\x10\x11cd",), b"ab", True),  # what follows is not sent: the client lets go
        ((b"ab\x10", b"\x11"), b"ab", True),  # split across two reads
        ((b"\x10x",), b"\x10x", False),  # Ctrl-P alone goes on to the program
        ((b"\x10", b"x"), b"\x10x", False),
        ((b"\x10\x10\x11",), b"\x10", True),  # a second Ctrl-P begins the sequence again
        ((b"\x11\x10",), b"\x11", False),  # held back: it may begin the sequence
    ],
)
def test_the_sequence_is_found_across_reads(chunks: tuple[bytes, ...], sent: bytes, detached: bool) -> None:
    assert feed_all(DetachKeys(), *chunks) == (sent, detached)


def test_held_bytes_go_on_once_the_next_says_they_are_not_the_sequence() -> None:
    keys = DetachKeys()
    assert keys.feed(b"\x10") == (b"", False)
    assert keys.feed(b"a") == (b"\x10a", False)


def test_an_empty_sequence_is_refused() -> None:
    with pytest.raises(ValueError):
        DetachKeys(b"")
