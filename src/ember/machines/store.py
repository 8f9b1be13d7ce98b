"""Finding machines: by full id, id prefix or name; creating their directories."""

from __future__ import annotations

import builtins
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.home import Home
from ember.locks import FileLock
from ember.machines.errors import AmbiguousMachine, DamagedMachine, MachineNotFound, NameInUse
from ember.machines.options import check_name
from ember.machines.state import MachineState, read_state, write_state

_ADJECTIVES = (
    "amber", "brave", "calm", "clever", "eager", "fuzzy", "gentle", "happy", "jolly", "keen",
    "lively", "lucid", "mellow", "nimble", "proud", "quiet", "rapid", "shiny", "sunny", "witty",
)  # fmt: skip
_NOUNS = (
    "ash", "birch", "cedar", "cinder", "coal", "ember", "flame", "flare", "forge", "glow",
    "hearth", "kiln", "lantern", "match", "pyre", "spark", "torch", "wick", "blaze", "beacon",
)  # fmt: skip


def is_machine_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class MachineStore:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.root = home.machines

    def dir(self, machine_id: str) -> Path:
        if not is_machine_id(machine_id):
            raise MachineNotFound(f"invalid machine id {machine_id!r}")
        return self.root / machine_id

    @contextmanager
    def _names_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.home.machine_names_lock):
            yield

    def ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if is_machine_id(n))
        except FileNotFoundError:
            return []

    def list(self) -> list[MachineState]:
        """Every machine whose record reads (``scan`` also gives the others): one
        damaged record must not stop commands about the rest."""
        return self.scan()[0]

    def scan(self) -> tuple[builtins.list[MachineState], builtins.list[DamagedMachine]]:
        """(the readable machines, newest first; the damaged ones), in one pass."""
        good: builtins.list[MachineState] = []
        bad: builtins.list[DamagedMachine] = []
        for mid in self.ids():
            try:
                good.append(read_state(self.root / mid))
            except FileNotFoundError:
                continue  # being created or removed right now
            except DamagedMachine as e:
                bad.append(e)
        return sorted(good, key=lambda s: s.created_at, reverse=True), bad

    def _free_name(self, taken: set[str]) -> str:
        import random
        import secrets

        rng = random.SystemRandom()
        for _ in range(100):
            name = f"{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}"
            if name not in taken:
                return name
        return f"machine_{secrets.token_hex(4)}"

    def create(self, st: MachineState, name: str | None) -> Path:
        """Reserve the name and write the first state (the name is unique under a lock)."""
        with self._names_lock():
            taken = {m.name for m in self.list()}
            if name is None:
                name = self._free_name(taken)
            check_name(name)
            if name in taken:
                raise NameInUse(
                    f"the name {name!r} is already used by another machine",
                    hint=f"remove it (ember rm {name}) or choose another --name",
                )
            st.name = name
            d = self.dir(st.id)
            d.mkdir(mode=0o700)
            write_state(d, st)
            return d

    def find(self, ref: str) -> MachineState:
        """A machine by name, full id or unique id prefix (Docker's lookup order).

        An id (prefix) that names a machine with a damaged record raises
        DamagedMachine, which says how to remove it.
        """
        machines, damaged = self.scan()
        for m in machines:
            if m.name == ref or m.id == ref:
                return m
        if ref and all(c in "0123456789abcdef" for c in ref):
            hits = [m for m in machines if m.id.startswith(ref)]
            broken = [d for d in damaged if d.machine_id.startswith(ref)]
            if len(hits) + len(broken) > 1:
                raise AmbiguousMachine(
                    f"{ref!r} matches {len(hits) + len(broken)} machines: give more of the id"
                )
            if broken:
                raise broken[0]
            if hits:
                return hits[0]
        raise MachineNotFound(f"no such machine: {ref}")

    def remove_dir(self, machine_id: str) -> None:
        d = self.dir(machine_id)
        # rename first so that readers never see a half-deleted machine
        tomb = self.root / f".removing-{machine_id}"
        try:
            os.rename(d, tomb)
        except FileNotFoundError:
            return
        shutil.rmtree(tomb, ignore_errors=True)
