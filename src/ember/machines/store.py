"""Finding machines: by full id, id prefix or name; creating their directories."""

from __future__ import annotations

import builtins
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ember.fsutil import old_directory, remove_tree, stale_temps, tree_bytes
from ember.home import Home
from ember.locks import FileLock, try_lock
from ember.machines.errors import AmbiguousMachine, DamagedMachine, MachineNotFound, NameInUse
from ember.machines.options import check_name
from ember.machines.state import MachineState, locked, read_state, state_path, write_state

_ADJECTIVES = (
    "amber", "brave", "calm", "clever", "eager", "fuzzy", "gentle", "happy", "jolly", "keen",
    "lively", "lucid", "mellow", "nimble", "proud", "quiet", "rapid", "shiny", "sunny", "witty",
)  # fmt: skip
_NOUNS = (
    "ash", "birch", "cedar", "cinder", "coal", "ember", "flame", "flare", "forge", "glow",
    "hearth", "kiln", "lantern", "match", "pyre", "spark", "torch", "wick", "blaze", "beacon",
)  # fmt: skip


#: what ``remove_dir`` renames a machine's directory to before deleting it
REMOVING = ".removing-"
#: leftovers of commands killed half-way (``MachineStore.sweep``) untouched for this long
#: are swept: a live command's are seconds old
LEFTOVER_AGE = 600.0


def is_machine_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def pick(
    ref: str, machines: Sequence[MachineState], damaged: Sequence[DamagedMachine] = ()
) -> MachineState:
    """The machine of ``machines`` (and ``damaged``, records that do not read) that ``ref``
    names: its name or full id first, else a unique id prefix (Docker's lookup order)."""
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


@dataclass
class Swept:
    """What ``MachineStore.sweep`` removed (or, without ``remove``, would remove)."""

    #: ``.removing-<id>`` and ``<id>`` without a record
    dirs: int = 0
    #: atomic_write temp files in the machines' directories
    temp_files: int = 0
    bytes: int = 0


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

    def create(
        self, st: MachineState, name: str | None, *, holding: FileLock | None = None
    ) -> Path:
        """Reserve the name and write the first state (the name is unique under a lock).
        ``holding``: a lock in the new directory taken before the record appears
        (``state.creating``)."""
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
            if holding is not None:
                holding.acquire()  # a new directory's: nobody else knows it yet
            write_state(d, st)
            return d

    @contextmanager
    def name_free(self, name: str, machine_id: str) -> Iterator[None]:
        """Under the names lock, ``name`` not taken by another machine (NameInUse): for
        ``rename``, which writes the name in the machine's record inside this block."""
        check_name(name)
        with self._names_lock():
            owner = next((m for m in self.list() if m.name == name), None)
            if owner is not None and owner.id != machine_id:
                raise NameInUse(
                    f"the name {name!r} is already used by machine {owner.id[:12]}",
                    hint=f"remove it (ember rm {name}) or choose another name",
                )
            yield

    def find(self, ref: str) -> MachineState:
        """A machine by name, full id or unique id prefix (Docker's lookup order).

        An id (prefix) that names a machine with a damaged record raises
        DamagedMachine, which says how to remove it.
        """
        return pick(ref, *self.scan())

    def remove_dir(self, machine_id: str) -> None:
        d = self.dir(machine_id)
        # rename first so that readers never see a half-deleted machine
        tomb = self.root / f"{REMOVING}{machine_id}"
        try:
            os.rename(d, tomb)
        except FileNotFoundError:
            return
        shutil.rmtree(tomb, ignore_errors=True)

    def sweep(
        self, older_than: float = LEFTOVER_AGE, *, remove: bool = True, now: float | None = None
    ) -> Swept:
        """Remove what commands killed half-way (SIGKILL) left under ``machines/`` and no
        other command ever removes, untouched for ``older_than`` seconds (``ember gc``):

        - ``.removing-<id>``: an ``ember rm`` killed while it deleted the renamed directory
          (its capped logs, its initrd);
        - ``<id>/`` with no ``state.json``: an ``ember run`` killed between making the
          directory and writing its first record, which no command lists or finds.  Only
          while nobody holds the names lock (``create`` makes the directory and writes
          the record under it) nor the machine's lock; nothing else of the machine exists
          yet (its disk and network come after the record);
        - ``atomic_write`` temp files in the machines' directories.

        ``remove=False``: count them, change nothing.  A directory's age is its last
        change (ctime: a rename makes it, and a deletion under way keeps it, recent).
        Nothing found through a symlink is followed.
        """
        now = time.time() if now is None else now
        swept = Swept()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return swept
        for name in names:
            if name.startswith(REMOVING) and is_machine_id(name[len(REMOVING) :]):
                tomb = self.root / name
                if old_directory(tomb, older_than, now):
                    _sweep_tree(tomb, remove, swept)
        ids = [n for n in names if is_machine_id(n)]
        unrecorded = [m for m in ids if self._unrecorded(m, older_than, now)]
        names_lock = try_lock(self.home.machine_names_lock) if unrecorded else None
        if names_lock is not None:
            try:
                gone = {m for m in unrecorded if self._sweep_unrecorded(m, remove, swept)}
            finally:
                names_lock.release()
            ids = [m for m in ids if m not in gone]
        for mid in ids:
            count, size = stale_temps(self.root / mid, older_than, remove=remove, now=now)
            swept.temp_files += count
            swept.bytes += size
        return swept

    def _unrecorded(self, machine_id: str, older_than: float, now: float) -> bool:
        d = self.root / machine_id
        return old_directory(d, older_than, now) and not os.path.lexists(state_path(d))

    def _sweep_unrecorded(self, machine_id: str, remove: bool, swept: Swept) -> bool:
        """Sweep ``machines/<id>``, found without a record, the names lock now held:
        whether it went (or would go)."""
        d = self.root / machine_id
        lock_path = locked(d).path
        if not remove and not os.path.lexists(lock_path):
            return _sweep_tree(d, False, swept)  # nobody holds it (a dry run makes no lock)
        try:
            lock = try_lock(lock_path)
        except OSError:  # "lock" is a symlink, or the directory went
            return False
        if lock is None:
            return False  # a command is at it
        try:
            if os.path.lexists(state_path(d)):
                return False
            if not remove:
                return _sweep_tree(d, False, swept)
            tomb = self.root / f"{REMOVING}{machine_id}"
            try:
                os.rename(d, tomb)  # as remove_dir does: a failure below leaves a tombstone
            except OSError:
                return False
        finally:
            lock.release()
        return _sweep_tree(tomb, True, swept)


def _sweep_tree(path: Path, remove: bool, swept: Swept) -> bool:
    """Count the directory ``path`` in ``swept``, deleted if ``remove`` (never through a
    symlink: remove_tree opens every level O_NOFOLLOW); whether it went (or would go)."""
    size = tree_bytes(path)
    if remove:
        try:
            remove_tree(path)
        except OSError:  # gone meanwhile (another sweep), or a symlink put in its place
            return False
    swept.dirs += 1
    swept.bytes += size
    return True

