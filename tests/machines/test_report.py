from __future__ import annotations

import pytest

from ember.machines.report import (
    CONSOLE_REASON,
    NO_REPORT_EXIT_CODE,
    ExitReport,
    Outcome,
    outcome,
    parse_console_tail,
    parse_report,
)


def test_report() -> None:
    assert parse_report(b'{"exit_code": 7, "signal": null, "oom_killed": false}\n') == ExitReport(
        7, None, False
    )
    assert parse_report(b'{"exit_code": 137, "signal": 9, "oom_killed": true}') == ExitReport(
        137, 9, True
    )
    got = parse_report(
        b'{"exit_code": 125, "signal": null, "oom_killed": false, "error": "no\\u001b[31m user"}'
    )
    assert got == ExitReport(125, None, False, "no?[31m user")


def test_a_report_whose_error_text_is_not_utf8_still_counts() -> None:
    """An image's user name (or a message cut inside a character) put raw bytes into
    init's error text, and the whole report was dropped: "no exit report"."""
    got = parse_report(b'{"exit_code": 125, "signal": null, "error": "unable to find user \xff\xc3"}')
    assert got == ExitReport(125, None, False, "unable to find user \ufffd\ufffd")


def test_the_output_counts_are_taken_when_plausible_and_ignored_otherwise() -> None:
    base = b'{"exit_code": 0, "signal": null, "oom_killed": false, "sent": %s}'
    assert parse_report(base % b"[4700000, 12]") == ExitReport(0, None, False, sent=(4700000, 12))
    for bad in (b"[1]", b"[1, 2, 3]", b"[-1, 0]", b'["1", 0]', b"[1.5, 0]", b"[true, 0]",
                b"[9007199254740992, 0]", b"{}", b"null"):  # fmt: skip
        # the report still counts; the host falls back to waiting for quiet FIFOs
        assert parse_report(base % bad) == ExitReport(0, None, False), bad


def test_a_program_that_cannot_be_started_is_said_so() -> None:
    got = parse_report(
        b'{"exit_code": 127, "signal": null, "oom_killed": false, "not_started": true, '
        b'"error": "exec x: executable file not found in $PATH"}'
    )
    assert got is not None and got.not_started and got.exit_code == 127
    plain = parse_report(b'{"exit_code": 127, "signal": null, "oom_killed": false}')
    assert plain is not None and not plain.not_started


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"garbage",
        b"[1]",
        b'{"exit_code": 256, "signal": null, "oom_killed": false}',
        b'{"exit_code": -1, "signal": null, "oom_killed": false}',
        b'{"exit_code": true, "signal": null, "oom_killed": false}',
        b'{"exit_code": "0", "signal": null, "oom_killed": false}',
        b'{"exit_code": 0, "signal": 65, "oom_killed": false}',
        b'{"exit_code": 0, "signal": null, "oom_killed": "no"}',
        b'{"exit_code": 0, "signal": null, "oom_killed": false, "error": 5}',
        b'{"exit_code": 127, "signal": null, "oom_killed": false, "not_started": 1}',
        b'{"signal": null}',
        b" " * 5000 + b'{"exit_code": 0}',
        b"[" * 4000,  # a RecursionError in the monitor (a guest writes the status port)
        b'{"exit_code": 0, "error": ' + b"[" * 3000 + b"}",
    ],
)
def test_hostile_reports_are_ignored(data: bytes) -> None:
    assert parse_report(data) is None


def test_only_the_first_line_counts() -> None:
    data = b'{"exit_code": 1, "signal": null, "oom_killed": false}\n{"exit_code": 0, "signal": null, "oom_killed": false}\n'
    assert parse_report(data) == ExitReport(1, None, False)


def test_console_tail() -> None:
    log = b"[ 1.0] boot\nember-init: exit code 3\n[ 1.2] reboot: Power down\n"
    assert parse_console_tail(log) == ExitReport(3, None, False)
    log = b"ember-init: killed by signal 9 (oom killed)\r\n[ 2.0] reboot: Power down\n"
    assert parse_console_tail(log) == ExitReport(137, 9, True)
    assert parse_console_tail(b"ember-init: exit code 999\n") is None
    assert parse_console_tail(b"ember-init: killed by signal 99\n") is None
    assert parse_console_tail(b"program says ember-init: exit code 0\n") is None
    assert parse_console_tail(b"") is None


