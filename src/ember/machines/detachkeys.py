"""Docker's detach keys (pure): Ctrl-P then Ctrl-Q, typed to an attached terminal
(``ember run -it``, ``ember attach``), lets go of the machine and leaves it running.

The bytes that could begin the sequence are held back until the next one says
whether they do; any other byte lets them go on to the machine as they were typed.
"""

from __future__ import annotations

#: Ctrl-P, Ctrl-Q (docker's default)
DEFAULT = b"\x10\x11"


class DetachKeys:
    def __init__(self, sequence: bytes = DEFAULT) -> None:
        if not sequence:
            raise ValueError("an empty detach sequence")
        self.sequence = sequence
        self._held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """What of ``data`` goes on to the machine, and whether the sequence was typed
        (what follows it in ``data`` is dropped then: the client lets go)."""
        out = bytearray()
        for byte in data:
            one = bytes([byte])
            if self.sequence.startswith(self._held + one):
                self._held += one
            else:
                out += self._held  # not the sequence after all; this byte may begin it
                self._held = b""
                if self.sequence.startswith(one):
                    self._held = one
                else:
                    out += one
            if self._held == self.sequence:
                self._held = b""
                return bytes(out), True
        return bytes(out), False
