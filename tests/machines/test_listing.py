"""Which machines ``ember ps`` lists (``machines.listing``): docker's filters and limits."""

from __future__ import annotations

import pytest

from ember.machines import state as mstate
from ember.machines.errors import AmbiguousMachine, MachineNotFound
from ember.machines.listing import Filters, InvalidFilter, select
from ember.machines.state import MachineState, VMConfig

DIGEST_A, DIGEST_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def machine(name: str, n: int, status: str, **kw: object) -> MachineState:
    """Machine ``n`` (ids ``n`` repeated; created at second ``n``: higher is newer)."""
    return MachineState(
        id=f"{n:x}" * 64, name=name, image=kw.pop("image", "docker.io/library/busybox:latest"),  # type: ignore[arg-type]
        image_digest=kw.pop("image_digest", DIGEST_A),  # type: ignore[arg-type]
        created_at=f"2026-11-30T10:00:{n:02d}Z", command=["true"], config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1), status=status, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def fleet() -> list[MachineState]:
    """Newest first, as ``MachineStore.scan`` gives them."""
    return [
        machine("web-2", 6, mstate.RUNNING, started_at="x", labels={"app": "web", "tier": "front"}),
        machine("web-1", 5, mstate.RUNNING, started_at="x", labels={"app": "web"}),
        machine("job", 4, mstate.EXITED, started_at="x", exit_code=3, image="localhost:5000/job:1",
                image_digest=DIGEST_B),  # fmt: skip
        machine("done", 3, mstate.EXITED, started_at="x", exit_code=0),
        machine("again", 2, mstate.EXITED, started_at="x", exit_code=1),  # restarting, below
        machine("fresh", 1, mstate.CREATED),
    ]


def state_of(m: MachineState) -> str:
    return "restarting" if m.name == "again" else m.status


def names(filters: list[str], **kw: object) -> list[str]:
    chosen = select(fleet(), Filters.parse(filters), state_of=state_of, **kw)  # type: ignore[arg-type]
    return [m.name for m in chosen]


def test_without_filters_running_and_restarting_ones_or_all_with_a() -> None:
    assert names([]) == ["web-2", "web-1", "again"]
    assert names([], show_all=True) == ["web-2", "web-1", "job", "done", "again", "fresh"]


def test_last_n_and_latest_count_machines_of_any_state_after_the_filters() -> None:
    assert names([], last=1) == ["web-2"]
    assert names([], last=4) == ["web-2", "web-1", "job", "done"]
    assert names(["label=app=web"], last=5) == ["web-2", "web-1"]
    assert names(["status=exited"], last=1) == ["job"]


def test_name_and_id_are_regular_expressions_found_anywhere_any_value_matching() -> None:
    assert names(["name=web"]) == ["web-2", "web-1"]
    assert names(["name=^web-1$"]) == ["web-1"]
    assert names(["name=web-1", "name=again"]) == ["web-1", "again"]
    assert names(["id=^5"], show_all=True) == ["web-1"]
    assert names(["id=" + "4" * 64], show_all=True) == ["job"]
    # different keys must all match
    assert names(["name=web", "id=^6"]) == ["web-2"]


def test_labels_must_all_match_key_or_key_and_value() -> None:
    assert names(["label=app"]) == ["web-2", "web-1"]
    assert names(["label=app=web", "label=tier=front"]) == ["web-2"]
    assert names(["label=tier=back"]) == []
    assert names(["label=app=we"]) == []  # values are compared whole


def test_status_lists_stopped_machines_without_a_and_takes_any_of_its_values() -> None:
    assert names(["status=exited"]) == ["job", "done"]
    assert names(["status=created", "status=restarting"]) == ["again", "fresh"]
    assert names(["status=paused"]) == []  # valid, never the case here


def test_exited_matches_the_code_of_a_machine_that_ran_and_ended() -> None:
    assert names(["exited=3"], show_all=True) == ["job"]
    assert names(["exited=0", "exited=3"], show_all=True) == ["job", "done"]
    assert names(["exited=3"]) == []  # stopped machines need -a, as docker's


def test_ancestor_matches_the_recorded_image_name_or_manifest_digest() -> None:
    assert names(["ancestor=x"], show_all=True, ancestry={DIGEST_B}) == ["job"]
    got = names(["ancestor=x"], show_all=True, ancestry={"docker.io/library/busybox:latest"})
    assert got == ["web-2", "web-1", "done", "again", "fresh"]
    assert names(["ancestor=x"], show_all=True, ancestry=set()) == []


def test_before_and_since_name_a_machine_by_name_or_id_prefix() -> None:
    assert names(["before=job"], show_all=True) == ["done", "again", "fresh"]
    assert names(["since=done"], show_all=True) == ["web-2", "web-1", "job"]
    assert names(["since=" + "2" * 12, "before=web-1"], show_all=True) == ["job", "done"]
    assert names(["since=web-2"], show_all=True) == []
    with pytest.raises(MachineNotFound):
        names(["before=nobody"])


def test_a_before_prefix_of_several_ids_is_ambiguous() -> None:
    ms = [machine("x", 1, mstate.CREATED), machine("y", 1, mstate.CREATED)]
    ms[1].id = "1" * 63 + "2"
    with pytest.raises(AmbiguousMachine):
        select(ms, Filters.parse(["before=111"]), state_of=state_of)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("status", "expected KEY=VALUE"),
        ("=x", "expected KEY=VALUE"),
        ("colour=red", "invalid filter 'colour'"),
        ("status=gone", "invalid filter 'status=gone'"),
        ("exited=one", "not an exit code"),
        ("name=(", "invalid filter 'name=('"),
        ("before=", "needs a value"),
    ],
)
def test_bad_filters_are_refused_with_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(InvalidFilter, match=words.replace("(", r"\(")):
        Filters.parse([spec])


def test_keys_are_read_as_docker_reads_them() -> None:
    parsed = Filters.parse([" Status = exited ", "label=a=b=c"])
    assert parsed.get("status") == ("exited",)
    assert parsed.get("label") == ("a=b=c",)  # the value keeps its own '='
    assert parsed.implies_all and not Filters.parse(["name=x"]).implies_all


def test_a_paused_machine_is_listed_without_a_and_matches_status_paused_only() -> None:
    def paused_web_1(m: MachineState) -> str:
        return "paused" if m.name == "web-1" else state_of(m)

    def pick(filters: list[str], **kw: object) -> list[str]:
        chosen = select(fleet(), Filters.parse(filters), state_of=paused_web_1, **kw)  # type: ignore[arg-type]
        return [m.name for m in chosen]

    assert pick([]) == ["web-2", "web-1", "again"]
    assert pick(["status=paused"]) == ["web-1"]
    assert pick(["status=running"]) == ["web-2"]
    assert pick(["exited=0"], show_all=True) == ["done"]  # a paused one has no exit code to match
