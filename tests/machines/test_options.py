from __future__ import annotations

from pathlib import Path

import pytest

from ember.machines.errors import InvalidOption
from ember.machines.options import (
    check_hostname,
    check_kernel_arg,
    check_kernel_args,
    check_name,
    host_memory_mib,
    parse_add_host,
    parse_add_hosts,
    parse_dns,
    parse_dns_search,
    parse_env,
    parse_memory_mib,
    read_env_file,
)

HOST = {"FROM_HOST": "host value", "EMPTY": ""}


def test_env_entries() -> None:
    got = parse_env(["A=1", "B=", "C=x=y", "FROM_HOST", "EMPTY", "MISSING", "SP=a b"], HOST)
    assert got == ["A=1", "B=", "C=x=y", "FROM_HOST=host value", "EMPTY=", "SP=a b"]


@pytest.mark.parametrize("bad", ["=1", "A B=1", " A=1", "A\x00=1", "A=\x00", ""])
def test_env_rejects(bad: str) -> None:
    with pytest.raises(InvalidOption):
        parse_env([bad], HOST)


def test_env_file(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# comment\n\nA=1\n   B=two words\nFROM_HOST\nMISSING\nC='quoted'\n  # indented\n")
    assert read_env_file(f, HOST) == ["A=1", "B=two words", "FROM_HOST=host value", "C='quoted'"]


@pytest.mark.parametrize("sep", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_env_file_value_with_a_line_separator_sets_one_variable(tmp_path: Path, sep: str) -> None:
    """str.splitlines ended a line at these too: the rest of the value became a variable."""
    f = tmp_path / "env"
    f.write_bytes(f"GREETING=hi{sep}PATH=/evil\r\nB=2\n".encode())
    assert read_env_file(f, HOST) == [f"GREETING=hi{sep}PATH=/evil", "B=2"]


def test_env_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidOption, match="cannot read"):
        read_env_file(tmp_path / "missing", HOST)
    bad = tmp_path / "bad"
    bad.write_bytes(b"A=\xff\n")
    with pytest.raises(InvalidOption, match="UTF-8"):
        read_env_file(bad, HOST)
    spaced = tmp_path / "spaced"
    spaced.write_text("BAD KEY=1\n")
    with pytest.raises(InvalidOption, match="env file"):
        read_env_file(spaced, HOST)
    big = tmp_path / "big"
    big.write_bytes(b"A=" + b"x" * (1 << 20) + b"\n")
    with pytest.raises(InvalidOption, match="larger"):
        read_env_file(big, HOST)


def test_memory() -> None:
    assert parse_memory_mib("512") == 512
    assert parse_memory_mib("1G") == 1024
    assert parse_memory_mib("256m") == 256
    assert parse_memory_mib("128") == 128
    for bad in ("32", "0", "2T", "lots"):
        with pytest.raises(InvalidOption):
            parse_memory_mib(bad)
    # at 96 MiB the guest's kernel panicked loading modules, at 64 it thrashed for minutes
    for small in ("64", "96m", "127"):
        with pytest.raises(InvalidOption, match="a guest needs at least 128 MiB"):
            parse_memory_mib(small)


@pytest.mark.parametrize("good", ["web", "a", "my_app.v2-1", "A1"])
def test_names(good: str) -> None:
    assert check_name(good) == good


@pytest.mark.parametrize("bad", ["", "-web", "_x", "a/b", "a b", "x" * 64, "é", "/web", "web\n"])
def test_names_reject(bad: str) -> None:
    with pytest.raises(InvalidOption):
        check_name(bad)


def test_kernel_args() -> None:
    assert check_kernel_arg("loglevel=7") == "loglevel=7"
    for bad in ("", "a b", "a\nb", "x" * 257, "tab\there", "\x00", 'foo="', '"'):
        with pytest.raises(InvalidOption):
            check_kernel_arg(bad)


def test_kernel_args_are_bounded_in_all() -> None:
    """The guest's command line holds 2047 bytes; past that it hangs without a word."""
    assert check_kernel_args(["a=" + "x" * 254] * 3) == ("a=" + "x" * 254,) * 3
    with pytest.raises(InvalidOption, match="--kernel-arg: 1027 bytes in all"):
        check_kernel_args(["a=" + "x" * 254] * 4)


def test_memory_is_checked_against_the_hosts(tmp_path: Path) -> None:
    assert parse_memory_mib("1G", host_mib=4096) == 1024
    assert parse_memory_mib("1G", host_mib=None) == 1024  # unknown: not checked
    with pytest.raises(InvalidOption, match="more than this host's memory"):
        parse_memory_mib("8G", host_mib=4096)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683864 kB\nMemFree:  1 kB\n")
    assert host_memory_mib(meminfo) == 24105
    assert host_memory_mib(tmp_path / "nope") is None


def test_env_file_byte_order_mark_is_no_part_of_the_name(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_bytes("\ufeffA=1\nB=2\n".encode())
    assert read_env_file(f, {}) == ["A=1", "B=2"]


def test_an_empty_entrypoint_says_it_cleared_the_cmd_too() -> None:
    from ember.vm.errors import NoCommand
    from ember.vm.runconfig import docker_argv

    with pytest.raises(NoCommand, match='--entrypoint "" cleared') as e:
        docker_argv(["/bin/sh"], ["-c", "true"], [], None)
    assert "no Entrypoint or Cmd" not in str(e.value)
    assert docker_argv(["/bin/sh"], ["-c", "true"], [], ["echo", "hi"]) == ["echo", "hi"]
    with pytest.raises(NoCommand, match="the image has no Entrypoint or Cmd"):
        docker_argv(None, None, None, None)


def test_labels_as_docker_reads_them() -> None:
    from ember.machines.options import parse_labels

    assert parse_labels(["app=web", "tier", "a=b=c", "app=api"]) == {
        "app": "api", "tier": "", "a": "b=c"
    }  # fmt: skip
    assert parse_labels([]) == {}


@pytest.mark.parametrize(
    ("entry", "words"),
    [("", "with a KEY"), ("=x", "with a KEY"), (" app=x", "with a KEY"), ("a\x00=b", "with a KEY"),
     ("ember.template=x", "ember's own"), ("x=" + "y" * (64 << 10), "more than 64 KiB")],
)  # fmt: skip
def test_bad_labels_are_refused(entry: str, words: str) -> None:
    from ember.machines.options import parse_labels

    with pytest.raises(InvalidOption, match=words):
        parse_labels([entry])


def test_hostname() -> None:
    assert check_hostname("web-1.example") == "web-1.example"
    assert check_hostname("h" * 64) == "h" * 64
    for bad in ("", "-web", "a b", "a_b", "h" * 65, "x\n", "ü"):
        with pytest.raises(InvalidOption, match="--hostname"):
            check_hostname(bad)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("db:10.1.2.3", ("db", "10.1.2.3")),
        ("db=10.1.2.3", ("db", "10.1.2.3")),  # docker 25's spelling
        ("my_host.local:192.168.0.1", ("my_host.local", "192.168.0.1")),
        # IPv6, bare (split at the first colon) or in brackets; normalized
        ("v6:2001:db8:0::1", ("v6", "2001:db8::1")),
        ("v6:[2001:db8::1]", ("v6", "2001:db8::1")),
        ("v6=[::1]", ("v6", "::1")),
        ("host.docker.internal:host-gateway", ("host.docker.internal", "host-gateway")),
    ],
)
def test_add_host(entry: str, expected: tuple[str, str]) -> None:
    assert parse_add_host(entry) == expected


