"""Which machine templates go: unused for long, or built from inputs since replaced."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from ember.home import Home
from ember.vm.template import MAX_TEMPLATES, UNUSED_FOR, find_template, keep_at_most, prune_unused
from tests.support.templates import age, make_template

WEEK_AND_A_DAY = UNUSED_FOR + 86400


def size(home: Home, key: str) -> int:
    return sum(p.stat().st_size for p in home.templates.glob(f"{key}.*"))


def files(home: Home) -> list[str]:
    return sorted(p.name for p in home.templates.iterdir())


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home").ensure()


def test_a_template_used_lately_stays_and_an_unused_one_goes(home: Home, tmp_path: Path) -> None:
    _, kept = make_template(home, tmp_path, "kept")
    _, old = make_template(home, tmp_path, "old")
    age(home, kept, UNUSED_FOR - 3600)
    age(home, old, WEEK_AND_A_DAY)
    expected = [(old, size(home, old))]
    assert prune_unused(home, dry_run=True) == expected
    assert f"{old}.vmstate" in files(home)  # a dry run removes nothing
    assert prune_unused(home) == expected
    assert [f for f in files(home) if f.startswith(old)] == []  # its lock too
    assert f"{kept}.vmstate" in files(home)


def test_finding_a_template_counts_as_using_it(home: Home, tmp_path: Path) -> None:
    shape, key = make_template(home, tmp_path)
    age(home, key, WEEK_AND_A_DAY)
    assert find_template(home, shape) is not None
    assert prune_unused(home) == []


def test_a_template_of_replaced_inputs_goes_however_recent(home: Home, tmp_path: Path) -> None:
    shape, key = make_template(home, tmp_path)
    shape.kernel.write_bytes(b"a new kernel, another size")  # what an upgrade does
    expected = [(key, size(home, key))]
    assert prune_unused(home) == expected
    assert files(home) == []


def test_a_template_a_builder_holds_is_left_alone(home: Home, tmp_path: Path) -> None:
    _, key = make_template(home, tmp_path)
    age(home, key, WEEK_AND_A_DAY)
    with open(home.templates / f"{key}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert prune_unused(home) == []
    expected = [(key, size(home, key))]
    assert prune_unused(home) == expected


def test_a_builder_that_takes_the_lock_after_the_look_keeps_its_template(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruning looked whether a builder held the shape's lock, then unlinked the lock
    file: a builder that took it in between held a lock on a nameless file, and a third
    process made a new one and built beside it.  The lock is taken to remove it."""
    from ember.vm import template

    _, key = make_template(home, tmp_path)
    age(home, key, WEEK_AND_A_DAY)
    lock_path = home.templates / f"{key}.lock"
    monkeypatch.setattr(template, "building", lambda d, k: False)  # the look said free
    with open(lock_path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ... and a builder took it just after
        assert prune_unused(home) == []
        assert lock_path.exists() and (home.templates / f"{key}.vmstate").exists()
    expected = [(key, size(home, key))]
    assert prune_unused(home) == expected
    assert not lock_path.exists()


def test_no_templates_directory_is_nothing_to_do(home: Home) -> None:
    assert prune_unused(home) == []


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "7"])
def test_a_damaged_shape_file_goes_instead_of_failing_gc(home: Home, text: str) -> None:
    """A shape file holding valid JSON that is not an object was a TypeError traceback
    from ``ember gc``."""
    d = home.templates
    d.mkdir(parents=True)
    (d / "k.json").write_text(text)
    (d / "k.vmstate").write_bytes(b"s" * 10)
    assert prune_unused(home) == [("k", len(text) + 10)]
    assert files(home) == []


def test_no_more_than_max_templates_are_kept(home: Home, tmp_path: Path) -> None:
    """The shape holds --memory and --cpus: `run --memory 300`, `301`, `302`... had a
    template (~70 MB, a root boot) built for each, all kept for a week."""
    keys = []
    for i in range(MAX_TEMPLATES + 2):
        _, key = make_template(home, tmp_path, f"t{i}")
        age(home, key, 3600 * (MAX_TEMPLATES + 2 - i))  # t0 used longest ago
        keys.append(key)
    _, newest = make_template(home, tmp_path, "new")  # just built
    removed = keep_at_most(home.templates, MAX_TEMPLATES, newest)
    assert [k for k, _ in removed] == [keys[2], keys[1], keys[0]]  # the least used go
    left = {p.name[: -len(".vmstate")] for p in home.templates.glob("*.vmstate")}
    assert left == {newest, *keys[3:]} and len(left) == MAX_TEMPLATES
