"""bench/_common.py: interleaved timing, section-wise recording, bench registry."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from bench import _common as bc


def test_alternate_interleaves_and_skips_warmup() -> None:
    calls: list[str] = []
    setups: list[str] = []
    timings = bc.alternate(
        {"ember": lambda: calls.append("e"), "anchor": lambda: calls.append("a")},
        runs=3,
        warmup=1,
        setup=setups.append,
    )
    assert calls == ["e", "a"] * 4
    assert setups == ["ember", "anchor"] * 4
    assert [len(t.samples) for t in timings.values()] == [3, 3]
    assert all(s >= 0 for t in timings.values() for s in t.samples)


def test_alternate_checks_each_call_right_after_it() -> None:
    events: list[str] = []
    bc.alternate(
        {"ember": lambda: events.append("run ember"), "anchor": lambda: events.append("run anchor")},
        runs=1,
        warmup=1,
        setup=lambda name: events.append(f"setup {name}"),
        after=lambda name: events.append(f"check {name}"),
    )
    one_round = ["setup ember", "run ember", "check ember", "setup anchor", "run anchor", "check anchor"]
    assert events == one_round * 2  # the warm-up round is checked too


def test_a_check_that_fails_stops_the_timing() -> None:
    def check(name: str) -> None:
        if name == "ember":
            raise SystemExit("ABORTED: ember's result is not umoci's")

    with pytest.raises(SystemExit, match="ABORTED"):
        bc.alternate({"ember": lambda: None, "anchor": lambda: None}, runs=3, after=check)


def test_require_same_tree_aborts_on_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a" / "etc").mkdir(parents=True)
    (tmp_path / "a" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "b" / "etc").mkdir(parents=True)
    (tmp_path / "b" / "lost+found").mkdir()
    with pytest.raises(SystemExit, match=r"only in a: etc/passwd"):
        bc.require_same_tree("test", tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    bc.require_same_tree("test", tmp_path / "a", tmp_path / "b")  # lost+found ignored


def test_agent_env_drops_ember_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_AGENT", "0")  # would make the client run the command itself
    env = bc.agent_env(tmp_path / "home", tmp_path / "src")
    assert "EMBER_AGENT" not in env
    assert env["EMBER_HOME"] == str(tmp_path / "home")
    assert env["PYTHONPATH"] == str(tmp_path / "src")


def test_confirm_served_reads_the_agents_log(tmp_path: Path) -> None:
    """The lines ember agent writes (src/ember/agent/server.py, Agent._serve_one/_decline)."""
    agent = bc.HostAgent("ember")
    agent.log_path = tmp_path / "agent.log"
    agent.log_path.write_text(
        "06:00:00 ember agent: serving /h on /h/run/agent.sock (pid 10)\n"
        "06:00:01 ember agent: pid 41: ember image unpack -> exit 0 (80 ms)\n"
        "06:00:02 ember agent: pid 42: ember image unpack -> exit 1 (80 ms)\n"
        "06:00:03 ember agent: declined pid 43: ember's code changed on disk\n"
        "06:00:04 ember agent: pid 44: ember  -> exit 0 (3 ms)\n"
    )
    agent.confirm_served(41, "image unpack")
    with pytest.raises(SystemExit, match="no such command"):  # served, but failed
        agent.confirm_served(42, "image unpack", timeout=0.05)
    with pytest.raises(SystemExit, match="declined"):
        agent.confirm_served(43, "image unpack", timeout=0.05)
    agent.confirm_served(44, "")  # `ember --version`: no words before its option
    with pytest.raises(SystemExit, match="no such command"):  # matched once only
        agent.confirm_served(41, "image unpack", timeout=0.05)


def test_ratio_line_uses_medians() -> None:
    ours = bc.Timing("ember", [1.0, 9.0, 2.0])
    anchor = bc.Timing("umoci", [4.0, 4.0, 100.0])
    assert ours.median == 2.0 and anchor.median == 4.0
    assert bc.ratio(ours, anchor) == 0.5
    line = bc.ratio_line("unpack debian", ours, anchor)
    assert line.startswith("unpack debian: ember 2.00 s vs umoci 4.00 s, ratio 0.50x")


def test_ratio_line_gives_the_rounds_own_ratios() -> None:
    """The host slows down for good in round 3, between ember's run and the anchor's:
    the medians come from different minutes (1.0 vs 8.0 s), the rounds do not."""
    ours = bc.Timing("ember", [1.0, 1.0, 1.0, 4.0, 4.0])
    anchor = bc.Timing("umoci", [2.0, 2.0, 8.0, 8.0, 8.0])
    assert bc.round_ratios(ours, anchor) == [0.5, 0.5, 0.125, 0.5, 0.5]
    line = bc.ratio_line("pull", ours, anchor)
    assert line == (
        "pull: ember 1.00 s vs umoci 8.00 s, ratio 0.12x (medians of 5 alternating runs; "
        "round by round 0.50x, middle half 0.50-0.50x)"
    )
    spread = bc.ratio_line("pull", bc.Timing("ember", [1.0, 2.0, 3.0, 4.0]),
                           bc.Timing("umoci", [4.0, 4.0, 4.0, 4.0]))  # fmt: skip
    assert spread.endswith("round by round 0.62x, middle half 0.44-0.81x)")  # within the data
    few = bc.ratio_line("pull", bc.Timing("ember", [1.0, 3.0]), bc.Timing("umoci", [2.0, 4.0]))
    assert few.endswith("(medians of 2 alternating runs; round by round 0.62x)")
    apart = bc.ratio_line("boot", ours, anchor, rounds=False)  # timed in separate loops
    assert apart.endswith("ratio 0.12x (medians of 5 alternating runs)")
    with pytest.raises(ValueError):  # not timed round by round: the caller says rounds=False
        bc.ratio_line("boot", bc.Timing("ember", [1.0, 2.0]), anchor)


def test_insert_under_section() -> None:
    text = "# Performance\n\nintro\n\n## unpack\n\n- old\n\n## pull\n\n- p\n"
    out = bc.insert_under_section(text, "unpack", "- new")
    assert out == "# Performance\n\nintro\n\n## unpack\n\n- old\n- new\n\n## pull\n\n- p\n"
    out = bc.insert_under_section(out, "pull", "- p2")
    assert out.endswith("## pull\n\n- p\n- p2\n")
    out = bc.insert_under_section(out, "boot", "- b")
    assert out.endswith("- p2\n\n## boot\n\n- b\n")
    empty = bc.insert_under_section("# P\n\n## s\n\n## t\n", "s", "- x")
    assert empty == "# P\n\n## s\n\n- x\n\n## t\n"


def test_record_creates_and_appends(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "performance.md"
    bc.record("registry push", "ember 1 s vs distribution 2 s", doc)
    bc.record("registry push", "second line", doc)
    text = doc.read_text()
    assert text.startswith("# Performance")
    section = text.split("## registry push\n", 1)[1]
    assert [ln.split(": ", 1)[1] for ln in section.splitlines() if ln.startswith("- ")] == [
        "ember 1 s vs distribution 2 s",
        "second line",
    ]


def test_bench_registry_runs_and_cleans_up() -> None:
    with bc.registry() as reg:
        with urllib.request.urlopen(f"{reg.url}/v2/", timeout=5) as resp:
            assert resp.status == 200
        root = reg.root
    assert not root.exists()


def test_source_tree_is_a_commits_src_ready_to_import(tmp_path: Path) -> None:
    # what --base puts first on PYTHONPATH (it once used a tarfile option that
    # Debian 12's Python 3.11.2 lacks)
    src = bc.source_tree("HEAD", tmp_path / "base")
    assert src == tmp_path / "base" / "src"
    assert (src / "ember" / "__init__.py").is_file()
    assert list((src / "ember" / "__pycache__").glob("__init__.*.pyc"))


def test_base_lines_compare_this_tree_with_the_commit_of_the_same_run() -> None:
    timings = {
        "via the agent": bc.Timing("via the agent", [1.0, 1.0, 1.0]),
        bc.at_base("via the agent", "abc123"): bc.Timing("old", [2.0, 2.0, 2.0]),
    }
    assert bc.base_lines("unpack", timings, "via the agent", None) == []
    (line,) = bc.base_lines("unpack", timings, "via the agent", "abc123")
    assert line.startswith("unpack, this tree vs abc123: via the agent 1.00 s vs old 2.00 s")
    assert "ratio 0.50x" in line
