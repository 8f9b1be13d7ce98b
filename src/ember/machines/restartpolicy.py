"""``--restart`` (pure): when the monitor runs a machine again after it ended.

Docker's policies: ``no`` (the default), ``on-failure[:MAX]`` (a non-zero exit,
at most MAX restarts when given), ``always`` and ``unless-stopped``.  Without a
daemon that restarts with the host, ``always`` and ``unless-stopped`` behave
the same here: a machine stopped or killed with ``ember stop``/``kill`` stays
stopped; ``ember start`` of it resumes the policy.  Between runs the monitor waits
100 ms, doubling after each restart up to a minute, and back to 100 ms after a
run that lasted 10 s or more (Docker's backoff).
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.machines.errors import InvalidOption

POLICIES = ("no", "on-failure", "always", "unless-stopped")
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 60.0
#: a run at least this long resets the backoff
STEADY_S = 10.0


@dataclass(frozen=True)
class RestartPolicy:
    name: str = "no"
    #: on-failure only: restarts at most (0: no limit)
    max_retries: int = 0

    def __str__(self) -> str:
        return f"{self.name}:{self.max_retries}" if self.max_retries else self.name

    def should_restart(self, exit_code: int | None, restarts: int, stopped_by_user: bool) -> bool:
        """After a run that ended with ``exit_code``, the ``restarts``-th so far."""
        if self.name == "no" or stopped_by_user:
            return False
        if self.name == "on-failure":
            failed = exit_code != 0
            return failed and (self.max_retries == 0 or restarts < self.max_retries)
        return True


def parse_restart_policy(text: str) -> RestartPolicy:
    name, colon, count = text.strip().partition(":")
    if name not in POLICIES:
        raise InvalidOption(
            f"invalid --restart {text!r}: expected no, on-failure[:MAX], always or unless-stopped"
        )
    if not colon:
        return RestartPolicy(name)
    if name != "on-failure":
        raise InvalidOption(f"invalid --restart {text!r}: only on-failure takes a maximum")
    if not (count.isascii() and count.isdigit()) or len(count) > 6:
        raise InvalidOption(
            f"invalid --restart {text!r}: the maximum retry count must be a whole number, 0 or more"
        )
    return RestartPolicy(name, int(count))


def backoff_s(previous_delay: float | None, last_run_s: float) -> float:
    """How long to wait before the next run."""
    if previous_delay is None or last_run_s >= STEADY_S:
        return FIRST_DELAY_S
    return min(previous_delay * 2, MAX_DELAY_S)
