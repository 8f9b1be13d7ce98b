"""Parsing of ``ember run`` options that are more than a type (pure).

``-e``/``--env-file`` follow Docker: ``KEY=VALUE`` sets, a bare ``KEY`` copies the
value from the caller's environment (and is skipped when the caller has none);
env files hold one entry per line, ``#`` comments and blank lines ignored, values
taken literally (no quotes, no expansion).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ember.machines.errors import InvalidOption
from ember.sizes import InvalidSize, parse_size

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
MAX_ENV_FILE = 1 << 20


def check_name(name: str) -> str:
    """Docker's container name rule (a leading ``/`` is not accepted here)."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidOption(
            f"invalid machine name {name!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, at most 63)"
        )
    return name


def check_kernel_arg(arg: str) -> str:
    """One guest kernel argument: printable, no spaces or quotes (one argument), bounded."""
    bad = not arg.isprintable() or any(c.isspace() or c == '"' for c in arg)
    if not arg or len(arg) > 256 or bad:
        raise InvalidOption(
            f"invalid kernel argument {arg!r} (one word, printable, no quotes, <= 256)"
        )
    return arg


#: bytes of ``--kernel-arg`` in all: the guest's whole command line holds 2047 bytes
#: (x86), ember's own arguments take ~100, and a longer one hangs the guest silently
MAX_KERNEL_ARGS = 1024


def check_kernel_args(args: Iterable[str]) -> tuple[str, ...]:
    out = tuple(check_kernel_arg(a) for a in args)
    total = len(" ".join(out).encode())
    if total > MAX_KERNEL_ARGS:
        raise InvalidOption(f"--kernel-arg: {total} bytes in all, more than {MAX_KERNEL_ARGS}")
    return out


def check_user(user: str) -> str:
    """``-u``, refused before any work (a kernel install, an accelerator probe) rather than
    by the run config or the booted guest."""
    from ember.vm.errors import InvalidRunConfig
    from ember.vm.runconfig import check_user as check_spec

    try:
        check_spec(user)
    except InvalidRunConfig as e:
        raise InvalidOption(f"-u: {e.message}") from None
    return user


def check_hostname(name: str) -> str:
    """``--hostname``: what the guest's sethostname(2) and /etc/hostname take."""
    from ember.vm.runconfig import is_hostname

    if not is_hostname(name):
        raise InvalidOption(
            f"--hostname {name!r:.100}: use letters, digits, '.' and '-' (starting with a "
            "letter or digit, at most 64)"
        )
    return name


#: ``--add-host NAME:host-gateway``: the host as the machine reaches it (its gateway,
#: whose address is known at each start)
HOST_GATEWAY = "host-gateway"


def parse_add_host(entry: str) -> tuple[str, str]:
    """``--add-host`` as docker takes it: ``NAME:ADDR`` or ``NAME=ADDR``, an IPv6 ADDR
    bare or in brackets, or ``host-gateway``; returns (NAME, ADDR), ADDR normalized."""
    import ipaddress

    from ember.vm.runconfig import is_dns_name

    # "=" first: NAME never holds one, and an IPv6 address holds ":"
    name, sep, addr = entry.partition("=")
    if not sep:
        name, sep, addr = entry.partition(":")
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    if not sep or not is_dns_name(name):
        raise InvalidOption(
            f"--add-host {entry!r:.100}: expected NAME:ADDRESS (or NAME=ADDRESS), NAME of "
            "letters, digits, '.', '_', '-'"
        )
    if addr == HOST_GATEWAY:
        return name, addr
    try:
        return name, str(ipaddress.ip_address(addr))
    except ValueError:
        raise InvalidOption(
            f"--add-host {entry!r:.100}: {addr!r:.60} is not an IP address (or {HOST_GATEWAY})"
        ) from None


def parse_add_hosts(entries: Iterable[str]) -> tuple[str, ...]:
    """Every ``--add-host``, as ``NAME:ADDR`` strings (docker's ExtraHosts), in order."""
    return tuple(":".join(parse_add_host(e)) for e in entries)


def parse_dns(entries: Iterable[str]) -> tuple[str, ...]:
    """``--dns``: nameserver addresses, in order: IPv4 ones a machine can reach (its
    network is IPv4 only, and the host drops what it sends to loopback and link-local
    addresses: docs/networking.md), refused otherwise rather than never answered."""
    import ipaddress

    out = []
    for entry in entries:
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            raise InvalidOption(f"--dns {entry!r:.100}: not an IP address") from None
        if address.version != 4 or address.is_loopback or address.is_link_local:
            raise InvalidOption(
                f"--dns {entry}: a machine cannot reach it (machines have IPv4 only, and no "
                "way to loopback or link-local addresses)"
            )
        out.append(str(address))
    return tuple(out)