def test_outcome() -> None:
    rep = ExitReport(7, None, False)
    assert outcome(rep, 0, None, killed=False) == Outcome(7, None, False, None)
    # the report wins when the VMM died of a SIGKILL the user did not ask for (the OOM
    # killer after the report was written)
    assert outcome(rep, None, 9, killed=False).exit_code == 7
    assert outcome(None, None, 9, killed=False) == Outcome(137, 9, False, "killed")
    assert outcome(None, 0, None, killed=True).exit_code == 137
    gone = outcome(None, 0, None, killed=False)
    assert gone.exit_code == NO_REPORT_EXIT_CODE and gone.end_reason
    assert "status 1" in str(outcome(None, 1, None, killed=False).end_reason)
    assert "signal 15" in str(outcome(None, None, 15, killed=False).end_reason)


def test_what_the_host_did_wins_over_what_the_guest_said() -> None:
    """A root program in the guest printed `ember-init: exit code 0` on /dev/console and
    was then killed by `ember kill`/`rm -f`/stop's last step (its VMM SIGKILLed, init
    wrote no report): the forged line was recorded, 0 for `ember wait`, not 137."""
    forged = parse_console_tail(b"ember-init: exit code 0\n")
    assert forged == ExitReport(0, None, False)
    killed = Outcome(137, 9, False, "killed")
    # the host SIGKILLed the VMM: a console line, or a report, changes nothing
    assert outcome(None, None, 9, killed=True, console_said=forged) == killed
    assert outcome(ExitReport(0, None, False), None, 9, killed=True) == killed
    # a VMM that did not power off by itself: the console line is no word on it
    assert outcome(None, None, 9, killed=False, console_said=forged) == killed
    failed = outcome(None, 1, None, killed=False, console_said=forged)
    assert (failed.exit_code, failed.end_reason) == (255, "vmm exited with status 1")
    assert outcome(None, None, 15, killed=False, console_said=forged).exit_code == 255
    # the guest powered off by itself (its status port gave nothing): it decided how it
    # ended anyway, so its console's word is taken, and marked as only that
    said = outcome(None, 0, None, killed=False, console_said=ExitReport(3, None, False))
    assert said == Outcome(3, None, False, CONSOLE_REASON)


def test_a_kernel_panic_is_the_end_reason_of_a_guest_without_a_report() -> None:
    from ember.machines.report import parse_kernel_panic

    tail = (
        b"[    1.28] Kernel panic - not syncing: System is deadlocked on memory\n"
        + b"[    1.28] Call Trace:\n" * 200
        + b"[    1.29] Kernel Offset: disabled"
    )
    panic = parse_kernel_panic(tail)
    assert panic == "System is deadlocked on memory"
    result = outcome(None, 0, None, killed=False, panic=panic)
    assert result.exit_code == 255
    # (no "see console.log": with --rm it is gone; the reason is all there is)
    assert result.end_reason == "the guest's kernel panicked: System is deadlocked on memory"
    assert parse_kernel_panic(b"Kernel panic - not syncing: \x1b]0;x\x07\n") == "?]0;x?"
    assert parse_kernel_panic(b"all is well\n") is None
    # a report, or the host's kill, still decides
    assert outcome(None, None, 9, killed=True, panic=panic).end_reason == "killed"


def test_inits_error_line_comes_with_the_console_exit_code() -> None:
    """An init that failed before its status port was up (a --kernel without the modules
    for the root disk) said why on the console only: the user got no reason at all."""
    from ember.machines.report import CONSOLE_REASON

    tail = (
        b"ember-init: loading modules\n"
        b"ember-init: error: root device /dev/vda did not appear\n"
        b"[    5.1] reboot: Power down\n"
        b"ember-init: exit code 125\n"
    )
    said = parse_console_tail(tail)
    assert said is not None and said.error == "root device /dev/vda did not appear"
    result = outcome(None, 0, None, killed=False, console_said=said)
    assert (result.exit_code, result.end_reason, result.error) == (
        125, CONSOLE_REASON, "root device /dev/vda did not appear"
    )
    # an error line after the exit line is not that run's
    assert parse_console_tail(b"ember-init: exit code 3\nember-init: error: later\n").error is None  # type: ignore[union-attr]
