"""Pure parts of ``ember ps/port`` (the commands themselves run against real machines in
tests/integration/test_run_vm.py)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import click
import pytest

from ember.cli.common import ago
from ember.cli.machines import port_lines
from ember.home import Home
from ember.machines import state as mstate
from ember.machines.state import MachineState, VMConfig
from ember.machines.store import MachineStore
from ember.process import proc_start_time
from tests.machines.records import network_json
from tests.support.cli import EMBER, ember_env, run_ember
from tests.support.proc import in_nanosleep, poll_until, wait_poll_round

PORTS = [
    {"host_ip": None, "host_port": 32771, "guest_port": 80, "protocol": "tcp"},
    {"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 80, "protocol": "tcp"},
    {"host_ip": None, "host_port": 5353, "guest_port": 53, "protocol": "udp"},
]


def test_port_lines_in_dockers_format() -> None:
    assert port_lines(PORTS, None) == [
        "80/tcp -> 127.0.0.1:8080",
        "80/tcp -> 0.0.0.0:32771",
        "53/udp -> 0.0.0.0:5353",
    ]
    assert port_lines(PORTS, "80") == ["127.0.0.1:8080", "0.0.0.0:32771"]
    assert port_lines(PORTS, "80/TCP") == ["127.0.0.1:8080", "0.0.0.0:32771"]
    assert port_lines(PORTS, "53/udp") == ["0.0.0.0:5353"]
    assert port_lines(PORTS, "53") == []  # tcp unless said
    assert port_lines(PORTS, "80/") == port_lines(PORTS, "80")
    assert port_lines([], None) == []


@pytest.mark.parametrize("query", ["", "x", "80/sctp", "-1", "/tcp", "0", "99999", "\u0668\u0660"])
def test_port_query_must_be_a_port(query: str) -> None:
    with pytest.raises(click.BadParameter):
        port_lines(PORTS, query)


def test_ps_keeps_one_machine_per_line_whatever_the_images_command(tmp_path: Path) -> None:
    """An image's Cmd is the tenant's: a newline in it made ``ps`` print a fake row, and
    control characters went to the terminal as they were."""
    st = MachineState(
        id=secrets.token_hex(32),
        name="",
        image="oci:/x:latest",
        image_digest="sha256:" + "0" * 64,
        created_at=mstate.now(),
        command=["sh", "-c", "a\nfake\x1b[2Jrow"],
        config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
        status=mstate.EXITED,
        exit_code=0,
    )
    MachineStore(Home(tmp_path)).create(st, "hostile")
    res = run_ember("ps", "-a", env=ember_env(tmp_path))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and "hostile" in lines[1]
    assert '"sh -c a\\nfake\\x1b[2Jrow"' in lines[1]


def _record(home: Home, name: str, **kw: object) -> MachineState:
    fields: dict[str, Any] = {"image": "oci:/x:latest", "image_digest": "sha256:" + "0" * 64,
                              "command": ["true"], **kw}  # fmt: skip
    st = MachineState(
        id=secrets.token_hex(32), name="", created_at=mstate.now(), config={},
        vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1), **fields,
    )  # fmt: skip
    MachineStore(home).create(st, name)
    return mstate.read_state(MachineStore(home).dir(st.id))


def _ember(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, env=ember_env(home), timeout=60)


def test_human_durations_are_dockers() -> None:
    from ember.cli.common import human_duration

    cases = [(0.4, "Less than a second"), (1.2, "1 second"), (59, "59 seconds"),
             (60, "About a minute"), (150, "2 minutes"), (3600, "About an hour"),
             (5 * 3600, "5 hours"), (3 * 86400, "3 days"), (20 * 86400, "2 weeks"),
             (90 * 86400, "3 months"), (800 * 86400, "2 years")]  # fmt: skip
    assert [human_duration(s) for s, _ in cases] == [w for _, w in cases]


def test_ps_words_and_ports_of_an_exited_machine(tmp_path: Path) -> None:
    from ember.cli.machines import _ports, _status

    net = network_json([PORTS[0]])
    running = _record(Home(tmp_path), "up", status=mstate.RUNNING, started_at=mstate.now(),
                      network=net)  # fmt: skip
    assert _status(running) == "Up Less than a second"
    assert _ports(running) == "0.0.0.0:32771->80/tcp"
    exited = _record(Home(tmp_path), "down", status=mstate.EXITED, exit_code=1,
                     finished_at=mstate.now(), network=net)  # fmt: skip
    assert _status(exited) == "Exited (1) Less than a second ago"
    assert _ports(exited) == ""  # docker shows no ports for a stopped container


def test_a_machine_between_two_runs_of_its_policy_is_restarting_in_json_too(tmp_path: Path) -> None:
    """ps said Restarting while inspect and ps --json said "exited": a script watching
    them took the machine for done (docker's State.Status is "restarting")."""
    from ember.cli.machines import _record as shown

    # a live monitor waiting to run it again: this process stands in for it
    waiting = _record(Home(tmp_path), "again", status=mstate.EXITED, exit_code=1,
                      finished_at=mstate.now(), restart_policy="always",
                      monitor_pid=os.getpid(), monitor_start=proc_start_time(os.getpid()))  # fmt: skip
    assert shown(waiting)["status"] == "restarting"
    res = _ember(tmp_path, "inspect", "again")
    assert json.loads(res.stdout)[0]["status"] == "restarting"
    assert waiting.status == mstate.EXITED  # the record itself says exited
    done = _record(Home(tmp_path), "done", status=mstate.EXITED, exit_code=1, restart_policy="always")
    assert shown(done)["status"] == "exited"  # no monitor: nothing will run it again
    # a monitor that gave up is alive a moment longer: it read as restarting meanwhile
    # (test_control_vm's give-up test saw it once)
    given_up = _record(Home(tmp_path), "gaveup", status=mstate.EXITED, exit_code=1,
                       finished_at=mstate.now(), restart_policy="always", restart_given_up=True,
                       monitor_pid=os.getpid(), monitor_start=proc_start_time(os.getpid()))  # fmt: skip
    assert shown(given_up)["status"] == "exited"
    # and plain ps lists it, as docker ps lists a restarting container (it showed nothing)
    listed = json.loads(_ember(tmp_path, "ps", "--json").stdout)
    assert [(m["name"], m["status"]) for m in listed] == [("again", "restarting")]
    assert "Restarting (1)" in _ember(tmp_path, "ps").stdout
    # a signal for its program says why it cannot be delivered ("not running (exited)")
    killed = _ember(tmp_path, "kill", "-s", "TERM", "again")
    assert killed.returncode != 0 and killed.stderr.count("\n") <= 2, killed.stderr
    assert killed.stderr.startswith("ember: machine again is restarting"), killed.stderr
    bogus = _ember(tmp_path, "kill", "-s", "BOGUS", "again")
    assert bogus.returncode == 2 and "'-s' / '--signal': 'BOGUS': not a signal" in bogus.stderr
    # rm without -f refuses it, as docker rm refuses a restarting container (it deleted it)
    removed = _ember(tmp_path, "rm", "again")
    assert removed.returncode != 0, removed
    assert removed.stderr.startswith("ember: machine again is restarting"), removed.stderr
    assert "ember rm -f" in removed.stderr
    assert json.loads(_ember(tmp_path, "inspect", "again").stdout)[0]["status"] == "restarting"


def test_a_machine_its_policy_will_not_run_again_is_exited_while_its_monitor_ends(
    tmp_path: Path,
) -> None:
    """After on-failure's last retry, or an exit 0 under on-failure, the monitor lives a
    moment longer (teardown): the machine read as restarting then."""
    from ember.cli.machines import _record as shown
    from ember.cli.machines import _status

    me = {"monitor_pid": os.getpid(), "monitor_start": proc_start_time(os.getpid())}
    ended = {"status": mstate.EXITED, "finished_at": mstate.now()}
    last = _record(Home(tmp_path), "last", exit_code=1, restart_policy="on-failure:2",
                   restart_count=2, **ended, **me)  # fmt: skip
    assert shown(last)["status"] == "exited" and _status(last).startswith("Exited (1)")
    ok = _record(Home(tmp_path), "ok", exit_code=0, restart_policy="on-failure", **ended, **me)
    assert shown(ok)["status"] == "exited"
    # one retry left: restarting
    more = _record(Home(tmp_path), "more", exit_code=1, restart_policy="on-failure:2",
                   restart_count=1, **ended, **me)  # fmt: skip
    assert shown(more)["status"] == "restarting"
    # a damaged policy in the record is not a traceback
    bad = _record(Home(tmp_path), "bad", exit_code=1, restart_policy="sometimes", **ended, **me)
    assert shown(bad)["status"] == "exited"


def test_a_machine_its_monitor_is_starting_again_is_restarting(tmp_path: Path) -> None:
    """Between `prepare_start(restart=True)` and the VMM's start the record says created
    (the monitor's pid kept): inspect said "created" there and a script (and CI's
    test_always_restarts_until_stopped) took the machine for never started."""
    from ember.cli.machines import _record as shown
    from ember.cli.machines import _status

    me = {"monitor_pid": os.getpid(), "monitor_start": proc_start_time(os.getpid())}
    again = _record(Home(tmp_path), "again", status=mstate.CREATED, restart_policy="always",
                    restart_count=1, restarting=True, **me)  # fmt: skip
    assert shown(again)["status"] == "restarting"
    assert _status(again) == "Restarting"
    assert json.loads(_ember(tmp_path, "inspect", "again").stdout)[0]["status"] == "restarting"
    assert [m["name"] for m in json.loads(_ember(tmp_path, "ps", "--json").stdout)] == ["again"]
    killed = _ember(tmp_path, "kill", "-s", "TERM", "again")
    assert killed.stderr.startswith("ember: machine again is restarting"), killed.stderr
    # a machine no monitor has taken yet (its `ember run` is creating it) is created, and
    # so is one `ember start` is starting (its monitor named in the record)
    fresh = _record(Home(tmp_path), "fresh", status=mstate.CREATED)
    assert shown(fresh)["status"] == "created" and _status(fresh) == "Created"
    starting = _record(Home(tmp_path), "starting", status=mstate.CREATED,
                       restart_policy="always", restart_count=1, **me)  # fmt: skip
    assert shown(starting)["status"] == "created" and _status(starting) == "Created"


def test_ps_folds_a_range_of_ports_as_docker(tmp_path: Path) -> None:
    from ember.cli.machines import _ports

    ranged = [{"host_port": 9000 + i, "guest_port": 9000 + i, "protocol": "udp", "host_ip": None}
              for i in range(3)]  # fmt: skip
    lone = {"host_port": 8080, "guest_port": 80, "protocol": "tcp", "host_ip": "127.0.0.1"}
    st = _record(Home(tmp_path), "r", status=mstate.RUNNING, started_at=mstate.now(),
                 network=network_json([*ranged, lone]))  # fmt: skip
    assert _ports(st) == "0.0.0.0:9000-9002->9000-9002/udp, 127.0.0.1:8080->80/tcp"


def test_ps_filters_limits_and_untruncated_output_as_docker(tmp_path: Path) -> None:
    """docker ps's --filter, -n, -l and --no-trunc: a status filter lists stopped
    machines without -a; an image is found by the name the record holds, also when the
    image is no longer in the local store."""
    home = Home(tmp_path)
    long_cmd = ["sh", "-c", "echo " + "x" * 60]
    old = _record(home, "old", status=mstate.EXITED, exit_code=0, started_at=mstate.now(),
                  finished_at=mstate.now(), image="docker.io/library/busybox:latest")  # fmt: skip
    time.sleep(0.01)  # created_at orders them
    new = _record(home, "new", status=mstate.EXITED, exit_code=3, started_at=mstate.now(),
                  finished_at=mstate.now(), command=long_cmd, labels={"app": "web"})  # fmt: skip
    time.sleep(0.01)
    _record(home, "fresh")

    def listed(*args: str) -> list[str]:
        res = _ember(tmp_path, "ps", "--json", *args)
        assert res.returncode == 0, res.stderr
        return [m["name"] for m in json.loads(res.stdout)]

    assert listed() == []
    assert listed("-f", "status=exited") == ["new", "old"]
    assert listed("-f", "status=created", "-f", "status=exited") == ["fresh", "new", "old"]
    assert listed("-a", "-f", "exited=3") == ["new"]
    assert listed("-f", "label=app=web", "-a") == ["new"]
    assert listed("-a", "-f", "name=^ol") == ["old"]
    assert listed("-a", "-f", "ancestor=busybox") == ["old"]
    assert listed("-a", "-f", "ancestor=" + old.image_digest) == ["fresh", "new", "old"]
    assert listed("-a", "-f", "before=new") == ["old"]
    assert listed("-a", "-f", "since=" + old.id[:12]) == ["fresh", "new"]
    assert listed("-n", "2") == ["fresh", "new"]
    assert listed("-l") == ["fresh"]
    assert listed("-l", "-n", "2") == ["fresh", "new"]  # -n wins, as docker's
    quiet = _ember(tmp_path, "ps", "-q", "--no-trunc", "-f", "name=new", "-a")
    assert quiet.stdout == new.id + "\n"
    table = _ember(tmp_path, "ps", "--no-trunc", "-f", "name=new", "-a").stdout.splitlines()
    assert new.id in table[1] and " ".join(long_cmd) in table[1]
    short = _ember(tmp_path, "ps", "-f", "name=new", "-a").stdout.splitlines()
    assert new.id not in short[1] and new.short_id in short[1] and "…" in short[1]
    both = _ember(tmp_path, "ps", "-q", "--json")
    assert both.returncode == 2 and "cannot be used together" in both.stderr and not both.stdout
    for bad, words in (("--filter=colour=red", "invalid filter 'colour'"),
                       ("--filter=status=gone", "invalid filter 'status=gone'"),
                       ("--filter=before=nobody", "no such machine: nobody")):  # fmt: skip
        res = _ember(tmp_path, "ps", bad)
        assert res.returncode in (1, 2) and words in res.stderr and not res.stdout
        assert "Traceback" not in res.stderr


def test_ps_format_as_docker_ps_format(tmp_path: Path) -> None:
    """``ps --format``: docker's template fields, with -a, --filter, -n, -l and --no-trunc
    as without it; ``json``, ``table``; -q wins (with a warning) once the template is
    checked; every refusal one line and exit code 2."""
    home = Home(tmp_path)
    me = {"monitor_pid": os.getpid(), "monitor_start": proc_start_time(os.getpid())}
    long_cmd = ["sh", "-c", "echo " + "x" * 60 + "\nfake row"]
    old = _record(home, "old", status=mstate.EXITED, exit_code=3, started_at=mstate.now(),
                  finished_at=mstate.now(), command=long_cmd,
                  labels={"app": "web", "com.example.tier-name": "front"})  # fmt: skip
    time.sleep(0.01)  # created_at orders them
    up = _record(home, "up", status=mstate.RUNNING, started_at=mstate.now(),
                 network=network_json([PORTS[0]]), **me)  # fmt: skip
    # years ago: the duration words stay the same from one command to the next
    for st, created in ((old, "2020-01-01T00:00:00+00:00"), (up, "2020-01-02T00:00:00+00:00")):
        with mstate.update(MachineStore(home).dir(st.id)) as cur:
            cur.created_at = cur.started_at = created
            cur.finished_at = created if cur.status == mstate.EXITED else None
    years = ago("2020-01-01T00:00:00+00:00")
    assert years.endswith("years ago")

    def ps(*args: str, env: dict[str, str] | None = None) -> str:
        res = run_ember("ps", *args, env=ember_env(tmp_path, **(env or {})), timeout=60)
        assert (res.returncode, res.stderr) == (0, ""), res.stderr
        return res.stdout

    assert ps("--format", "{{.Names}}") == "up\n"
    assert ps("-a", "--format", "{{.Names}}") == "up\nold\n"
    assert ps("-a", "-f", "label=app=web", "--format", "{{.Names}}") == "old\n"
    assert ps("-n", "1", "--format", "{{.Names}}") == ps("-l", "--format", "{{.Names}}") == "up\n"
    fields = "{{.ID}}|{{.State}}|{{.Status}}|{{.Ports}}|{{.Networks}}|{{.Labels}}|{{.Label \"app\"}}"
    assert ps("-a", "--format", fields).splitlines() == [
        f"{up.short_id}|running|Up {years.removesuffix(' ago')}|0.0.0.0:32771->80/tcp|default||",
        f"{old.short_id}|exited|Exited (3) {years}|||app=web,com.example.tier-name=front|web",
    ]
    # the command as the table shows it: quoted, one line, cut unless --no-trunc
    short, full = (ps("-f", "name=old", "-a", *more, "--format", "{{.ID}} {{.Command}}")
                   for more in ((), ("--no-trunc",)))  # fmt: skip
    assert short == f'{old.short_id} "sh -c echo {"x" * 18}…"\n'
    assert full == f'{old.id} "sh -c echo {"x" * 60}\\nfake row"\n'
    # Go's time.Time string, in the local zone (docker's .CreatedAt)
    created_at = ps("-f", "name=old", "-a", "--format", "{{.CreatedAt}}", env={"TZ": "UTC"})
    assert created_at == "2020-01-01 00:00:00 +0000 UTC\n"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} \S+\n",
                        ps("-l", "--format", "{{.CreatedAt}}"))  # fmt: skip
    assert ps("-l", "--format", "{{.RunningFor}}") == f"{years}\n"

    objects = [json.loads(line) for line in ps("-a", "--format", "json").splitlines()]
    assert [(o["Names"], o["State"], o["ID"]) for o in objects] == [
        ("up", "running", up.short_id), ("old", "exited", old.short_id)
    ]
    assert sorted(objects[0]) == sorted(["Command", "CreatedAt", "ID", "Image", "Labels", "Names",
                                         "Networks", "Ports", "RunningFor", "State", "Status",
                                         "Mounts", "LocalVolumes"])  # fmt: skip
    assert ps("-a", "--format", "{{json .}}") == ps("-a", "--format", "json")

    table = ps("-a", "--format", "table {{.ID}}\\t{{.Names}}\\t{{.Label \"com.example.tier-name\"}}")
    assert table.splitlines() == [
        "MACHINE ID     NAMES     tier name",
        f"{up.short_id}   up        ",
        f"{old.short_id}   old       front",
    ]
    assert ps("-a", "--format", "table") == ps("-a")  # docker's: the default table
    assert ps("--format", "table {{.Names}}", "-f", "name=nobody") == "NAMES\n"

    # -q wins over a template, as docker ps's (which says so on stderr)
    quiet = _ember(tmp_path, "ps", "-a", "-q", "--format", "{{.Names}}")
    assert quiet.returncode == 0 and quiet.stdout == f"{up.short_id}\n{old.short_id}\n"
    assert quiet.stderr == "ember: warning: ignoring --format, because -q is set\n"
    for args, says in (
        (("-q", "--format", "{{.Nope}}"), "unknown field .Nope for ember ps"),
        (("--json", "--format", "json"), "--json and --format cannot be used together"),
        (("--format", "{{.Size}}"), "ember ps has no .Size"),
        (("--format", "{{.Platform}}"), "ember ps has no .Platform"),
        (("--format", "{{.ID"), "'{{' without its '}}'"),
        (("--format", "{{.ID | upper}}"), "pipelines (|) are not supported"),
        (("--format", "{{if .ID}}up{{end}}"), "'if' is not supported"),
    ):
        res = _ember(tmp_path, "ps", *args)
        assert (res.returncode, res.stdout) == (2, ""), res.stderr
        assert res.stderr.count("\n") == 1 and says in res.stderr, res.stderr
        assert res.stderr.startswith("ember: ") and "Traceback" not in res.stderr