def parse_dns_search(entries: Iterable[str]) -> tuple[str, ...]:
    """``--dns-search``: search domains; docker's ``.`` alone means none."""
    from ember.vm.runconfig import is_dns_name

    out = []
    for entry in entries:
        if entry == ".":
            continue
        if not is_dns_name(entry):
            raise InvalidOption(f"--dns-search {entry!r:.100}: not a domain name")
        out.append(entry)
    return tuple(out)


def host_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's ``MemTotal`` in MiB (None when it cannot be read)."""
    try:
        with open(meminfo, "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    return int(line.split()[1]) // 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


#: the least memory a guest boots in: Debian's kernel and ember-init load their modules
#: into it (at 96 MiB the kernel panicked there, "System is deadlocked on memory"; at 64
#: it thrashed without reaching the program for minutes, the VMM at 100% CPU)
MIN_MEMORY_MIB = 128


def parse_memory_mib(text: str, host_mib: int | None = -1) -> int:
    """``--memory``: MiB as a number, or a size with a unit (``1G``); not more than the
    host has (``host_mib``, by default its MemTotal; None: unknown, not checked): QEMU
    would only fail to start with it, after everything else was set up."""
    try:
        mib = parse_size(text, default_unit="m") // (1 << 20)
    except InvalidSize as e:  # "invalid size '0'", with the option named
        raise InvalidOption(f"--memory: {e}", hint=f"between {MIN_MEMORY_MIB} MiB and 1 TiB") from None
    if mib < MIN_MEMORY_MIB:
        raise InvalidOption(
            f"--memory {text!r}: a guest needs at least {MIN_MEMORY_MIB} MiB (its kernel and "
            "ember-init's modules do not boot in less)"
        )
    if mib > 1 << 20:
        raise InvalidOption(f"--memory {text!r}: must be between {MIN_MEMORY_MIB} MiB and 1 TiB")
    if host_mib == -1:
        host_mib = host_memory_mib()
    if host_mib is not None and mib > host_mib:
        raise InvalidOption(
            f"--memory {text!r}: {mib} MiB is more than this host's memory ({host_mib} MiB)"
        )
    return mib


def parse_env(entries: Iterable[str], host_env: Mapping[str, str], origin: str = "-e") -> list[str]:
    out = []
    for entry in entries:
        if "\x00" in entry:
            raise InvalidOption(f"{origin}: NUL byte in environment entry")
        key, sep, _value = entry.partition("=")
        if not key or key != key.strip() or re.search(r"\s", key):
            raise InvalidOption(f"{origin}: invalid environment variable name in {entry!r}")
        if sep:
            out.append(entry)
        elif key in host_env:
            out.append(f"{key}={host_env[key]}")
    return out


#: labels ember writes itself (``ember.template``, ``ember.timings.create``)
OWN_LABELS = "ember."
#: all of a machine's labels together, as written: its record stays small
MAX_LABEL_BYTES = 64 << 10


def parse_labels(entries: Iterable[str]) -> dict[str, str]:
    """``--label KEY[=VALUE]`` (docker's: a bare KEY has the empty value; the last of a
    KEY given twice wins)."""
    labels: dict[str, str] = {}
    for entry in entries:
        key, _sep, value = entry.partition("=")
        if "\x00" in entry or not key or key != key.strip():
            raise InvalidOption(f"--label {entry!r:.100}: expected KEY[=VALUE] with a KEY")
        if key.startswith(OWN_LABELS):
            raise InvalidOption(
                f"--label {key!r:.100}: labels starting with {OWN_LABELS!r} are ember's own"
            )
        labels[key] = value
    if sum(len(k.encode()) + len(v.encode()) for k, v in labels.items()) > MAX_LABEL_BYTES:
        raise InvalidOption(f"--label: the labels take more than {MAX_LABEL_BYTES >> 10} KiB")
    return labels


def read_env_file(path: Path, host_env: Mapping[str, str]) -> list[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENV_FILE + 1)
    except OSError as e:
        raise InvalidOption(f"cannot read env file {path}: {e.strerror}") from e
    if len(data) > MAX_ENV_FILE:
        raise InvalidOption(f"env file {path} is larger than {MAX_ENV_FILE} bytes")
    try:
        # a byte order mark some editors write is no part of the first name (docker strips it)
        text = data.decode().removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise InvalidOption(f"env file {path} is not UTF-8") from None
    lines = []
    # lines end at "\n" only (Docker's): str.splitlines would also end one at \f, \x1c,
    # U+2028 ..., so a value holding one would set a second variable
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").lstrip()
        if not line or line.startswith("#"):
            continue
        lines.append(line)
    return parse_env(lines, host_env, origin=f"env file {path}")