@pytest.mark.parametrize(
    "bad",
    ["db", "db:", ":10.0.0.1", "db:10.0.0.256", "db:name", "a b:10.0.0.1", "db:10.0.0.1 x",
     "a\nb:10.0.0.1", "db:[10.0.0.1", "x" * 254 + ":10.0.0.1"],
)  # fmt: skip
def test_add_host_refuses(bad: str) -> None:
    with pytest.raises(InvalidOption, match="--add-host"):
        parse_add_host(bad)


def test_add_hosts_keep_their_order_as_docker_extra_hosts() -> None:
    got = parse_add_hosts(["b:10.0.0.2", "a=10.0.0.1", "v6:[::1]", "gw:host-gateway"])
    assert got == ("b:10.0.0.2", "a:10.0.0.1", "v6:::1", "gw:host-gateway")
    # what a record keeps is read back the same way
    assert [parse_add_host(e) for e in got][2] == ("v6", "::1")


def test_dns_and_search() -> None:
    assert parse_dns(["10.0.0.53", "192.0.2.1"]) == ("10.0.0.53", "192.0.2.1")
    for bad in ("", "dns.example", "10.0.0.1 10.0.0.2", "1.2.3"):
        with pytest.raises(InvalidOption, match="--dns .*not an IP address"):
            parse_dns([bad])
    # what the host never lets a machine reach: refused, not silently unanswered (a
    # link-local one may be a cloud's metadata service)
    for unreachable in ("127.0.0.53", "169.254.169.254", "2001:db8::53", "::1"):
        with pytest.raises(InvalidOption, match="a machine cannot reach it"):
            parse_dns([unreachable])
    # docker's "." alone: no search domain
    assert parse_dns_search(["example.com", ".", "corp"]) == ("example.com", "corp")
    for bad in ("", "a b", "x;y", "a\nb", "x" * 254):
        with pytest.raises(InvalidOption, match="--dns-search"):
            parse_dns_search([bad])