def test_ps_fields_each_have_a_header() -> None:
    from ember.cli.machines import _PS_FIELDS, _ps_schema

    assert _ps_schema().headers.keys() == _PS_FIELDS.keys()
    assert not _ps_schema().missing.keys() & _PS_FIELDS.keys()


def test_commands_on_several_machines_go_on_and_fail_at_the_end(tmp_path: Path) -> None:
    """docker's rules: stop of a stopped machine is no error, rm -f of a missing one
    neither, inspect prints what it found and fails for the rest."""
    _record(Home(tmp_path), "x1", status=mstate.EXITED, exit_code=0)
    res = _ember(tmp_path, "stop", "x1")
    assert (res.returncode, res.stdout) == (0, "x1\n"), res.stderr
    res = _ember(tmp_path, "stop", "nosuch", "x1")
    assert (res.returncode, res.stdout) == (1, "x1\n")
    assert "no such machine: nosuch" in res.stderr
    res = _ember(tmp_path, "inspect", "x1", "nosuch")
    assert res.returncode == 1 and "no such machine: nosuch" in res.stderr
    assert [m["name"] for m in json.loads(res.stdout)] == ["x1"]
    res = _ember(tmp_path, "inspect", "nosuch")
    assert (res.returncode, json.loads(res.stdout)) == (1, [])
    res = _ember(tmp_path, "rm", "-f", "nosuch")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    res = _ember(tmp_path, "rm", "nosuch", "x1")
    assert (res.returncode, res.stdout) == (1, "x1\n")
    assert "no such machine: nosuch" in res.stderr


