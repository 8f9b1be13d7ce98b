"""``--restart`` policies and backoff (pure)."""

import pytest

from ember.machines.errors import InvalidOption
from ember.machines.restartpolicy import (
    FIRST_DELAY_S,
    MAX_DELAY_S,
    RestartPolicy,
    backoff_s,
    parse_restart_policy,
)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("no", RestartPolicy("no")),
        ("always", RestartPolicy("always")),
        ("unless-stopped", RestartPolicy("unless-stopped")),
        ("on-failure", RestartPolicy("on-failure", 0)),
        ("on-failure:5", RestartPolicy("on-failure", 5)),
    ],
)
def test_parse(text: str, want: RestartPolicy) -> None:
    assert parse_restart_policy(text) == want
    assert parse_restart_policy(str(want)) == want


@pytest.mark.parametrize(
    "text", ["", "yes", "always:3", "on-failure:", "on-failure:-1", "on-failure:x", "on-failure:9999999",
             "on-failure:\u0663"]
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidOption):
        parse_restart_policy(text)


def test_a_negative_maximum_is_named_as_such() -> None:
    with pytest.raises(InvalidOption, match="retry count must be a whole number, 0 or more"):
        parse_restart_policy("on-failure:-1")


def test_decisions() -> None:
    assert not RestartPolicy("no").should_restart(1, 0, False)
    assert RestartPolicy("always").should_restart(0, 100, False)
    assert RestartPolicy("unless-stopped").should_restart(0, 0, False)
    assert not RestartPolicy("always").should_restart(1, 0, True)  # ember stop/kill
    on_failure = RestartPolicy("on-failure", 2)
    assert not on_failure.should_restart(0, 0, False)
    assert on_failure.should_restart(1, 1, False)
    assert not on_failure.should_restart(1, 2, False)
    assert RestartPolicy("on-failure").should_restart(137, 1000, False)
    assert RestartPolicy("on-failure").should_restart(None, 0, False)  # ended without a code


def test_backoff_doubles_up_to_a_cap_and_resets_after_a_steady_run() -> None:
    delays = []
    d = None
    for _ in range(12):
        d = backoff_s(d, 0.5)
        delays.append(d)
    assert delays[:3] == [FIRST_DELAY_S, FIRST_DELAY_S * 2, FIRST_DELAY_S * 4]
    assert delays[-1] == MAX_DELAY_S
    assert backoff_s(MAX_DELAY_S, 30.0) == FIRST_DELAY_S
