"""A real ``ember agent`` serving the real ``ember`` CLI."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.agent import prefault, protocol
from tests.support.cli import EMBER, ember_env, run_ember
from tests.support.registry import free_port
from tests.support.spawn import spawn_server

TIMEOUT = 30.0


class RunningAgent:
    def __init__(self, home: Path, *options: str, prefix: tuple[str, ...] = ()) -> None:
        self.home = home
        self.socket = home / "run" / "agent.sock"
        self.log = home.parent / f"{home.name}-agent.log"
        self.process = spawn_server([*prefix, EMBER, "agent", *options], self.log)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while "serving" not in self.log_text():
            assert self.process.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while needle not in (text := self.log_text()):
            assert time.monotonic() < deadline, f"{needle!r} not in the agent's log:\n{text}"
            time.sleep(0.05)
        return text

    def served(self) -> int:
        return self.log_text().count("-> exit")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(TIMEOUT)
        # every test's stop checks this: a SIGTERM that reached a relay just forked was
        # lost in it, and the stop took the agent's 5 s grace and a SIGKILL (1 in 5 stops
        # after a declined caller)
        assert "did not stop on SIGTERM" not in self.log_text(), self.log_text()[-2000:]


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """Without ``EMBER_AGENT`` (unless ``extra`` sets it): commands go to the agent."""
    return ember_env(home, **{"EMBER_AGENT": None, **extra})


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningAgent]:
    home = tmp_path / "home"
    monkeypatch.setenv("EMBER_HOME", str(home))  # spawn_server passes the environment on
    running = RunningAgent(home)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def ember(
    home: Path, *args: str, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, env=env_for(home), cwd=cwd, input=input, timeout=TIMEOUT)


def test_a_command_runs_in_the_agent_with_the_callers_directory_and_output(
    agent: RunningAgent, busybox_layout: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = ember(agent.home, "image", "unpack", f"oci:{busybox_layout}:latest", "rootfs", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "unpacked" in proc.stderr  # the summary line goes to stderr, as run locally
    assert (work / "rootfs" / "bin" / "busybox").is_file()  # relative to the caller's cwd
    agent.wait_log("ember image unpack -> exit 0")
    listed = ember(agent.home, "image", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert f"oci:{busybox_layout}:latest" in listed.stdout
    # the relay logs after it has told the client the exit status
    agent.wait_log("ember image ls -> exit 0")
    assert agent.served() == 2


def test_commands_at_once_and_back_to_back_are_all_served_by_the_agent(
    agent: RunningAgent,
) -> None:
    # The relay for the next command is forked when the running one ends, after a
    # while, or at once when a caller waits: each way here.
    spare = _spare_runner(agent, prefaulted=False)
    waiting = _login_waiting_for_its_password(agent)
    try:
        _wait_until_it_runs(agent, spare, waiting)
        for _ in range(3):  # while it waits for its password; then back to back
            proc = ember(agent.home, "--version")
            assert proc.returncode == 0, proc.stderr
        assert waiting.poll() is None
        _give_the_password(waiting)
    finally:
        waiting.kill()
    agent.wait_log("ember registry login")
    assert agent.served() == 4, agent.log_text()


def test_a_ctrl_c_of_a_command_leaves_the_agent_serving(agent: RunningAgent) -> None:
    # The runner handles SIGINT in Python; the agent's signal wakeup pipe, inherited
    # by its relays and runners, once took that for a stop of the agent itself.
    spare = _spare_runner(agent, prefaulted=False)
    waiting = _login_waiting_for_its_password(agent)
    try:
        _wait_until_it_runs(agent, spare, waiting)
        # the client installs its forwarding as "started" comes, just after the
        # runner took its descriptors
        time.sleep(0.2)
        waiting.send_signal(signal.SIGINT)  # forwarded to the command's group
        assert waiting.wait(TIMEOUT) == 130
    finally:
        waiting.kill()
    # 130: the runner itself got the Ctrl-C (a hang-up, had the client not forwarded
    # it, ends it with 129)
    agent.wait_log("ember registry login -> exit 130")
    proc = ember(agent.home, "--version")
    assert proc.returncode == 0, proc.stderr
    agent.wait_log("-> exit 0")  # served by the agent, which did not stop
    assert agent.process.poll() is None, agent.log_text()
    assert "stopping" not in agent.log_text()


def test_errors_and_exit_codes_come_back_as_if_run_locally(agent: RunningAgent) -> None:
    missing = ember(agent.home, "image", "inspect", "nosuch")
    assert missing.returncode == 1
    assert missing.stderr.startswith("ember: image docker.io/library/nosuch:latest is not in")
    assert "Traceback" not in missing.stderr
    usage = ember(agent.home, "image", "frobnicate")
    assert usage.returncode == 2
    assert "No such command" in usage.stderr
    agent.wait_log("ember image frobnicate -> exit 2")


def test_stdin_reaches_the_command(agent: RunningAgent, auth_registry) -> None:  # type: ignore[no-untyped-def]
    proc = ember(
        agent.home, "registry", "login", "-u", auth_registry.username, "--password-stdin",
        auth_registry.host, input=auth_registry.password + "\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert auth_registry.host in (agent.home / "credentials.json").read_text()
    agent.wait_log("ember registry login -> exit 0")


def _wait_port(port: int, *, open_: bool) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        with socket.socket() as s:
            is_open = s.connect_ex(("127.0.0.1", port)) == 0
        if is_open == open_:
            return
        assert time.monotonic() < deadline, f"port {port} still {'closed' if open_ else 'open'}"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["ctrl-c", "client killed"])
def test_signals_reach_the_command_and_a_vanished_caller_hangs_it_up(
    agent: RunningAgent, how: str
) -> None:
    port = free_port()
    client = subprocess.Popen(
        [EMBER, "server", "--listen", f"127.0.0.1:{port}"],
        env=env_for(agent.home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, open_=True)
        assert "ember server" not in agent.log_text()  # still running, in the agent
        if how == "ctrl-c":
            client.send_signal(signal.SIGINT)
            client.wait(TIMEOUT)
        else:
            client.kill()
            client.wait(TIMEOUT)
        _wait_port(port, open_=False)  # the server (the agent's child) is gone too
        agent.wait_log("ember server -> exit")
    finally:
        client.kill()


def _listener_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return int(out.split("pid=", 1)[1].split(",", 1)[0])


def test_a_command_whose_relay_dies_is_hung_up(agent: RunningAgent) -> None:
    """The relay is a command's only link to its caller: killed (the OOM killer, a kill
    -9), its client said "lost the connection" and exited 1, and the command went on
    running for nobody, writing to the caller's terminal."""
    port = free_port()
    client = subprocess.Popen(
        [EMBER, "server", "--listen", f"127.0.0.1:{port}"], env=env_for(agent.home),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    runner = None
    try:
        _wait_port(port, open_=True)
        runner = _listener_pid(port)
        with open(f"/proc/{runner}/stat") as f:
            relay = int(f.read().rsplit(")", 1)[1].split()[1])
        assert relay != agent.process.pid
        os.kill(relay, signal.SIGKILL)
        _, err = client.communicate(timeout=TIMEOUT)
        assert client.returncode == 1 and b"lost the connection" in err
        _wait_port(port, open_=False)  # the command is hung up with it
    finally:
        client.kill()
        client.wait()
        if runner is not None:  # (left running for nobody, as it was)
            with contextlib.suppress(ProcessLookupError):
                os.kill(runner, signal.SIGKILL)


def test_a_signal_the_caller_ignores_is_not_forwarded(agent: RunningAgent) -> None:
    """`nohup ember server &` then a SIGHUP (the terminal closing): the client forwarded
    it over the ignore it inherited, and the server through the agent died of it."""
    port = free_port()
    client = subprocess.Popen(
        [EMBER, "server", "--listen", f"127.0.0.1:{port}"],
        env=env_for(agent.home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )  # fmt: skip
    try:
        _wait_port(port, open_=True)
        client.send_signal(signal.SIGHUP)
        time.sleep(1)  # (what a forwarded HUP did, it did by then: nothing is timed)
        assert client.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=TIMEOUT).status_code == 401
        client.send_signal(signal.SIGTERM)
        assert client.wait(TIMEOUT) == 0
        assert "signal 1" not in agent.log_text() and agent.served() == 1
        agent.wait_log("ember server -> exit 0")
    finally:
        client.kill()


@pytest.mark.parametrize("stream", ["stdin", "stdout", "stderr"])
def test_a_command_at_a_terminal_runs_in_the_callers_session(
    agent: RunningAgent, stream: str
) -> None:
    """The runner is in a session of its own: the terminal never stops it for reading
    (SIGTTIN), so after Ctrl-Z, or started with "&", a prompt read what was typed at the
    shell; nor does Ctrl-Z stop it writing there (`ember pull ... </dev/null` drew its
    progress over the shell's prompt).  With a terminal as stdin, stdout or stderr the
    client runs the command itself."""
    import pty

    leader, follower = pty.openpty()
    streams: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                               "stderr": subprocess.PIPE, stream: follower}  # fmt: skip
    try:
        proc = subprocess.run(
            [EMBER, "image", "ls"], env=env_for(agent.home), **streams, timeout=TIMEOUT,
        )  # fmt: skip
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 0, proc.stderr
    assert agent.served() == 0
    assert ember(agent.home, "image", "ls").returncode == 0  # (stdin a pipe: the agent's)
    agent.wait_log("image ls -> exit 0")