def test_stop_and_restart_take_minus_one_for_no_timeout(tmp_path: Path) -> None:
    """``docker stop -t -1`` waits for ever (no SIGKILL); -1 was refused as out of range."""
    _record(Home(tmp_path), "x1", status=mstate.EXITED, exit_code=0)
    res = _ember(tmp_path, "stop", "-t", "-1", "x1")
    assert (res.returncode, res.stdout) == (0, "x1\n"), res.stderr
    res = _ember(tmp_path, "stop", "--time=-2", "x1")
    assert res.returncode == 2 and "-2" in res.stderr, res.stderr
    res = _ember(tmp_path, "restart", "-t", "-1", "nosuch")
    assert (res.returncode, res.stdout) == (1, ""), res.stderr
    assert "no such machine: nosuch" in res.stderr


def test_wait_prints_the_code_of_an_rm_machine_that_ended_first(tmp_path: Path) -> None:
    """``wait w1 w2`` where w2 (--rm) ends and is removed while wait still waits for w1."""
    home = Home(tmp_path)
    monitor = subprocess.Popen(["sleep", "60"])  # stands in for both monitors
    try:
        alive = {"status": mstate.RUNNING, "monitor_pid": monitor.pid,
                 "monitor_start": proc_start_time(monitor.pid)}  # fmt: skip
        w1 = _record(home, "w1", **alive)
        w2 = _record(home, "w2", auto_remove=True, **alive)
        waiter = subprocess.Popen(
            [EMBER, "wait", "w1", "w2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=ember_env(tmp_path),
        )  # fmt: skip
        # asleep in its poll loop: both machines were looked up and read once
        poll_until(lambda: in_nanosleep(waiter.pid) or waiter.poll() is not None, "wait never polled")
        assert waiter.poll() is None, waiter.communicate()
        # w2 ends with 9 and its monitor removes it (as monitor._cleanup does)
        with mstate.update(MachineStore(home).dir(w2.id)) as cur:
            cur.status, cur.exit_code = mstate.EXITED, 9
        mstate.record_removed_exit(home.run, mstate.read_state(MachineStore(home).dir(w2.id)))
        MachineStore(home).remove_dir(w2.id)
        wait_poll_round(waiter.pid)  # it has seen w2 gone while w1 still runs
        with mstate.update(MachineStore(home).dir(w1.id)) as cur:
            cur.status, cur.exit_code = mstate.EXITED, 7
        out, err = waiter.communicate(timeout=30)
    finally:
        monitor.kill()
        monitor.wait()
    assert (waiter.returncode, out) == (0, "7\n9\n"), err


def test_logs_without_follow_end_while_the_machine_keeps_writing(tmp_path: Path) -> None:
    """`ember logs` read until end-of-file: with a guest writing faster than the output
    was taken (a slow pipe), it never ended.  As `docker logs`, it prints what the logs
    held when it started, across their rotated files."""
    from ember.machines.logs import LogConfig, RotatingLog

    home = Home(tmp_path)
    st = _record(home, "chatty", status=mstate.EXITED, exit_code=0)
    d = MachineStore(home).dir(st.id)
    (d / "stderr.log").touch()
    config = LogConfig(64 << 10, 3)
    log = RotatingLog(d / "stdout.log", config)
    count = 0

    def write(lines: int) -> None:
        nonlocal count
        log.write(b"".join(b"%08d %s\n" % (i, b"x" * 50) for i in range(count, count + lines)))
        count += lines

    while log.rotations < 3:
        write(1000)
    stop = threading.Event()

    def keep_writing() -> None:  # ~20 MB/s, the reader below takes < 1 MB/s
        while not stop.is_set():
            write(1000)
            time.sleep(0.002)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        proc = subprocess.Popen([EMBER, "logs", "chatty"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ember_env(tmp_path))  # fmt: skip
        assert proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 20
        while chunk := proc.stdout.read1(4096):
            out += chunk
            assert time.monotonic() < deadline, f"ember logs still printing after {len(out)} bytes"
            time.sleep(0.005)
        assert proc.wait(10) == 0
    finally:
        stop.set()
        writer.join()
        proc.kill()
        log.close()
    numbers = [int(line.split()[0]) for line in out.splitlines()]
    assert numbers[0] > 0  # the oldest files were dropped already
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # whole, in order
    assert len(out) <= config.max_size * config.max_files  # what was kept when it started


def test_a_damaged_network_in_a_record_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """The record's network was read unchecked: a port without its protocol made `ember
    port` and `ps` a KeyError traceback, as a network without its MAC did `ember start`
    and the monitor.  Now the record is damaged when read, as for any other field."""
    home = Home(tmp_path)
    net = network_json([PORTS[0]])
    # a live monitor: this process stands in for it
    up = _record(home, "up", status=mstate.RUNNING, started_at=mstate.now(), network=net,
                 monitor_pid=os.getpid(), monitor_start=proc_start_time(os.getpid()))  # fmt: skip
    down = _record(home, "down", status=mstate.EXITED, exit_code=0, network=net)
    damaged = {up.id: {**net, "ports": [{"host_port": 8080, "guest_port": 80}]},
               down.id: {k: v for k, v in net.items() if k != "mac"}}  # fmt: skip
    for machine_id, bad in damaged.items():
        path = MachineStore(home).dir(machine_id) / "state.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "network": bad}))
    # (a machine whose record cannot be read is found by its id only)
    for args, shown in ((("port", up.short_id), [up]), (("start", down.short_id), [down]),
                        (("ps", "-a"), [down, up])):  # fmt: skip
        res = _ember(tmp_path, *args)
        assert "Traceback" not in res.stderr, res.stderr
        lines = sorted(res.stderr.splitlines())
        assert len(lines) == len(shown), res.stderr
        for line, st in zip(lines, sorted(shown, key=lambda st: st.id), strict=True):
            assert line.startswith(f"ember: machine {st.short_id} has a damaged record (field "
                                   "'network': "), res.stderr  # fmt: skip
        assert res.returncode == (0 if args[0] == "ps" else 1)


def test_the_machines_areas_warnings_are_ember_lines(tmp_path: Path) -> None:
    """A --rm machine whose monitor is gone is removed by the next command that sees it;
    what fails then is said as every other message of ember (a warning of the
    ember.machines logger, which the machine commands show as an ``ember:`` line)."""
    home = Home(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    _record(home, "orphan", status=mstate.RUNNING, auto_remove=True, monitor_pid=gone.pid,
            monitor_start=1)  # fmt: skip
    home.run.mkdir(parents=True)
    (home.run / "removed-exits").write_text("in the way of the exit codes kept")
    res = _ember(tmp_path, "ps")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("ember: cannot remove --rm machine orphan whose monitor is "
                                 "gone: [Errno 17] File exists")  # fmt: skip
    assert res.stderr.count("\n") == 1, res.stderr


def test_logs_follow_ends_when_the_monitor_dies(tmp_path: Path) -> None:
    """Review finding: `ember logs -f` read the record's status only, and a record whose
    monitor was killed (-9, the OOM killer) says running for ever: it never ended."""
    home = Home(tmp_path)
    monitor = subprocess.Popen(["sleep", "600"])
    st = _record(home, "m", status=mstate.RUNNING, started_at=mstate.now(),
                 monitor_pid=monitor.pid, monitor_start=proc_start_time(monitor.pid))  # fmt: skip
    d = MachineStore(home).dir(st.id)
    (d / "stdout.log").write_bytes(b"before\n")
    (d / "stderr.log").touch()
    follower = subprocess.Popen([EMBER, "logs", "-f", "m"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ember_env(tmp_path))  # fmt: skip
    try:
        time.sleep(1.0)
        assert follower.poll() is None  # following while the monitor lives
        monitor.kill()
        monitor.wait()
        out, err = follower.communicate(timeout=20)
    finally:
        follower.kill()
        monitor.kill()
    assert (follower.returncode, out) == (0, b"before\n"), err


def test_start_attached_to_an_rm_machine_removed_at_its_end_gives_its_exit_code(
    tmp_path: Path,
) -> None:
    """Review finding: `ember start -a` of a running --rm machine failed ("removed before
    its exit code could be read", exit 1) when its poll missed the moment between the
    end and the removal, though the monitor keeps the code for `ember wait`."""
    home = Home(tmp_path)
    monitor = subprocess.Popen(["sleep", "60"])
    try:
        m = _record(home, "m", auto_remove=True, status=mstate.RUNNING, started_at=mstate.now(),
                    monitor_pid=monitor.pid, monitor_start=proc_start_time(monitor.pid))  # fmt: skip
        d = MachineStore(home).dir(m.id)
        (d / "stdout.log").touch()
        (d / "stderr.log").touch()
        attached = subprocess.Popen([EMBER, "start", "-a", "m"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=ember_env(tmp_path))  # fmt: skip
        poll_until(lambda: in_nanosleep(attached.pid) or attached.poll() is not None,
                   "start -a never polled")  # fmt: skip
        assert attached.poll() is None, attached.communicate()
        # the end and the removal in one step, as a poll that came too late sees them
        with mstate.update(d) as cur:
            cur.status, cur.exit_code = mstate.EXITED, 9
        mstate.record_removed_exit(home.run, mstate.read_state(d))
        MachineStore(home).remove_dir(m.id)
        monitor.kill()
        monitor.wait()
        out, err = attached.communicate(timeout=30)
    finally:
        monitor.kill()
    assert attached.returncode == 9, err


def test_logs_tail_prints_the_last_lines_of_each_stream(tmp_path: Path) -> None:
    """docker logs --tail N (-n): was "No such option"."""
    home = Home(tmp_path)
    st = _record(home, "m", status=mstate.EXITED, exit_code=0)
    d = MachineStore(home).dir(st.id)
    (d / "stdout.log").write_bytes(b"o1\no2\no3\n")
    (d / "stderr.log").write_bytes(b"e1\ne2\n")
    res = _ember(tmp_path, "logs", "--tail", "2", "m")
    assert (res.returncode, res.stdout, res.stderr) == (0, "o2\no3\n", "e1\ne2\n")
    res = _ember(tmp_path, "logs", "-n", "0", "m")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    res = _ember(tmp_path, "logs", "--tail", "all", "m")
    assert res.stdout == "o1\no2\no3\n"
    res = _ember(tmp_path, "logs", "--tail", "-1", "m")
    assert res.returncode == 2 and "a number of lines or 'all'" in res.stderr
    # with -f: the last lines, then what comes, until the machine ends (here: ended)
    res = _ember(tmp_path, "logs", "-f", "--tail", "1", "m")
    assert (res.returncode, res.stdout, res.stderr) == (0, "o3\n", "e2\n")


def _dated_logs(home: Home, name: str, lines: dict[str, list[tuple[int, bytes]]], **kw: object) -> Path:
    """A machine whose logs hold ``lines`` (stream -> [(arrival ns, bytes)]), written by
    the monitor's writer with its clock at those times."""
    from ember.machines.logs import LogConfig, RotatingLog

    st = _record(home, name, **kw)
    d = MachineStore(home).dir(st.id)
    now = [0]
    for stream, timed in lines.items():
        log = RotatingLog(d / f"{stream}.log", LogConfig(1 << 20, 2), clock=lambda: now[0])
        for now[0], data in timed:
            log.write(data)
        log.close()
    return d


def test_logs_timestamps_since_and_until(tmp_path: Path) -> None:
    """docker logs -t / --since / --until: were "No such option" (the logs kept no times)."""
    now = time.time_ns()
    hour, minute = 3600 * 10**9, 60 * 10**9
    _dated_logs(Home(tmp_path), "m", {
        "stdout": [(now - 2 * hour, b"old\n"), (now - 30 * minute, b"half an hour\n"),
                   (now - minute, b"a minute\nago\n")],
        "stderr": [(now - 2 * hour, b"e-old\n"), (now - 10 * minute, b"e-new\n")],
    }, status=mstate.EXITED, exit_code=0)  # fmt: skip
    res = _ember(tmp_path, "logs", "-t", "m")
    assert res.returncode == 0, res.stderr
    from ember.machines.logtimes import format_time

    assert res.stdout.splitlines() == [
        f"{format_time(now - 2 * hour)} old",
        f"{format_time(now - 30 * minute)} half an hour",
        f"{format_time(now - minute)} a minute",
        f"{format_time(now - minute)} ago",  # arrived in the same chunk
    ]
    assert res.stderr.splitlines() == [f"{format_time(now - 2 * hour)} e-old", f"{format_time(now - 10 * minute)} e-new"]
    res = _ember(tmp_path, "logs", "--since", "1h", "m")
    assert (res.returncode, res.stdout, res.stderr) == (0, "half an hour\na minute\nago\n", "e-new\n")
    res = _ember(tmp_path, "logs", "--until", "45m", "m")
    assert (res.returncode, res.stdout, res.stderr) == (0, "old\n", "e-old\n")
    stamp = format_time(now - 20 * minute)  # an RFC 3339 time, then a unix one
    res = _ember(tmp_path, "logs", "--since", "90m", "--until", stamp, "m")
    assert (res.returncode, res.stdout, res.stderr) == (0, "half an hour\n", "")
    res = _ember(tmp_path, "logs", "--since", str((now - 5 * minute) // 10**9), "m")
    assert (res.stdout, res.stderr) == ("a minute\nago\n", "")
    # --tail picks the last lines, then the window picks among them (as docker)
    res = _ember(tmp_path, "logs", "--tail", "2", "--since", "40m", "-t", "m")
    assert res.stdout.splitlines() == [f"{format_time(now - minute)} a minute", f"{format_time(now - minute)} ago"]
    res = _ember(tmp_path, "logs", "--since", "yesterday", "m")
    assert res.returncode == 2 and "'yesterday': give a duration back from now" in res.stderr
    assert "Traceback" not in res.stderr


def test_logs_follow_until_ends_while_the_guest_keeps_printing(tmp_path: Path) -> None:
    """`-f --until T` with a guest printing faster than the lines are read: the stop was
    checked only when a pass read nothing, so it followed (and spun) for ever."""
    import sys

    monitor = subprocess.Popen(["sleep", "60"])  # stands in for the machine's monitor
    st = _record(Home(tmp_path), "live", status=mstate.RUNNING, started_at=mstate.now(),
                 monitor_pid=monitor.pid, monitor_start=proc_start_time(monitor.pid))  # fmt: skip
    d = MachineStore(Home(tmp_path)).dir(st.id)
    (d / "stderr.log").write_bytes(b"")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import time
from pathlib import Path
from ember.machines.logs import LogConfig, RotatingLog
log = RotatingLog(Path({str(d / "stdout.log")!r}), LogConfig(1 << 20, 2))
end = time.monotonic() + 30
while time.monotonic() < end:
    log.write(b"\\n" * 60000)
"""])  # fmt: skip
    try:
        poll_until(lambda: (d / "stdout.log").exists() and (d / "stdout.log").stat().st_size > 0,
                   "the writer never wrote")  # fmt: skip
        until = f"{(time.time_ns() + 10**9) / 1e9:.6f}"  # a second from now
        # (it never ended: the writer goes on for 30 s, and this would time out)
        res = run_ember("logs", "-f", "--until", until, "live", env=ember_env(tmp_path), timeout=25)
    finally:
        writer.kill()
        writer.wait()
        monitor.kill()
        monitor.wait()
    assert res.returncode == 0, res.stderr


def test_logs_2_to_1_reads_as_the_program_wrote(tmp_path: Path) -> None:
    """docker logs interleaves stdout and stderr by time; ember printed all of stdout's
    64 KiB chunk, then stderr's."""
    t = time.time_ns()
    _dated_logs(Home(tmp_path), "m", {
        "stdout": [(t, b"starting\n"), (t + 2, b"listening\n"), (t + 4 * 10**6, b"bye\n")],
        "stderr": [(t + 10**6, b"warning: x\n"), (t + 3 * 10**6, b"error: y\n")],
    }, status=mstate.EXITED, exit_code=0)  # fmt: skip
    res = subprocess.run([EMBER, "logs", "m"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=ember_env(tmp_path), timeout=60)  # fmt: skip
    assert res.returncode == 0
    assert res.stdout == b"starting\nlistening\nwarning: x\nerror: y\nbye\n"
    apart = _ember(tmp_path, "logs", "m")
    assert (apart.stdout, apart.stderr) == ("starting\nlistening\nbye\n", "warning: x\nerror: y\n")


def test_logs_without_times_print_as_they_are(tmp_path: Path) -> None:
    """Logs of a machine from before ember kept times: -t prints the lines bare, and no
    line is in a window of time."""
    st = _record(Home(tmp_path), "old", status=mstate.EXITED, exit_code=0)
    d = MachineStore(Home(tmp_path)).dir(st.id)
    (d / "stdout.log").write_bytes(b"o1\no2\n")
    (d / "stderr.log").write_bytes(b"")
    res = _ember(tmp_path, "logs", "-t", "old")
    assert (res.returncode, res.stdout, res.stderr) == (0, "o1\no2\n", "")
    res = _ember(tmp_path, "logs", "--since", "1000h", "old")
    assert (res.returncode, res.stdout) == (0, "")


def test_logs_follow_until_a_past_time_ends_while_the_machine_runs(tmp_path: Path) -> None:
    """docker logs -f --until T stops following at T; ember's -f followed the running
    machine for ever."""
    monitor = subprocess.Popen(["sleep", "60"])  # stands in for the machine's monitor
    try:
        now = time.time_ns()
        _dated_logs(Home(tmp_path), "live", {
            "stdout": [(now - 10 * 60 * 10**9, b"before\n"), (now, b"after\n")], "stderr": [],
        }, status=mstate.RUNNING, started_at=mstate.now(), monitor_pid=monitor.pid,
           monitor_start=proc_start_time(monitor.pid))  # fmt: skip
        res = _ember(tmp_path, "logs", "-f", "--until", "5m", "live")
    finally:
        monitor.kill()
        monitor.wait()
    assert (res.returncode, res.stdout, res.stderr) == (0, "before\n", "")


def test_kill_of_a_machine_ending_meanwhile_says_it_is_not_running(tmp_path: Path) -> None:
    """`ember kill -s USR1 NAME` as the machine ended: its monitor had taken the control
    channel away but not yet recorded the end, and the user read "cannot reach the
    machine's control channel .../control.sock: No such file or directory"."""
    home = Home(tmp_path)
    monitor = subprocess.Popen(["sleep", "60"])  # stands in for the machine's monitor
    try:
        _record(home, "ending", status=mstate.RUNNING, started_at=mstate.now(),
                monitor_pid=monitor.pid, monitor_start=proc_start_time(monitor.pid))  # fmt: skip
        # (no control.sock: gone with the VMM) the monitor ends a moment later
        threading.Timer(0.3, monitor.kill).start()
        res = _ember(tmp_path, "kill", "-s", "USR1", "ending")
    finally:
        monitor.kill()
        monitor.wait()
    assert res.returncode == 1
    assert res.stderr == "ember: machine ending is not running (exited)\n", res.stderr


def test_start_and_restart_of_a_machine_between_two_runs_of_its_policy(tmp_path: Path) -> None:
    """`ember start` of a machine whose monitor waits to run it again set up a second
    monitor beside that one; as docker's start of a restarting container, it now does
    nothing, successfully.  `ember restart` stops it first (its monitor ends without
    running it again), then starts it."""
    from tests.machines.records import stoppable_monitor

    home = Home(tmp_path)
    st = _record(home, "looping", status=mstate.EXITED, exit_code=1, finished_at=mstate.now(),
                 restart_policy="always", restart_count=3)  # fmt: skip
    d = MachineStore(home).dir(st.id)
    with stoppable_monitor(d) as monitor:
        waiting = mstate.read_state(d)
        res = _ember(tmp_path, "start", "looping")
        assert (res.returncode, res.stdout, res.stderr) == (0, "looping\n", ""), res.stderr
        assert mstate.read_state(d) == waiting
        res = _ember(tmp_path, "restart", "-t", "1", "looping")
        assert monitor.wait(timeout=10) == 0  # stopped: not run again by the old monitor
        # (the record, made without a VM, cannot be started: that start fails as such)
        assert res.returncode == 1 and "older ember" in res.stderr, res.stderr
        assert mstate.read_state(d).stopped_by_user


def test_restart_leaves_a_machine_another_command_is_starting_to_it(tmp_path: Path) -> None:
    """`ember restart` of a machine an `ember run` is still making (its monitor not handed
    it yet) marked it stopped, waited 30 s for a monitor that does not act on that, and
    failed: the run's VMM was then killed as it started.  It fails at once now."""
    me = {"monitor_pid": os.getpid(), "monitor_start": proc_start_time(os.getpid())}
    st = _record(Home(tmp_path), "making", status=mstate.CREATED, **me)
    res = _ember(tmp_path, "restart", "making")
    assert res.returncode != 0 and "is being started" in res.stderr, res.stderr
    assert not mstate.read_state(MachineStore(Home(tmp_path)).dir(st.id)).stopped_by_user


def test_start_attach_of_a_restarting_machine_follows_its_next_run(tmp_path: Path) -> None:
    """It was refused ("is restarting", exit 2); as docker's start -a of a restarting
    container, it now waits for the next run and follows it to its exit code."""
    from ember.machines.lifecycle import machine_channels
    from tests.machines.records import stoppable_monitor
    from tests.support.proc import read_line

    home = Home(tmp_path)
    st = _record(home, "looping", status=mstate.EXITED, exit_code=1, finished_at=mstate.now(),
                 restart_policy="always")  # fmt: skip
    d = MachineStore(home).dir(st.id)
    logs = machine_channels(d)
    for log in (logs.stdout_log, logs.stderr_log):
        log.touch()
    with stoppable_monitor(d):
        attached = subprocess.Popen([EMBER, "start", "-a", "looping"], env=ember_env(tmp_path),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        writing = threading.Event()
        try:
            # it waits (in its sleep between two looks) while the machine is restarting
            poll_until(lambda: attached.poll() is not None or in_nanosleep(attached.pid),
                       "start -a neither waiting nor done")  # fmt: skip
            assert attached.poll() is None, attached.communicate()
            with mstate.update(d) as cur:  # its monitor runs it again
                cur.status, cur.started_at = mstate.RUNNING, mstate.now()
                cur.exit_code, cur.restart_count = None, 1
            writing.set()

            def run_writes() -> None:  # until what it writes reaches the attached command
                while writing.is_set():
                    with logs.stdout_log.open("a") as out:
                        out.write("tick\n")
                    time.sleep(0.1)

            threading.Thread(target=run_writes, daemon=True).start()
            assert attached.stdout is not None
            assert read_line(attached.stdout) == "tick\n"
            writing.clear()
            with mstate.update(d) as cur:  # that run ends with 3
                cur.status, cur.exit_code, cur.finished_at = mstate.EXITED, 3, mstate.now()
            assert attached.wait(timeout=60) == 3
        finally:
            writing.clear()
            attached.kill()
            attached.wait()


def test_logs_of_a_machine_without_log_files_print_nothing_with_or_without_follow(
    tmp_path: Path,
) -> None:
    """An `ember run` killed before the logs were made leaves a record without them:
    `logs -f` failed with "No such file or directory: .../stdout.log", exit 1."""
    _record(Home(tmp_path), "nologs", status=mstate.EXITED, exit_code=137)
    for args in ((), ("-f",), ("-f", "--tail", "3"), ("-t",)):
        res = _ember(tmp_path, "logs", *args, "nologs")
        assert (res.returncode, res.stdout, res.stderr) == (0, "", ""), args


def test_rename_as_docker(tmp_path: Path) -> None:
    # (names no id can start with: "a" was also a unique prefix of a random "a780..." id)
    home = Home(tmp_path)
    first = _record(home, "web", status=mstate.EXITED, exit_code=0, finished_at=mstate.now())
    _record(home, "job", status=mstate.EXITED, exit_code=0, finished_at=mstate.now())
    done = _ember(tmp_path, "rename", "web", "new")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert mstate.read_state(MachineStore(home).dir(first.id)).name == "new"
    assert _ember(tmp_path, "inspect", "web").returncode != 0
    # by id prefix too, and back
    assert _ember(tmp_path, "rename", first.id[:8], "web").returncode == 0
    for args, said in [
        (("web", "job"), "ember: the name 'job' is already used by machine "),
        (("web", "web"), "ember: machine web is already named 'web'"),
        (("web", "no way"), "ember: invalid machine name 'no way'"),
        (("nosuch", "x"), "ember: no such machine: nosuch"),
    ]:
        res = _ember(tmp_path, "rename", *args)
        assert res.returncode != 0 and res.stderr.startswith(said), res
        assert "Traceback" not in res.stderr
    assert sorted(m.name for m in MachineStore(home).list()) == ["job", "web"]


def test_ps_format_mounts_are_the_volumes_names(tmp_path: Path) -> None:
    home = Home(tmp_path)
    st = _record(home, "withvol", status=mstate.EXITED, exit_code=0, finished_at=mstate.now())
    with mstate.update(MachineStore(home).dir(st.id)) as cur:
        cur.vm.volumes = ["data:/data", "logs:/var/log:ro"]
    res = _ember(tmp_path, "ps", "-a", "--format", "{{.Names}} {{.Mounts}} {{.LocalVolumes}}")
    assert (res.returncode, res.stdout) == (0, "withvol data,logs 2\n"), res.stderr


def test_the_command_is_quoted_as_docker_quotes_it(tmp_path: Path) -> None:
    """Quotes and backslashes in it were shown bare between the quotes: `"sh -c echo "hi"
    \\ x"` read back as another command."""
    home = Home(tmp_path)
    _record(home, "q", command=["sh", "-c", 'echo "hi" \\ x'], status=mstate.EXITED,
            exit_code=0, finished_at=mstate.now())  # fmt: skip
    res = _ember(tmp_path, "ps", "-a", "--no-trunc", "--format", "{{.Command}}")
    assert res.stdout == '"sh -c echo \\"hi\\" \\\\ x"\n', res.stderr
