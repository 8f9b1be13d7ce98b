"""``ember start`` and ``ember restart``: an exited machine runs again on its own root
disk, with its logs kept, a network set up afresh, and its exit code reported."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.machines.vmkit import EMBER, Ember, fetch, vm_home_fixture, wait_for
from tests.support.images import copy_layout, layout_ref, run

pytestmark = [pytest.mark.vm, pytest.mark.root]

# appends a line to a file on the root disk, prints how many there are and the address
# eth0 has, and exits with that count
COUNT = (
    "echo run >> /runs; n=$(wc -l < /runs); echo $n; "
    "ip -4 -o addr show eth0 | awk '{print $4}'; exit $n"
)


vm_home = vm_home_fixture("vmstart")


def wait_status(ember: Ember, name: str, status: str, timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = ember.inspect(name)
        if st["status"] == status or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_start_runs_an_exited_machine_again_on_its_own_disk(ember: Ember, busybox: str) -> None:
    first = ember("run", "--name", "again", busybox, "sh", "-c", COUNT)
    assert first.returncode == 1, first.stderr
    assert first.stdout.splitlines()[0] == "1"

    # attached: only this run's output, and its exit code
    second = ember("start", "-a", "again")
    assert second.returncode == 2, second.stderr
    lines = second.stdout.splitlines()
    assert lines[0] == "2", "the root disk did not keep the first run's file"
    st = ember.inspect("again")
    assert st["status"] == "exited" and st["exit_code"] == 2
    net = st["network"]
    assert isinstance(net, dict)
    assert lines[1] == f"{net['guest_ip']}/{net['prefix']}", "the guest did not get its new network"

    # detached: prints the name, like docker start; the logs keep every run
    third = ember("start", "again")
    assert (third.returncode, third.stdout) == (0, "again\n"), third.stderr
    st = wait_status(ember, "again", "exited")
    assert st["exit_code"] == 3
    logs = ember("logs", "again").stdout.splitlines()
    assert [x for x in logs if x.isdigit()] == ["1", "2", "3"]
    assert ember("rm", "again").returncode == 0


def test_restart_stops_a_running_machine_and_starts_it_again(ember: Ember, busybox: str) -> None:
    res = ember("run", "-d", "--name", "svc", busybox, "sh", "-c", "echo up; exec sleep 1000")
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 120
        while "up" not in ember("logs", "svc").stdout and time.monotonic() < deadline:
            time.sleep(0.2)
        first_vmm = ember.inspect("svc")["vmm_pid"]
        # a running machine: start leaves it alone (start -a attaches to it, as docker's:
        # test_logs_attached.py)
        assert ember("start", "svc").returncode == 0
        assert ember.inspect("svc")["vmm_pid"] == first_vmm

        res = ember("restart", "-t", "1", "svc")
        assert (res.returncode, res.stdout) == (0, "svc\n"), res.stderr
        st = ember.inspect("svc")
        assert st["status"] == "running" and st["vmm_pid"] != first_vmm
        while ember("logs", "svc").stdout.count("up") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ember("logs", "svc").stdout.count("up") == 2
    finally:
        ember("rm", "-f", "svc")


TWO_SERVERS = (
    "mkdir -p /www && echo hi > /www/index.html && httpd -p 80 -h /www && httpd -p 81 -h /www"
    " && echo ready; exec sleep 1000"
)


def test_a_published_port_range_works_before_and_after_a_restart(ember: Ember, busybox: str) -> None:
    # and guest port 81 once more on a host port ember chooses, kept across the restart
    res = ember("run", "-d", "--name", "ranged", "-p", "18080-18081:80-81", "-p", "81", busybox,
                "sh", "-c", TWO_SERVERS)  # fmt: skip
    assert res.returncode == 0, res.stderr
    chosen: list[int] = []
    try:
        for attempt in ("first run", "after restart"):
            deadline = time.monotonic() + 120
            while ember("logs", "ranged").stdout.count("ready") < (1 if attempt == "first run" else 2):
                assert time.monotonic() < deadline, attempt
                time.sleep(0.2)
            ports = ember.inspect("ranged")["network"]["ports"]  # type: ignore[index]
            assert [(p["host_port"], p["guest_port"]) for p in ports[:2]] == [(18080, 80), (18081, 81)]
            chosen.append(ports[2]["host_port"])
            assert ports[2]["guest_port"] == 81 and ports[2]["auto"] is True
            for port in (18080, 18081, chosen[-1]):
                assert fetch(ember, f"http://127.0.0.1:{port}/index.html") == "hi\n", (attempt, port)
            if attempt == "first run":
                res = ember("restart", "-t", "1", "ranged")
                assert res.returncode == 0, res.stderr
        assert chosen[0] == chosen[1]
    finally:
        ember("rm", "-f", "ranged")


def test_publish_all_publishes_the_ports_the_image_exposes(
    ember: Ember, busybox_layout: Path, tmp_path: Path
) -> None:
    """-P: every ExposedPorts entry on a host port ember picks, but one -p names; an sctp
    one is left out, and said so."""
    layout = copy_layout(busybox_layout, tmp_path / "exposed")
    run(["umoci", "config", "--image", f"{layout}:latest", "--tag", "exposed",
         "--config.exposedports", "80/tcp", "--config.exposedports", "81/tcp",
         "--config.exposedports", "82/sctp"])  # fmt: skip
    res = ember("run", "-d", "--name", "exposed", "-P", "-p", "18181:81",
                layout_ref(layout, "exposed"), "sh", "-c", TWO_SERVERS)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "ember: -P does not publish the image's '82/sctp': ember publishes tcp and udp" in res.stderr
    try:
        first: list[object] = []
        for runs, attempt in enumerate(("first run", "after restart"), start=1):
            deadline = time.monotonic() + 120
            while ember("logs", "exposed").stdout.count("ready") < runs:
                assert time.monotonic() < deadline, attempt
                time.sleep(0.2)
            ports = ember.inspect("exposed")["network"]["ports"]  # type: ignore[index]
            assert [(p["guest_port"], p.get("auto", False)) for p in ports] == [(81, False), (80, True)]
            assert ports[0]["host_port"] == 18181
            for p in ports:
                assert fetch(ember, f"http://127.0.0.1:{p['host_port']}/index.html") == "hi\n", p
            port_lines = ember("port", "exposed").stdout.splitlines()
            assert f"80/tcp -> 0.0.0.0:{ports[1]['host_port']}" in port_lines, port_lines
            if first:  # the restart publishes the same ports again
                assert ports == first
            else:
                first = list(ports)
                res = ember("restart", "-t", "1", "exposed")
                assert res.returncode == 0, res.stderr
    finally:
        ember("rm", "-f", "exposed")


def test_restart_refuses_a_machine_that_stopping_removes(ember: Ember, busybox: str) -> None:
    res = ember("run", "-d", "--rm", "--name", "tmp", busybox, "sleep", "1000")
    assert res.returncode == 0, res.stderr
    try:
        res = ember("restart", "tmp")
        assert res.returncode == 1 and "--rm" in res.stderr, res.stderr
        assert ember.inspect("tmp")["status"] == "running"
    finally:
        ember("rm", "-f", "tmp")


def test_a_machine_without_its_run_config_is_not_started(ember: Ember, busybox: str) -> None:
    res = ember("run", "--name", "old", busybox, "true")
    assert res.returncode == 0, res.stderr
    d = Path(str(ember.inspect("old")["dir"]))
    (d / "run.config").unlink()  # as a machine made before ember start existed
    res = ember("start", "old")
    assert res.returncode == 1
    assert "cannot be started again" in res.stderr and "Traceback" not in res.stderr
    st = ember.inspect("old")
    assert st["status"] == "exited" and st["network"] is not None
    assert json.loads(ember("ps", "-a", "--json").stdout)[0]["name"] == "old"
    assert ember("rm", "old").returncode == 0


def test_a_vmm_that_dies_at_once_fails_run_d_and_start(ember: Ember, busybox: str) -> None:
    """`run -d` printed the id and exited 0 when QEMU started and died at once: the
    monitor said "started" before QEMU failed; `run` in the foreground exited 255.  A
    static executable as the kernel passes ember's checks and QEMU refuses it during its
    set-up (no VM boots here)."""
    res = ember("run", "-d", "--name", "dud", "--restart", "always", "--kernel", "/bin/busybox",
                busybox, "true")  # fmt: skip
    assert (res.returncode, res.stdout) == (125, ""), res.stderr  # docker run's status
    why = "machine dud did not start: vmm exited with status 1: "
    line = next((x for x in res.stderr.splitlines() if why in x), "")
    assert line.startswith("ember: ") and "qemu-system-x86_64: " in line, res.stderr
    time.sleep(1)  # (the policy's first restart would come after 100 ms)
    st = ember.inspect("dud")
    assert st["status"] == "exited" and str(st["end_reason"]) in line, st
    # as docker's, a restart policy applies to a machine that started
    assert (st["restart_count"], st["error"]) == (0, "not restarting: the machine did not start")
    # ember start says the same (exit 1, as for any machine it could not start), attached too
    for attach in ((), ("-a",)):
        res = ember("start", *attach, "dud")
        assert (res.returncode, res.stdout) == (1, ""), res.stderr
        assert why in res.stderr, res.stderr
    # vmm.log holds this run's words only (it kept its first MiB across runs, so a long-
    # lived machine's end reason could quote an earlier run)
    vmm_log = (ember.home.machines / str(st["id"]) / "vmm.log").read_text()
    assert vmm_log.count("qemu-system-x86_64: ") == 1, vmm_log
    assert ember("rm", "dud").returncode == 0
    # and so does `run` in the foreground (it exited 255, the record's code)
    res = ember("run", "--rm", "--name", "dud2", "--kernel", "/bin/busybox", busybox, "true")
    assert (res.returncode, res.stdout) == (125, ""), res.stderr
    why = "machine dud2 did not start: vmm exited with status 1: "
    line = next((x for x in res.stderr.splitlines() if why in x), "")
    assert line.startswith("ember: ") and "qemu-system-x86_64: " in line, res.stderr
    assert "dud2" not in ember("ps", "-a").stdout  # --rm: removed all the same


def test_a_program_that_cannot_be_started_is_not_restarted(ember: Ember, busybox: str) -> None:
    """Review finding: a command the guest could not start (not found: 127) counted as a
    run, and --restart always booted the machine again for ever; docker restarts no
    container whose process could not be started."""
    res = ember("run", "-d", "--name", "nocmd", "--restart", "always", busybox, "no-such-cmd")
    assert res.returncode == 0, res.stderr
    try:
        st = wait_status(ember, "nocmd", "exited")
        assert st["exit_code"] == 127, st
        time.sleep(1.5)  # the policy's first restart would have come after 100 ms
        st = ember.inspect("nocmd")
        assert (st["status"], st["restart_count"]) == ("exited", 0), st
        assert st["error"] == "not restarting: exec no-such-cmd: executable file not found in $PATH"
    finally:
        ember("rm", "-f", "nocmd")
    # in the foreground the reason is said once (the guest's line), not again by ember
    res = ember("run", "--rm", busybox, "no-such-cmd")
    assert res.returncode == 127
    assert res.stderr.count("executable file not found in $PATH") == 1, res.stderr
    # nor a user the image does not have (ember-init's own 125: only such failures of the
    # image and config stop the policy, not one that may not happen again)
    res = ember("run", "-d", "--name", "nouser", "--restart", "always", "-u", "nosuch",
                busybox, "true")  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        st = wait_status(ember, "nouser", "exited")
        assert st["exit_code"] == 125, st
        time.sleep(1.5)
        st = ember.inspect("nouser")
        assert (st["status"], st["restart_count"]) == ("exited", 0), st
        assert "not restarting: unable to find user nosuch" in str(st["error"]), st
    finally:
        ember("rm", "-f", "nouser")


def test_on_failure_restarts_up_to_its_maximum(ember: Ember, busybox: str) -> None:
    script = "echo run >> /runs; wc -l < /runs; exit 1"
    # in the foreground: the first run's exit code at once; the restarts go on behind
    res = ember("run", "--name", "flaky", "--restart", "on-failure:2", busybox, "sh", "-c", script)
    assert (res.returncode, res.stdout) == (1, "1\n"), res.stderr
    try:
        st = wait_for(ember, "flaky", lambda s: s["restart_count"] == 2 and s["status"] == "exited"
                      and s["exit_code"] == 1 and "3" in ember("logs", "flaky").stdout.split())  # fmt: skip
        assert st["restart_policy"] == "on-failure:2"
        time.sleep(1.5)  # no third restart
        st = ember.inspect("flaky")
        assert (st["restart_count"], st["status"]) == (2, "exited")
        assert ember("logs", "flaky").stdout.split() == ["1", "2", "3"]
        # ember start starts the policy over, as docker start: two restarts again
        assert ember("start", "flaky").returncode == 0
        st = wait_for(ember, "flaky", lambda s: s["restart_count"] == 2 and s["status"] == "exited"
                      and "6" in ember("logs", "flaky").stdout.split())  # fmt: skip
        time.sleep(1.5)
        assert ember("logs", "flaky").stdout.split() == ["1", "2", "3", "4", "5", "6"]
    finally:
        ember("rm", "-f", "flaky")


def test_always_restarts_until_stopped(ember: Ember, busybox: str) -> None:
    res = ember("run", "-d", "--name", "loop", "--restart", "always", busybox, "sh", "-c", "echo run; sleep 0.5")
    assert res.returncode == 0, res.stderr
    try:
        wait_for(ember, "loop", lambda s: s["restart_count"] >= 2)
        # between two runs, ps says so (as docker does)
        deadline = time.monotonic() + 60
        while "Restarting (0)" not in ember("ps", "-a").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # and inspect (docker's State.Status); a later look may find it running again
        assert ember.inspect("loop")["status"] in ("restarting", "running")
        res = ember("stop", "-t", "1", "loop")
        assert res.returncode == 0, res.stderr
        st = wait_for(ember, "loop", lambda s: s["status"] == "exited", timeout=30)
        count = st["restart_count"]
        time.sleep(2.0)  # stopped by the user: not run again
        st = ember.inspect("loop")
        assert (st["status"], st["restart_count"], st["stopped_by_user"]) == ("exited", count, True)
        # ember start resumes the machine (and its policy, counting from zero again)
        assert ember("start", "loop").returncode == 0
        wait_for(ember, "loop", lambda s: s["restart_count"] >= 1 and not s["stopped_by_user"])
    finally:
        assert ember("rm", "-f", "loop").returncode == 0
    assert ember("inspect", "loop").returncode != 0


def test_rm_and_restart_do_not_go_together(ember: Ember, busybox: str) -> None:
    res = ember("run", "--rm", "--restart", "always", busybox, "true")
    assert res.returncode == 125 and "--rm and --restart" in res.stderr  # docker run's status


def test_two_starts_of_one_machine_at_once_both_succeed(ember: Ember, busybox: str) -> None:
    """The second found it being started and failed, blaming an `ember run` and advising
    `rm -f`; as a second `docker start`, it now succeeds once the machine runs."""
    assert ember("run", "--name", "twice", busybox, "true").returncode == 0
    try:
        procs = [
            subprocess.Popen(["ip", "netns", "exec", ember.netns, EMBER, "start", "twice"],
                             env=ember.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
            for _ in range(2)
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert out == "twice\n"
    finally:
        ember("rm", "-f", "twice")
