"""The per-process list of revoked API tokens (registry/server/revocations.py)."""

from ember.registry.server.revocations import CLOCK_MARGIN_S, REFRESH_S, Revocations
from ember.registry.server.tokens import TOKEN_TTL


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_fetched_once_then_again_after_the_refresh_period() -> None:
    mono, wall = Clock(100.0), Clock(1_000_000.0)
    rev = Revocations(clock=mono, wall=wall)
    asked: list[float] = []

    def fetch(since: float) -> list[str]:
        asked.append(since)
        return ["tok-a"] if len(asked) == 1 else ["tok-a", "tok-b"]

    assert rev.due() and "tok-a" not in rev
    rev.refresh(fetch)
    assert not rev.due()
    assert "tok-a" in rev and "tok-b" not in rev
    # only revocations that can still concern an unexpired registry token are asked for
    assert asked == [1_000_000.0 - TOKEN_TTL - CLOCK_MARGIN_S]
    mono.t += REFRESH_S - 0.1
    assert not rev.due()
    mono.t += 0.2
    assert rev.due()
    rev.refresh(fetch)
    assert "tok-b" in rev and len(asked) == 2


def test_the_list_is_replaced_not_grown() -> None:
    rev = Revocations(clock=Clock(0.0), wall=Clock(0.0))
    rev.refresh(lambda since: ["old"])
    rev.refresh(lambda since: [])
    assert "old" not in rev
