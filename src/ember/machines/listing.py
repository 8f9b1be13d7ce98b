"""Which machines ``ember ps`` lists: docker's ``--filter``, ``-n/--last``, ``-l`` and ``-a``.

Pure: the caller reads the records, says what state each one is in (``restarting``
needs its monitor asked) and which images ``ancestor=`` names (a store lookup).
How filters combine: ``ember.filters``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ember import filters
from ember.filters import labels_match, matches
from ember.machines.errors import InvalidOption
from ember.machines.state import RUNNING, MachineState
from ember.machines.store import pick

#: the states docker's ``status=`` takes (ember's machines are never being removed as
#: listed, or dead: those values are valid and match nothing)
STATES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")
KEYS = ("ancestor", "before", "exited", "id", "label", "name", "since", "status")


class InvalidFilter(InvalidOption, filters.InvalidFilter):
    """A ``--filter`` that is not KEY=VALUE, has an unknown key or a bad value."""


@dataclass(frozen=True)
class Filters:
    #: key -> its values, in the order given
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> Filters:
        try:
            found = filters.parse_filters(specs, KEYS)
            for key, values in found.items():
                for value in values:
                    _check_value(key, value)
        except filters.InvalidFilter as e:
            raise InvalidFilter(e.message, hint=e.hint) from None
        return cls(found)

    def __bool__(self) -> bool:
        return bool(self.values)

    def get(self, key: str) -> tuple[str, ...]:
        return self.values.get(key, ())

    @property
    def implies_all(self) -> bool:
        """``status=`` lists stopped machines without ``-a`` (docker: ``ps -f status=exited``)."""
        return "status" in self.values


def _check_value(key: str, value: str) -> None:
    if key == "status" and value not in STATES:
        raise InvalidFilter(
            f"invalid filter 'status={value}'", hint=f"states: {', '.join(STATES)}"
        )
    if key == "exited":
        try:
            int(value, 10)
        except ValueError:
            raise InvalidFilter(f"invalid filter 'exited={value}': not an exit code") from None
    if key in ("id", "name"):
        filters.check_pattern(key, value)
    if key in ("before", "since", "ancestor", "label") and not value:
        raise InvalidFilter(f"invalid filter '{key}=': it needs a value")


def select(
    machines: Sequence[MachineState],
    wanted: Filters,
    *,
    state_of: Callable[[MachineState], str],
    show_all: bool = False,
    last: int | None = None,
    ancestry: Collection[str] = (),
) -> list[MachineState]:
    """The machines ``ps`` lists, of ``machines`` (newest first, as ``MachineStore.scan``
    gives them).  ``state_of``: a machine's docker state (``created``, ``running``,
    ``restarting``, ``exited``); ``last``: the ``last`` newest, whatever their state,
    after the filters ``wanted``; ``ancestry``: the manifest digests and image names ``ancestor=``
    filters stand for.  ``before=``/``since=`` name a machine of ``machines`` (a
    ``MachineNotFound`` otherwise)."""
    show_all = show_all or wanted.implies_all or last is not None
    # before=X: created before X, after it in this order; since=X: created after it
    after = max((machines.index(pick(v, machines)) for v in wanted.get("before")), default=-1)
    until = min((machines.index(pick(v, machines)) for v in wanted.get("since")), default=len(machines))
    codes = {int(v, 10) for v in wanted.get("exited")}
    chosen: list[MachineState] = []
    for m in machines[after + 1 : until]:
        if last is not None and len(chosen) >= last:
            break
        state = state_of(m)
        if not show_all and state not in (RUNNING, "paused", "restarting"):
            continue
        if not all(any(matches(p, text) for p in wanted.get(key))
                   for key, text in (("name", m.name), ("id", m.id)) if wanted.get(key)):  # fmt: skip
            continue
        if not labels_match(wanted.get("label"), m.labels):
            continue
        if codes and (state in (RUNNING, "paused") or m.started_at is None or m.exit_code not in codes):
            continue
        if wanted.get("status") and state not in wanted.get("status"):
            continue
        if wanted.get("ancestor") and not (m.image_digest in ancestry or m.image in ancestry):
            continue
        chosen.append(m)
    return chosen