@contextlib.contextmanager
def _stand_in_agent(home: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """A client running `ember image ls` and the connection of a stand-in agent (a plain
    socket at the agent's path), once the client's request has been read whole."""
    (home / "run").mkdir(parents=True, exist_ok=True)
    path = home / "run" / "agent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        client = subprocess.Popen(
            [EMBER, "image", "ls"], env=env_for(home), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            listener.settimeout(TIMEOUT)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                header = conn.recv(protocol.HEADER)  # the request has been sent
                assert len(header) == protocol.HEADER
                _read_all(conn, protocol.frame_length(header))
                yield client, conn
        finally:
            if client.poll() is None:  # (a failed assertion: not left behind)
                client.kill()
                client.wait()
            path.unlink()


def test_a_signal_before_the_agent_answers_goes_to_the_command_it_started(tmp_path: Path) -> None:
    """Ctrl-C after the request was sent but before the agent said "started" raised
    KeyboardInterrupt in the client: it said "interrupted" and hung up, while the agent
    may have started the command already (then hung up, not interrupted, its output
    still coming after the shell's prompt).  Now the signal waits for the answer: it is
    forwarded to a command that started, and acts here as before on one that did not."""
    for answer in (protocol.started(4242), protocol.declined("no")):
        with _stand_in_agent(tmp_path / "home") as (client, conn):
            client.send_signal(signal.SIGINT)
            with contextlib.suppress(OSError):  # (the client of old was gone by now)
                conn.sendall(protocol.frame(answer))
            if answer[:1] == b"S":
                header = conn.recv(protocol.HEADER)
                assert header, "the client hung up instead of passing the signal on"
                message = _read_all(conn, protocol.frame_length(header))
                assert protocol.parse_signal(message) == signal.SIGINT
                conn.sendall(protocol.frame(protocol.exited(130)))
            out, err = client.communicate(timeout=TIMEOUT)
        assert client.returncode == 130, err
        if answer[:1] == b"S":
            assert b"interrupted" not in err  # the command's to say, and it said nothing
        else:  # declined: the command never started, and is not run here either
            assert err == b"ember: interrupted\n" and out == b""


def test_a_second_signal_before_an_agent_that_never_answers_acts_here(tmp_path: Path) -> None:
    """Held until the agent answered, signals could not stop a client whose agent never
    did (stopped, wedged): it took a SIGKILL.  A second one gives up the wait."""
    with _stand_in_agent(tmp_path / "home") as (client, _):
        client.send_signal(signal.SIGINT)  # held: the agent may be starting it
        # (another signal: two SIGINTs may arrive as one)
        client.send_signal(signal.SIGTERM)
        out, err = client.communicate(timeout=TIMEOUT)
    assert client.returncode == 130 and err == b"ember: interrupted\n", err
    assert out == b""


def _read_all(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "the client closed the connection"
        data += chunk
    return data


def test_a_command_killed_by_sigkill_kills_its_client_alike(agent: RunningAgent) -> None:
    """The OOM killer's SIGKILL on the runner: the client printed a traceback (a
    disposition cannot be set for SIGKILL) and exited 1, instead of dying of it."""
    port = free_port()
    client = subprocess.Popen(
        [EMBER, "server", "--listen", f"127.0.0.1:{port}"],
        env=env_for(agent.home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_port(port, open_=True)
        listening = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                                   text=True, check=True).stdout  # fmt: skip
        runner = int(listening.split("pid=")[1].split(",")[0])
        assert runner != client.pid  # the command runs in the agent's runner
        os.kill(runner, signal.SIGKILL)
        _, err = client.communicate(timeout=TIMEOUT)
    finally:
        client.kill()
    assert client.returncode == -signal.SIGKILL, err
    assert "Traceback" not in err


def test_a_caller_in_another_network_namespace_runs_the_command_itself(
    agent: RunningAgent,
) -> None:
    ns = f"ember-agent-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, EMBER, "image", "ls"],
            env=env_for(agent.home), capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "REFERENCE" in proc.stdout
        agent.wait_log("declined")
        assert "namespace" in agent.log_text()
        assert agent.served() == 0
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


@pytest.mark.parametrize(
    ("setpriv", "said"),
    [
        (["--bounding-set", "-net_admin"], "other capabilities"),
        (["--no-new-privs"], "no_new_privs"),
        (["--groups", "4242"], "group ids"),
        (["--regid", "4242", "--keep-groups"], "group ids"),
    ],
    ids=["capability", "nnp", "groups", "gid"],
)
def test_a_caller_with_fewer_privileges_runs_the_command_itself(
    agent: RunningAgent, setpriv: list[str], said: str
) -> None:
    """Root without CAP_NET_ADMIN (or under no_new_privs) is still uid 0: the agent ran
    its commands with all of the agent's capabilities.  Nor were the caller's groups
    compared: a caller without a group of the agent's read files through it that it
    could not read itself (and one with other groups lost theirs)."""
    proc = subprocess.run(
        ["setpriv", *setpriv, EMBER, "image", "ls"],
        env=env_for(agent.home), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "REFERENCE" in proc.stdout
    assert said in agent.wait_log("declined")
    assert agent.served() == 0


def test_a_caller_under_seccomp_filters_runs_the_command_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc says how many seccomp filters a process has, not which: an agent under one
    filter (a service's SystemCallFilter=) served any caller under one filter of its
    own, whatever that filter forbade."""
    import sys

    home = tmp_path / "home"
    monkeypatch.setenv("EMBER_HOME", str(home))
    under_filter = (sys.executable, "-m", "tests.support.seccomp_exec")
    running = RunningAgent(home, prefix=under_filter)
    try:
        running.wait_ready()
        proc = subprocess.run(
            [*under_filter, EMBER, "image", "ls"],
            env=env_for(home), capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "seccomp filters, which cannot be compared" in running.wait_log("declined")
        assert running.served() == 0
    finally:
        running.stop()


def _raw(agent: RunningAgent, payload: bytes, fds: list[int] | None = None) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(agent.socket))
        if fds:
            socket.send_fds(s, [payload], fds)
        else:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_hostile_requests_are_refused_and_the_agent_keeps_serving(agent: RunningAgent) -> None:
    from ember.agent import protocol

    good = protocol.encode_request(protocol.Request([b"--version"], b"/", [], 0o022))
    with open(os.devnull, "r+b") as null:
        three = [null.fileno()] * 3
        assert _raw(agent, b"GET / HTTP/1.1\r\n\r\n") == b""  # absurd length
        assert _raw(agent, protocol.frame(b"garbage"), three) == b""
        assert _raw(agent, protocol.frame(good)) == b""  # no descriptors
        assert _raw(agent, protocol.frame(good), three + three) == b""  # too many
        assert _raw(agent, protocol.frame(good)[:-3], three) == b""  # cut short
    text = agent.wait_log("refused a request")
    assert text.count("refused a request") == 5
    assert agent.process.poll() is None
    proc = ember(agent.home, "--version")
    assert proc.returncode == 0 and "ember" in proc.stdout
    agent.wait_log("-> exit 0")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def _private_dirty_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError(f"no Private_Dirty for {pid}")


def _spare_runner(agent: RunningAgent, *, prefaulted: bool, besides: int = 0) -> int:
    """The runner the idle relay keeps forked ahead (once it has its own copy of the heap);
    ``besides``: a runner that has a command now."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        relays = _children(agent.process.pid)
        runners = [r for relay in relays for r in _children(relay) if r != besides]
        if len(runners) == 1:
            runner = runners[0]
            if not prefaulted or _private_dirty_kib(runner) > 8 * 1024:
                return runner
        assert time.monotonic() < deadline, (relays, runners)
        time.sleep(0.05)


def _login_waiting_for_its_password(agent: RunningAgent) -> subprocess.Popen[str]:
    """A command through the agent that waits on its stdin (nothing listens on port 9:
    given a password, it fails with a clean error)."""
    return subprocess.Popen(
        [EMBER, "registry", "login", "-u", "someone", "--password-stdin", "127.0.0.1:9"],
        env=env_for(agent.home), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _give_the_password(client: subprocess.Popen[str]) -> None:
    assert client.stdin is not None
    client.stdin.write("secret\n")
    client.stdin.close()
    client.wait(TIMEOUT)


def _wait_until_it_runs(agent: RunningAgent, runner: int, client: subprocess.Popen[str]) -> None:
    """Until ``runner`` holds the client's stdin pipe as its own: it is the command."""
    assert client.stdin is not None
    ours = os.fstat(client.stdin.fileno())
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            theirs = os.stat(f"/proc/{runner}/fd/0")
            if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
                return
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, agent.log_text()
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/status").read_text(errors="replace")
        if "\nState:\tZ" in status:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_command_runs_in_the_runner_forked_and_pre_faulted_ahead(
    agent: RunningAgent,
) -> None:
    spare = _spare_runner(agent, prefaulted=True)
    client = _login_waiting_for_its_password(agent)
    try:
        _wait_until_it_runs(agent, spare, client)
        assert os.getpgid(spare) == spare  # its own group, for the forwarded signals
        held = [os.readlink(f) for f in Path(f"/proc/{spare}/fd").iterdir()]
        assert "anon_inode:inotify" not in held  # the agent's code watch is not the command's
        assert os.sched_getscheduler(spare) == os.sched_getscheduler(agent.process.pid)
        fresh = _spare_runner(agent, prefaulted=False, besides=spare)  # the next relay's
        _give_the_password(client)
    finally:
        client.kill()
    assert client.returncode == 1  # nothing listens on port 9: a clean error, not a hang
    assert client.stderr is not None and "Traceback" not in client.stderr.read()
    agent.stop()
    assert _gone(fresh)  # a stopping agent leaves no runner waiting


def test_no_prefault_leaves_the_waiting_runner_sharing_the_agents_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("EMBER_HOME", str(home))
    sharing = RunningAgent(home, "--no-prefault")
    try:
        sharing.wait_ready()
        runner = _spare_runner(sharing, prefaulted=False)
        time.sleep(prefault.DELAY + 1.0)  # a pre-faulting runner would have copied by now
        assert _private_dirty_kib(runner) < 8 * 1024
        proc = ember(home, "image", "ls")
        assert proc.returncode == 0, proc.stderr
        sharing.wait_log("ember image ls -> exit 0")
    finally:
        sharing.stop()


def test_one_agent_per_home_and_its_socket_goes_when_it_stops(agent: RunningAgent) -> None:
    second = subprocess.run(
        [EMBER, "agent"], env=env_for(agent.home), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert second.returncode == 1
    assert "an agent already serves" in second.stderr
    agent.stop()
    assert not agent.socket.exists()
    proc = ember(agent.home, "image", "ls")  # runs locally now
    assert proc.returncode == 0, proc.stderr


def test_ember_agent_0_and_home_on_the_command_line_bypass_the_agent(agent: RunningAgent) -> None:
    off = subprocess.run(
        [EMBER, "image", "ls"], env=env_for(agent.home, EMBER_AGENT="0"),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert off.returncode == 0, off.stderr
    named = ember(agent.home, "--home", str(agent.home), "image", "ls")
    assert named.returncode == 0, named.stderr
    assert agent.served() == 0


def test_commands_outlive_an_agent_killed_with_9_and_a_new_agent_can_start(
    agent: RunningAgent,
) -> None:
    port = free_port()
    runner = _spare_runner(agent, prefaulted=False)  # the one the command will run in
    client = subprocess.Popen(
        [EMBER, "server", "--listen", f"127.0.0.1:{port}"],
        env=env_for(agent.home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port, open_=True)
        spare = _spare_runner(agent, prefaulted=False, besides=runner)
        agent.process.kill()
        agent.process.wait(TIMEOUT)
        assert _gone(spare)  # with the relay that waited above it
        # the relay that waited for the next command dies with the agent; nothing
        # else holds the agent's lock, so a new agent starts on the same home
        successor = RunningAgent(agent.home)
        try:
            successor.wait_ready()
            proc = ember(agent.home, "image", "ls")
            assert proc.returncode == 0, proc.stderr
            successor.wait_log("ember image ls -> exit 0")
            assert successor.served() == 1  # only the successor's relay took it
            with socket.socket() as s:  # the command started under the old agent still runs
                assert s.connect_ex(("127.0.0.1", port)) == 0
            client.send_signal(signal.SIGINT)
            client.wait(TIMEOUT)
            _wait_port(port, open_=False)
        finally:
            successor.stop()
    finally:
        client.kill()


def test_a_client_of_another_installation_runs_the_command_itself(
    init_that_does_not_reap: None, agent: RunningAgent, tmp_path: Path
) -> None:
    import shutil

    import ember

    other = tmp_path / "other-install"
    shutil.copytree(
        Path(ember.__file__).parent, other / "ember", ignore=shutil.ignore_patterns("__pycache__")
    )
    relay = _waiting_relays(agent, set())  # the one that declines it
    proc = subprocess.run(
        [sys.executable, "-c", "from ember.agent.client import main; main()", "image", "ls"],
        env=env_for(agent.home, PYTHONPATH=str(other)), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "REFERENCE" in proc.stdout
    text = agent.wait_log("declined")
    assert f"runs ember from {other}" in text
    assert agent.served() == 0
    # the runner it kept waiting for a command was reaped, not left a zombie
    _sessions_ended(relay)


def test_a_client_sending_garbage_mid_command_is_ignored_and_hanging_up_ends_the_command(
    agent: RunningAgent,
) -> None:
    from ember.agent import client, protocol

    port = free_port()
    env = [f"{k}={v}".encode() for k, v in env_for(agent.home).items()]
    request = protocol.Request(
        [b"server", b"--listen", f"127.0.0.1:{port}".encode()], b"/", env, 0o022,
        os.fsencode(os.path.realpath(client.__file__)),
    )  # fmt: skip
    with open(os.devnull, "r+b") as null, socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(agent.socket))
        socket.send_fds(s, [protocol.frame(protocol.encode_request(request))], [null.fileno()] * 3)
        assert s.recv(4 + 64)[4:5] == b"S"  # started
        _wait_port(port, open_=True)
        s.sendall(protocol.frame(b"K9"))  # SIGKILL is not a signal a client may forward
        agent.wait_log("ignoring the caller from now on")
        with socket.socket() as probe:  # the command goes on
            assert probe.connect_ex(("127.0.0.1", port)) == 0
    # the connection closed: the command is hung up, as by a closing terminal
    _wait_port(port, open_=False)
    agent.wait_log("ember server -> exit")


@pytest.mark.parametrize(
    ("said", "code"),
    [(b"0", 0), (b"2", 2), (b"255", 255), (b"", None), (b"256", None), (b"-1", None),
     (b"1x", None), (b"0123", None)],
)  # fmt: skip
def test_the_exit_code_a_runner_says_early_is_read_strictly(said: bytes, code: int | None) -> None:
    from ember.agent.server import _exit_code_said

    mine, its = socket.socketpair()
    with mine, its:
        if said:
            its.send(said)
        its.close()
        assert _exit_code_said(mine) == code


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name: state, ppid, pgrp, session, ...
    (a zombie's too); None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses


def _in_session(sid: int) -> dict[int, str]:
    """The processes of session ``sid``, zombies included: pid -> state."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None and int(fields[3]) == sid:
            found[int(entry)] = fields[0]
    return found


# Who the agent's processes are, whatever their pids (they wrap every few minutes under a
# test run, so "a pid above the agent's" says nothing): each relay is the agent's child
# and leads a session of its own (setsid), which its runner and the runner's applier
# child stay in, also once orphaned, and also as zombies.  A session's id is its leader's
# pid, which the kernel gives no other process while anything of the session is left.


@pytest.fixture
def init_that_does_not_reap() -> Iterator[None]:
    """This process as the subreaper of its descendants for one test: what the agent's
    processes leave orphaned comes to us, and stays a zombie, as under an init that does
    not reap (this host's reaps, and hid such leaks).  Requested before ``agent``, it
    outlives it; what came to us is reaped at the end."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def _waiting_relays(agent: RunningAgent, known: set[int]) -> set[int]:
    """The relay the agent keeps waiting in accept() for the next command: its children
    that are none of the relays ``known`` (those had a command, or were seen before)."""
    deadline = time.monotonic() + TIMEOUT
    while not (new := set(_children(agent.process.pid)) - known):
        assert agent.process.poll() is None, agent.log_text()
        assert time.monotonic() < deadline, "the agent has no relay waiting"
        time.sleep(0.01)
    return new


def _sessions_ended(sessions: set[int]) -> None:
    """Until nothing is left in ``sessions`` (the relays' sessions): each relay, runner
    and applier gone, reaped by its parent.  One left a zombie stays one for ever where
    init does not reap (as here), and fails the test; so does one that never exits."""
    deadline = time.monotonic() + TIMEOUT
    while left := {sid: procs for sid in sorted(sessions) if (procs := _in_session(sid))}:
        assert time.monotonic() < deadline, f"left in the relays' sessions (pid: state): {left}"
        time.sleep(0.05)


def test_commands_leave_no_zombies_behind(
    init_that_does_not_reap: None, agent: RunningAgent
) -> None:
    """Runners and the applier children they fork ahead are reaped by us, not left to
    an init that may not reap (whether the command used the applier or not)."""
    relays: set[int] = set()
    for words in (["image", "ls"], ["--version"], ["image", "frobnicate"]):
        relays |= _waiting_relays(agent, relays)  # the one that takes this command
        ember(agent.home, *words)
    agent.wait_log("ember image frobnicate -> exit 2")
    # (only the sessions of this agent's relays that had a command: a stopped agent's
    # idle relay and runner may still be dying around us, and become zombies where init
    # does not reap; the relay waiting now keeps its runner and applier)
    _sessions_ended(relays)


def test_a_stopping_agent_reaps_its_waiting_relay_runner_and_applier(
    init_that_does_not_reap: None, agent: RunningAgent
) -> None:
    runner = _spare_runner(agent, prefaulted=False)
    deadline = time.monotonic() + TIMEOUT
    while not _children(runner):  # the applier child it forks ahead
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (applier,) = _children(runner)
    (relay,) = _children(agent.process.pid)
    # what finds them once orphaned (their parents gone): the relay's session
    assert set(_in_session(relay)) == {relay, runner, applier}, _in_session(relay)
    agent.stop()
    # gone, not zombies: nothing left of the relay's session
    _sessions_ended({relay})


def _server_request(agent: RunningAgent, port: int) -> bytes:
    from ember.agent import client, protocol

    env = [f"{k}={v}".encode() for k, v in env_for(agent.home).items()]
    request = protocol.Request(
        [b"server", b"--listen", f"127.0.0.1:{port}".encode()], b"/", env, 0o022,
        os.fsencode(os.path.realpath(client.__file__)),
    )  # fmt: skip
    return protocol.frame(protocol.encode_request(request))


def test_a_caller_gone_before_its_command_started_still_hangs_it_up(agent: RunningAgent) -> None:
    """A client killed right after sending its request (Ctrl-C as `ember run` starts):
    telling it "started" failed (EPIPE), the relay died and left the command running
    with nobody to hang it up."""
    port = free_port()
    with open(os.devnull, "r+b") as null, socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.socket))
        socket.send_fds(s, [_server_request(agent, port)], [null.fileno()] * 3)
    agent.wait_log("ember server -> exit")
    _wait_port(port, open_=False)
    assert "relay failed" not in agent.log_text()


def _fake_agent_of_nobody(path: Path) -> tuple[int, int]:
    """A process of user nobody listening on ``path``: its pid, and a pipe on which it
    says how many bytes its first client sent it."""
    r, w = os.pipe()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        pid = os.fork()
        if pid == 0:  # nothing but system calls here, then _exit
            try:
                os.close(r)
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                listener.listen(1)  # SO_PEERCRED names who called listen(): nobody
                listener.settimeout(TIMEOUT)
                conn, _ = listener.accept()
                conn.settimeout(5)
                got = 0
                with contextlib.suppress(TimeoutError):
                    while chunk := conn.recv(1 << 16):
                        got += len(chunk)
                os.write(w, b"%d" % got)
            finally:
                os._exit(0)
    os.close(w)
    return pid, r


def test_the_client_hands_nothing_to_an_agent_of_another_user(tmp_path: Path) -> None:
    """A socket at $EMBER_HOME/run/agent.sock served by another user (a state directory
    in a shared place): the client sent it its environment and its stdin/stdout/stderr
    (a terminal another user could type into), and would have obeyed its answers."""
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    sock = home / "run" / "agent.sock"
    pid, said = _fake_agent_of_nobody(sock)
    try:
        deadline = time.monotonic() + TIMEOUT
        listening = ["ss", "-xlH", "src", str(sock)]
        while "LISTEN" not in subprocess.run(listening, capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc = ember(home, "--version")
        assert proc.returncode == 0, proc.stderr  # run here instead
        with os.fdopen(said) as pipe:
            assert pipe.read() == "0"  # not a byte of the request
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_caller_cannot_forge_lines_of_the_agents_log(agent: RunningAgent) -> None:
    """The log quoted the caller's words and code path as they came: a newline in
    them started a line of the caller's choosing."""
    from ember.agent import client, protocol

    forged = b"\n00:00:00 ember agent: pid 1: ember x"
    own = os.fsencode(os.path.realpath(client.__file__))
    with open(os.devnull, "r+b") as null:
        for argv, code in (([forged], own), ([b"--version"], b"/elsewhere" + forged)):
            request = protocol.Request(argv, b"/", [], 0o022, code)
            _raw(agent, protocol.frame(protocol.encode_request(request)), [null.fileno()] * 3)
    agent.wait_log("declined")
    agent.wait_log("-> exit")
    lines = agent.log_text().splitlines()
    assert not [line for line in lines if line.startswith("00:00:00")], lines


def test_a_state_directory_too_deep_for_a_socket_is_one_clear_line(tmp_path: Path) -> None:
    """bind()'s "AF_UNIX path too long" has no strerror: the message ended in "None"."""
    home = tmp_path / ("d" * 110)
    proc = subprocess.run(
        [EMBER, "agent"], env=env_for(home), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("ember: cannot create the agent's socket")
    assert proc.stderr.rstrip().endswith("AF_UNIX path too long"), proc.stderr


def test_a_state_directory_whose_socket_fits_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket was bound under ".agent.sock.PID" first: a home whose socket path fits
    the 107 bytes the client accepts failed on the longer temporary name."""
    socket_tail = len("/run/agent.sock")
    home = tmp_path / ("d" * (107 - socket_tail - len(str(tmp_path)) - 1))
    assert len(str(home / "run" / "agent.sock")) == 107
    monkeypatch.setenv("EMBER_HOME", str(home))
    running = RunningAgent(home)
    try:
        running.wait_ready()
        assert ember(home, "image", "ls").returncode == 0
        running.wait_log("image ls -> exit 0")
    finally:
        running.stop()


def test_a_working_directory_too_long_to_enter_by_path_runs_here(agent: RunningAgent) -> None:
    """A caller in a directory whose path is past PATH_MAX: the runner could not chdir
    there, and the command failed ("cannot enter the working directory")."""
    base = agent.home.parent / "deep"
    base.mkdir()

    def descend() -> None:  # (a path this long can only be reached step by step)
        os.chdir(base)
        for _ in range(20):
            os.makedirs("d" * 250, exist_ok=True)
            os.chdir("d" * 250)

    proc = subprocess.run([EMBER, "image", "ls"], env=env_for(agent.home), capture_output=True,
                          text=True, timeout=TIMEOUT, preexec_fn=descend)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert agent.served() == 0
    shutil.rmtree(base)


def _restricted_connect(path: Path, sock: socket.socket) -> int:
    """A child that takes no_new_privs, connects ``sock`` (so SO_PEERCRED names it) and
    exits; reaped before this returns, so that its pid is free again.  Its pid."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.fork()
    if pid == 0:
        try:
            if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
                os._exit(2)
            sock.connect(str(path))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def _fork_holding_pid(pid: int) -> int | None:
    """A sleeping, unrestricted child that got the number ``pid`` (through ns_last_pid, as
    checkpoint/restore tools do), or None if another process took it first."""
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    child = os.fork()
    if child == 0:
        time.sleep(TIMEOUT)
        os._exit(0)
    if child == pid:
        return child
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return None


def test_a_caller_whose_pid_is_reused_by_a_stronger_process_is_declined(
    agent: RunningAgent,
) -> None:
    """A restricted process connects and exits; an unrestricted one gets its pid; the
    request then comes over the first one's connection.  The agent checked the caller
    by pid once the request had come, so it checked the second process and ran the
    command with privileges the caller never had (found by a security review: the
    attacker cycles through the pids, here ns_last_pid does it at once)."""
    from ember.agent import protocol

    good = protocol.encode_request(
        protocol.Request([b"--version"], b"/", [], 0o022, os.fsencode(agent_client_code()))
    )
    for _ in range(20):
        with socket.socket(socket.AF_UNIX) as s, open(os.devnull, "r+b") as null:
            pid = _restricted_connect(agent.socket, s)
            holder = _fork_holding_pid(pid)
            if holder is None:
                continue  # the host forked something meanwhile: try again
            try:
                with contextlib.suppress(OSError):  # a declined caller's socket may be closed
                    socket.send_fds(s, [protocol.frame(good)], [null.fileno()] * 3)
                s.settimeout(TIMEOUT)
                with contextlib.suppress(OSError):
                    s.recv(4096)
            finally:
                os.kill(holder, signal.SIGKILL)
                os.waitpid(holder, 0)
            assert f"declined pid {pid}" in agent.wait_log(f"pid {pid}")
            assert agent.served() == 0
            return
    pytest.skip("no free pid could be taken over (a busy host)")


def agent_client_code() -> str:
    from ember.agent import client

    return os.path.realpath(client.__file__)


def test_the_socket_is_the_users_alone(agent: RunningAgent) -> None:
    import stat as stat_module

    st = agent.socket.lstat()
    assert stat_module.S_ISSOCK(st.st_mode)
    assert stat_module.S_IMODE(st.st_mode) == 0o600


def test_a_relay_gone_before_the_agent_watches_it_does_not_end_the_agent() -> None:
    """A relay that took a caller, declined it and exited before the agent opened its
    pidfd (a loaded host) ended the agent with "No such process"."""
    from ember.agent.server import Agent

    gone = subprocess.Popen(["true"])
    gone.wait()
    r, w = os.pipe()
    try:
        assert Agent._wait_turn(gone.pid, r, w) is None
    finally:
        os.close(r)
        os.close(w)


def test_the_command_takes_the_callers_time_zone() -> None:
    """The runner took the caller's environment but kept the agent's time zone: `ember
    server`'s log said 03:38 where the caller's TZ said 12:38."""
    script = (
        "import os, time\n"
        "from ember.agent import protocol\n"
        "from ember.agent.server import _take_over_caller\n"
        "os.environ['TZ'] = 'UTC0'; time.tzset()\n"
        "req = protocol.Request([b'--version'], os.getcwdb(), [b'TZ=JST-9'], 0o022)\n"
        "_take_over_caller(req)\n"
        "print(time.strftime('%Z', time.localtime(0)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout.strip() == "JST", out.stderr


def test_a_password_that_is_not_utf8_is_one_line(agent: RunningAgent) -> None:
    """Through the agent the runner's stdin decoded strictly: a UnicodeDecodeError
    traceback (and locally too under a strict locale)."""
    for env in (env_for(agent.home), env_for(agent.home, EMBER_AGENT="0", PYTHONIOENCODING="utf-8:strict")):
        proc = subprocess.run(
            [EMBER, "registry", "login", "127.0.0.1:1", "-u", "bob", "--password-stdin"],
            input=b"p\xffw\n", env=env, capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == b"ember: the password on standard input is not valid UTF-8\n"
