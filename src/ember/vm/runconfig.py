"""The per-machine run config: what ember-init does inside the guest.

Pure logic, no I/O.  ``RunConfig.from_image`` applies Docker's rules to an image
config plus the user's overrides; ``render`` produces ember's own text format,
which ember-init (C) parses; ``parse`` is the Python reader of the same format
(used by tests and by ``ember inspect``-like tools).  The format is documented
in docs/run-config.md; keep the three in step.

Format, in short: UTF-8-agnostic bytes, one record per line, ``KEY`` then
fields each preceded by one space.  Inside a field ``\\\\`` ``\\s`` ``\\n`` ``\\t``
stand for backslash, space, newline and tab; no other escapes exist.  The first
record is ``ember-run-config 1`` and the last is ``end`` (so truncation is
detected).  NUL bytes are never allowed.
"""

from __future__ import annotations

import ipaddress
import logging
import posixpath
import re
import signal as _signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ember.vm.errors import InvalidRunConfig, NoCommand

log = logging.getLogger("ember.vm")

FORMAT_VERSION = 1
MAGIC = b"ember-run-config"
#: ember-init refuses configs bigger than this; keep the two in step (init/config.c)
MAX_CONFIG_SIZE = 1 << 20
#: what the host adds to a config after the image's and the user's part was checked:
#: hosts, nameservers and network records (again at each `ember start`, with an address
#: that may differ) and a restored template's clock and seed
HOST_RECORDS_ROOM = 4096
DEFAULT_STOP_TIMEOUT = 10
DEFAULT_NOFILE = 1048576
DEFAULT_MTU = 1420

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,63})$")  # HOST_NAME_MAX 64
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FSTYPE_RE = re.compile(r"^[a-z0-9_.]{1,32}$")
_ENV_KEY_RE = re.compile(r"^[^=\x00]+$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
#: the longest mount option string ember-init takes (its buffers, init/src/init.h
#: MOUNT_OPTIONS_MAX), counted in the bytes it is rendered as
MAX_MOUNT_OPTIONS = 1023
#: bytes of host randomness a restored machine's kernel is reseeded with
SEED_BYTES = 64


class ImageConfigLike(Protocol):
    """The parts of ``ember.oci.config.ImageConfig`` a run config is made from."""

    @property
    def entrypoint(self) -> Sequence[str] | None: ...
    @property
    def cmd(self) -> Sequence[str] | None: ...
    @property
    def env(self) -> Sequence[str] | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def working_dir(self) -> str | None: ...
    @property
    def stop_signal(self) -> str | None: ...


@dataclass(frozen=True)
class Interface:
    """One guest network interface, configured by init over rtnetlink (IPv4)."""

    name: str
    address: str
    prefix: int
    gateway: str | None = None
    mtu: int = DEFAULT_MTU


@dataclass(frozen=True)
class HostEntry:
    """A line appended to the guest's /etc/hosts."""

    address: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Mount:
    """A block device (volume) mounted by init before the program starts."""

    source: str
    target: str
    fstype: str = "ext4"
    options: str = "defaults"


@dataclass(frozen=True)
class RootDevice:
    device: str = "/dev/vda"
    fstype: str = "ext4"
    options: str = "defaults"


@dataclass(frozen=True)
class RunOverrides:
    """What the user said on ``ember run``; ``None`` means "not given"."""

    #: ``[]`` clears the image's entrypoint (``--entrypoint ""``); any override clears Cmd
    entrypoint: Sequence[str] | None = None
    #: run arguments; when non-empty they replace the image's Cmd
    args: Sequence[str] | None = None
    #: ``KEY=VALUE`` strings or a mapping, applied after the image's Env
    env: Sequence[str] | Mapping[str, str] = ()
    user: str | None = None
    workdir: str | None = None
    stop_signal: str | int | None = None
    stop_timeout: int | None = None


@dataclass(frozen=True)
class RunConfig:
    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    #: Docker's user spec: "", name, uid, name:group, uid:gid (resolved in the guest)
    user: str = ""
    #: absolute; "" means "/"
    workdir: str = ""
    hostname: str | None = None
    hosts: tuple[HostEntry, ...] = ()
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    network: tuple[Interface, ...] = ()
    mounts: tuple[Mount, ...] = ()
    stop_signal: int = int(_signal.SIGTERM)
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    root: RootDevice = field(default_factory=RootDevice)
    #: extra modules to load (names from the initramfs), after the base set
    modules: tuple[str, ...] = ()
    nofile: int = DEFAULT_NOFILE
    #: after the exit report, ms to wait for the host's "bye" on the control port before
    #: powering off (0: don't): the host takes what the ports still hold first
    exit_ack_ms: int = 0
    #: a template boot: stop before the root disk and wait for the real config (argv empty)
    template: bool = False
    #: a template's modules left for after the restore (drivers that must probe the
    #: restored machine's own devices)
    late: tuple[str, ...] = ()
    #: (interface, MAC) pairs: a restored NIC keeps the template's MAC unless told
    macs: tuple[tuple[str, str], ...] = ()
    #: ``-i``: the program's stdin is held open for the host to write (``ember attach``)
    open_stdin: bool = False
    #: ``-t``: the program's stdio is a terminal of (rows, columns) (0: not known yet)
    tty: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # callers may pass lists: store tuples, so configs compare and hash by value
        for name in ("argv", "env", "hosts", "nameservers", "search", "network", "mounts",
                     "modules", "late", "macs"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.tty is not None and not isinstance(self.tty, tuple):
            object.__setattr__(self, "tty", tuple(self.tty))
        for h in self.hosts:
            if not isinstance(h.names, tuple):
                object.__setattr__(h, "names", tuple(h.names))
        validate(self)

    # ---- construction from an image -------------------------------------------------

    @classmethod
    def from_image(
        cls,
        config: ImageConfigLike,
        overrides: RunOverrides | None = None,
        **fields: object,
    ) -> RunConfig:
        """Docker's rules: argv = Entrypoint + Cmd; run args replace Cmd; an entrypoint
        override clears Cmd.  Env is the image's, then the user's (same key replaces).
        ``fields`` sets the remaining RunConfig fields (hostname, network, ...)."""
        o = overrides or RunOverrides()
        argv = docker_argv(config.entrypoint, config.cmd, o.entrypoint, o.args)
        env = merge_env(config.env or (), o.env)
        # an empty option is no option, as docker's merge of run and image configs has
        # it: `-u "$RUN_AS"` with the variable unset ran as root, not as the image's user
        user = o.user or config.user or ""
        workdir = o.workdir or config.working_dir or ""
        if o.stop_signal:
            sig = parse_signal(o.stop_signal)
        elif config.stop_signal:
            sig = parse_signal(config.stop_signal)
        else:
            sig = int(_signal.SIGTERM)
        timeout = o.stop_timeout if o.stop_timeout is not None else DEFAULT_STOP_TIMEOUT
        base: dict[str, object] = dict(
            argv=tuple(argv),
            env=tuple(env),
            user=user,
            workdir=workdir,
            stop_signal=sig,
            stop_timeout=timeout,
        )
        base.update(fields)
        return cls(**base)  # type: ignore[arg-type]

    # ---- the wire format ----------------------------------------------------------

    def check_room(self) -> None:
        """InvalidRunConfig unless this config, rendered, leaves ``HOST_RECORDS_ROOM`` for
        what the host adds: checked before a machine is made (an image's environment
        near the limit passed `ember run`, and then a restored template, or a start with
        a longer address, went over it in the guest)."""
        size = len(self.render())
        if size > MAX_CONFIG_SIZE - HOST_RECORDS_ROOM:
            raise InvalidRunConfig(
                f"run config is {size} bytes: the guest accepts {MAX_CONFIG_SIZE} in all, "
                f"{HOST_RECORDS_ROOM} of them kept for the machine's network and clock",
                hint="the image's environment and command (with -e and the arguments) "
                "must be smaller",
            )

    def render(self) -> bytes:
        lines: list[bytes] = [_record(MAGIC.decode(), str(FORMAT_VERSION))]
        lines += [_record("arg", a) for a in self.argv]
        lines += [_record("env", e) for e in self.env]
        if self.user:
            lines.append(_record("user", self.user))
        if self.workdir:
            lines.append(_record("workdir", self.workdir))
        if self.hostname:
            lines.append(_record("hostname", self.hostname))
        lines += [_record("host", h.address, *h.names) for h in self.hosts]
        lines += [_record("nameserver", n) for n in self.nameservers]
        lines += [_record("search", s) for s in self.search]
        for i in self.network:
            gw = i.gateway or "-"
            lines.append(_record("net", i.name, f"{i.address}/{i.prefix}", gw, str(i.mtu)))
        lines += [_record("mount", m.source, m.target, m.fstype, m.options) for m in self.mounts]
        lines.append(_record("stop_signal", str(self.stop_signal)))
        lines.append(_record("stop_timeout", str(self.stop_timeout)))
        r = self.root
        lines.append(_record("root", r.device, r.fstype, r.options))
        lines += [_record("module", m) for m in self.modules]
        lines.append(_record("nofile", str(self.nofile)))
        if self.exit_ack_ms:
            lines.append(_record("exit_ack", str(self.exit_ack_ms)))
        if self.template:
            lines.append(b"template\n")
        lines += [_record("late", m) for m in self.late]
        lines += [_record("mac", name, mac) for name, mac in self.macs]
        if self.open_stdin:
            lines.append(b"stdin\n")
        if self.tty is not None:
            lines.append(_record("tty", *(str(v) for v in self.tty)))
        lines.append(b"end\n")
        data = b"".join(lines)
        if len(data) > MAX_CONFIG_SIZE:
            raise InvalidRunConfig(
                f"run config is {len(data)} bytes, more than the {MAX_CONFIG_SIZE} the guest accepts"
            )
        return data

    @classmethod
    def parse(cls, data: bytes) -> RunConfig:
        """Read a rendered config back (strict: what ember-init refuses, this refuses)."""
        return _parse(data)


# ---- Docker semantics ----------------------------------------------------------------


def docker_argv(
    image_entrypoint: Sequence[str] | None,
    image_cmd: Sequence[str] | None,
    entrypoint: Sequence[str] | None,
    args: Sequence[str] | None,
) -> list[str]:
    if entrypoint is not None:
        # An entrypoint override clears the image's Cmd; run args still follow it.
        argv = list(entrypoint) + list(args or ())
    else:
        cmd = list(args) if args else list(image_cmd or ())
        argv = list(image_entrypoint or ()) + cmd
    if not argv:
        if entrypoint is not None:
            # docker's rule: --entrypoint (even "") clears the image's Cmd as well
            raise NoCommand(
                'no command specified: --entrypoint "" cleared the image\'s Entrypoint, '
                "and an --entrypoint also clears its Cmd; give the command after the image"
            )
        raise NoCommand("no command specified: the image has no Entrypoint or Cmd; give one")
    return argv


def merge_env(image_env: Iterable[str], user_env: Sequence[str] | Mapping[str, str]) -> list[str]:
    """Later entries replace earlier ones with the same key, keeping the first position.

    The image's entries are taken as Docker takes them (moby's and containerd's
    ReplaceOrAppendEnvValues): one without '=' (``KEY``) sets nothing and is dropped;
    it only unsets a key of the list the entries are applied to, which is Docker's own
    defaults, never a key set earlier in the same list, so such an earlier value stays.
    An entry with an empty key (``=x``) is skipped with a warning.  The user's ``-e``
    entries stay strict: ``KEY=VALUE`` with a non-empty key, or an error."""
    merged: dict[str, str] = {}
    for item in image_env:
        key, sep, value = item.partition("=")
        if not key:
            log.warning("skipping the image's environment entry %r: its name is empty", item)
            continue
        if not sep:
            continue  # unsets nothing ember would have set before the image's list
        _check_env_key(key)
        merged[key] = value
    pairs: Iterable[tuple[str, str]]
    if isinstance(user_env, Mapping):
        pairs = user_env.items()
    else:
        pairs = (_split_env(item, "-e") for item in user_env)
    for k, v in pairs:
        _check_env_key(k)
        merged[k] = v
    return [f"{k}={v}" for k, v in merged.items()]


def _split_env(item: str, origin: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise InvalidRunConfig(f"environment entry {item!r} ({origin}) is not KEY=VALUE")
    _check_env_key(key)
    return key, value


def _check_env_key(key: str) -> None:
    if not _ENV_KEY_RE.fullmatch(key):
        raise InvalidRunConfig(f"invalid environment variable name {key!r}")


def parse_signal(value: str | int) -> int:
    """Docker accepts ``SIGTERM``, ``TERM``, ``15``, ``SIGRTMIN+3`` and ``SIGRTMAX-1``."""
    if isinstance(value, int):
        num = value
    else:
        text = value.strip().upper()
        if len(text) > 16:  # the longest name is SIGRTMIN+NN; an image's value may be huge
            raise InvalidRunConfig(f"unknown stop signal {value[:40]!r}")
        if text.isascii() and text.isdigit():
            num = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            # [0-9], not \d: that also takes other scripts' digits ("SIGRTMIN+\u0663")
            m = re.fullmatch(r"SIGRTMIN(?:\+([0-9]+))?|SIGRTMAX(?:-([0-9]+))?", name)
            if m:
                if name.startswith("SIGRTMIN"):
                    num = int(_signal.SIGRTMIN) + int(m.group(1) or 0)
                else:  # (counted down within the real-time signals only)
                    num = int(_signal.SIGRTMAX) - int(m.group(2) or 0)
                    if num < int(_signal.SIGRTMIN):
                        raise InvalidRunConfig(f"stop signal {value!r} is out of range")
            else:
                try:
                    num = int(_signal.Signals[name])
                except KeyError:
                    raise InvalidRunConfig(f"unknown stop signal {value!r}") from None
    if not 1 <= num <= int(_signal.SIGRTMAX):
        raise InvalidRunConfig(f"stop signal {value!r} is out of range")
    return num


# ---- validation ----------------------------------------------------------------------


#: the longest user spec ember-init takes (its buffer, init/src/user.c)
MAX_USER_BYTES = 255


def check_user(user: str) -> None:
    """A user spec ember-init can resolve (Docker's forms; "" is the image's default)."""
    _text(user, "user")
    if user.count(":") > 1 or user.startswith(":") or user.endswith(":"):
        raise InvalidRunConfig(f"invalid user {user!r}: use NAME, UID, NAME:GROUP or UID:GID")
    if len(user.encode("utf-8", "surrogateescape")) > MAX_USER_BYTES:  # as rendered
        # said here, not by the booted guest's init
        raise InvalidRunConfig(f"user {user[:40]!r}... is too long: at most {MAX_USER_BYTES} bytes")


def validate(rc: RunConfig) -> None:
    """Refuse what the guest would refuse, with a message naming the field."""
    if not rc.argv and not rc.template:
        raise NoCommand("no command specified: the image has no Entrypoint or Cmd; give one")
    for a in rc.argv:
        _text(a, "argument")
    for e in rc.env:
        _text(e, "environment entry")
        key, sep, _ = e.partition("=")
        if not sep or not key:
            raise InvalidRunConfig(f"environment entry {e!r} is not KEY=VALUE")
    check_user(rc.user)
    _text(rc.workdir, "working directory")
    if rc.workdir and not rc.workdir.startswith("/"):
        raise InvalidRunConfig(
            f"working directory {rc.workdir!r} is invalid: it needs to be an absolute path"
        )
    if rc.hostname is not None and not is_hostname(rc.hostname):
        raise InvalidRunConfig(f"invalid hostname {rc.hostname!r}")
    for h in rc.hosts:
        _ip(h.address, "hosts entry")
        if not h.names:
            raise InvalidRunConfig(f"hosts entry for {h.address} has no names")
        for n in h.names:
            if not is_dns_name(n):
                raise InvalidRunConfig(f"invalid host name {n!r} in hosts entry")
    for n in rc.nameservers:
        _ip(n, "nameserver")
    for s in rc.search:
        if not is_dns_name(s):
            raise InvalidRunConfig(f"invalid DNS search domain {s!r}")
    names = set()
    for i in rc.network:
        if not _IFNAME_RE.fullmatch(i.name) or i.name in names:
            raise InvalidRunConfig(f"invalid or duplicate interface name {i.name!r}")
        names.add(i.name)
        addr = _ipv4(i.address, "interface address")
        if not 0 <= i.prefix <= 32:
            raise InvalidRunConfig(f"invalid prefix length /{i.prefix} for {i.name}")
        if i.gateway is not None:
            gw = _ipv4(i.gateway, "gateway")
            net = ipaddress.ip_network(f"{addr}/{i.prefix}", strict=False)
            if gw not in net:
                raise InvalidRunConfig(f"gateway {gw} is not in {net} on {i.name}")
        if not 68 <= i.mtu <= 65535:
            raise InvalidRunConfig(f"invalid MTU {i.mtu} for {i.name}")
    for m in rc.mounts:
        for value, what in ((m.source, "mount source"), (m.target, "mount target")):
            _text(value, what)
            if not value.startswith("/"):
                raise InvalidRunConfig(f"{what} {value!r} must be an absolute path")
        # "//", "/.", "/./" are "/" too: a volume over the root (normpath keeps a
        # leading "//", POSIX's implementation-defined root, as it is)
        root_itself = not posixpath.normpath(m.target).strip("/")
        if root_itself or ".." in m.target.split("/"):
            raise InvalidRunConfig(f"mount target {m.target!r} is not allowed")
        if not _FSTYPE_RE.fullmatch(m.fstype):
            raise InvalidRunConfig(f"invalid file system type {m.fstype!r}")
        _mount_options(m.options, "mount options")
    if not 1 <= rc.stop_signal <= int(_signal.SIGRTMAX):
        raise InvalidRunConfig(f"invalid stop signal {rc.stop_signal}")
    if not 0 <= rc.stop_timeout <= 24 * 3600:
        raise InvalidRunConfig(f"invalid stop timeout {rc.stop_timeout}")
    if not rc.root.device.startswith("/dev/") or not _FSTYPE_RE.fullmatch(rc.root.fstype):
        raise InvalidRunConfig(f"invalid root device {rc.root.device!r} ({rc.root.fstype})")
    _mount_options(rc.root.options, "root mount options")
    for mod in (*rc.modules, *rc.late):
        if not _MODULE_RE.fullmatch(mod):
            raise InvalidRunConfig(f"invalid module name {mod!r}")
    for ifname, mac in rc.macs:
        if not _IFNAME_RE.fullmatch(ifname) or not _MAC_RE.fullmatch(mac):
            raise InvalidRunConfig(f"invalid MAC address {mac!r} for {ifname!r}")
    if not 64 <= rc.nofile <= 1 << 30:
        raise InvalidRunConfig(f"invalid open files limit {rc.nofile}")
    if not 0 <= rc.exit_ack_ms <= 60000:
        raise InvalidRunConfig(f"invalid exit acknowledgement wait {rc.exit_ack_ms} ms")
    if rc.tty is not None and not all(0 <= v <= 0xFFFF for v in rc.tty):
        raise InvalidRunConfig(f"invalid terminal size {rc.tty[0]}x{rc.tty[1]}")


def _text(value: str, what: str) -> None:
    if "\x00" in value:
        raise InvalidRunConfig(f"{what} {value!r} contains a NUL byte")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidRunConfig(f"{what} {value!r} cannot be encoded") from None


def _mount_options(value: str, what: str) -> None:
    _text(value, what)
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > MAX_MOUNT_OPTIONS:  # the guest refuses them rather than cut a trailing "ro"
        raise InvalidRunConfig(
            f"{what} {value[:40]!r}... are {size} bytes: at most {MAX_MOUNT_OPTIONS}"
        )


def is_hostname(name: str) -> bool:
    """A name the guest's sethostname(2) takes (at most HOST_NAME_MAX bytes) and
    ember-init writes to /etc/hostname."""
    return _HOSTNAME_RE.fullmatch(name) is not None


_DNS_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


def is_dns_name(name: str) -> bool:
    """A name ember writes to /etc/hosts or as a /etc/resolv.conf ``search`` domain:
    letters, digits, ``.``, ``_``, ``-`` (every hostname is one); nothing that would
    split or end the line."""
    return _DNS_NAME_RE.fullmatch(name) is not None


def _ip(value: str, what: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidRunConfig(f"invalid {what} address {value!r}") from None


def _ipv4(value: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise InvalidRunConfig(f"invalid {what} {value!r} (IPv4 expected)") from None


# ---- encoding ------------------------------------------------------------------------

_ESCAPES = {b"\\"[0]: b"\\\\", b" "[0]: b"\\s", b"\n"[0]: b"\\n", b"\t"[0]: b"\\t"}
_UNESCAPES = {ord("\\"): ord("\\"), ord("s"): ord(" "), ord("n"): ord("\n"), ord("t"): ord("\t")}


def escape(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if b"\x00" in raw:
        raise InvalidRunConfig(f"value {value!r} contains a NUL byte")
    out = bytearray()
    for b in raw:
        out += _ESCAPES.get(b, bytes((b,)))
    return bytes(out)


def unescape(field_: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(field_):
        b = field_[i]
        if b == 0x5C:  # backslash
            if i + 1 >= len(field_) or field_[i + 1] not in _UNESCAPES:
                raise InvalidRunConfig(f"bad escape in run config field {field_!r}")
            out.append(_UNESCAPES[field_[i + 1]])
            i += 2
        elif b in (0x00, 0x20, 0x0A, 0x09):
            raise InvalidRunConfig(f"unescaped control byte in run config field {field_!r}")
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "surrogateescape")


def restore_message(config: bytes, now_ns: int, seed: bytes) -> bytes:
    """What the host sends a restored template on its control port: the machine's
    rendered config with the wall clock and fresh randomness added before ``end``
    (a restored kernel has the template's clock and random state)."""
    if not config.endswith(b"\nend\n"):
        raise InvalidRunConfig("not a rendered run config (no end record)")
    if not 16 <= len(seed) <= 256:
        raise InvalidRunConfig("the seed for a restored machine must be 16 to 256 bytes")
    extra = _record("clock", str(now_ns // 1_000_000_000), str(now_ns % 1_000_000_000))
    extra += _record("seed", seed.hex())
    message = config[: -len(b"end\n")] + extra + b"end\n"
    if len(message) > MAX_CONFIG_SIZE:  # (RunConfig.check_room keeps room for these)
        raise InvalidRunConfig(f"run config is {len(message)} bytes with the clock and seed")
    return message


def _record(key: str, *fields_: str) -> bytes:
    return key.encode() + b"".join(b" " + escape(f) for f in fields_) + b"\n"


# ---- parsing (mirror of init/config.c) -------------------------------------------------

_ARITY: dict[str, tuple[int, int]] = {
    "arg": (1, 1),
    "env": (1, 1),
    "user": (1, 1),
    "workdir": (1, 1),
    "hostname": (1, 1),
    "host": (2, 64),
    "nameserver": (1, 1),
    "search": (1, 1),
    "net": (4, 4),
    "mount": (4, 4),
    "stop_signal": (1, 1),
    "stop_timeout": (1, 1),
    "root": (3, 3),
    "module": (1, 1),
    "nofile": (1, 1),
    "template": (0, 0),
    "late": (1, 1),
    "clock": (2, 2),
    "seed": (1, 1),
    "mac": (2, 2),
    "exit_ack": (1, 1),
    "stdin": (0, 0),
    "tty": (2, 2),
}
_SINGLE = {"user", "workdir", "hostname", "stop_signal", "stop_timeout", "root", "nofile",
           "template", "clock", "seed", "exit_ack", "stdin", "tty"}  # fmt: skip


def _int(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise InvalidRunConfig(f"run config: {what} {text!r} is not a number")
    return int(text)


def _parse(data: bytes) -> RunConfig:
    if len(data) > MAX_CONFIG_SIZE:
        raise InvalidRunConfig("run config is too large")
    if b"\x00" in data:
        raise InvalidRunConfig("run config contains a NUL byte")
    if not data.endswith(b"\n"):
        raise InvalidRunConfig("run config is truncated (no final newline)")
    lines = data[:-1].split(b"\n")
    if lines[0] != MAGIC + b" " + str(FORMAT_VERSION).encode():
        raise InvalidRunConfig("not an ember run config of a known version")
    if lines[-1] != b"end":
        raise InvalidRunConfig("run config is truncated (no end record)")
    values: dict[str, list[list[str]]] = {}
    for line in lines[1:-1]:
        key, *raw = line.split(b" ")
        k = key.decode("ascii", "replace")
        if k not in _ARITY:
            raise InvalidRunConfig(f"run config: unknown record {k!r}")
        lo, hi = _ARITY[k]
        if not lo <= len(raw) <= hi:
            raise InvalidRunConfig(f"run config: record {k!r} has {len(raw)} fields")
        if k in _SINGLE and k in values:
            raise InvalidRunConfig(f"run config: record {k!r} appears twice")
        values.setdefault(k, []).append([unescape(f) for f in raw])

    def one(k: str) -> list[str] | None:
        v = values.get(k)
        return v[0] if v else None

    nets = []
    for name, cidr, gw, mtu in values.get("net", []):
        addr, slash, prefix = cidr.partition("/")
        if not slash:
            raise InvalidRunConfig(f"run config: interface address {cidr!r} has no prefix")
        nets.append(
            Interface(
                name, addr, _int(prefix, "prefix"), None if gw == "-" else gw, _int(mtu, "MTU")
            )
        )
    kw: dict[str, object] = dict(
        argv=tuple(f[0] for f in values.get("arg", [])),
        env=tuple(f[0] for f in values.get("env", [])),
        hosts=tuple(HostEntry(f[0], tuple(f[1:])) for f in values.get("host", [])),
        nameservers=tuple(f[0] for f in values.get("nameserver", [])),
        search=tuple(f[0] for f in values.get("search", [])),
        network=tuple(nets),
        mounts=tuple(Mount(*f) for f in values.get("mount", [])),
        modules=tuple(f[0] for f in values.get("module", [])),
        template="template" in values,
        late=tuple(f[0] for f in values.get("late", [])),
        macs=tuple((f[0], f[1]) for f in values.get("mac", [])),
        open_stdin="stdin" in values,
    )
    if (u := one("user")) is not None:
        kw["user"] = u[0]
    if (w := one("workdir")) is not None:
        kw["workdir"] = w[0]
    if (h := one("hostname")) is not None:
        kw["hostname"] = h[0]
    if (s := one("stop_signal")) is not None:
        kw["stop_signal"] = _int(s[0], "stop signal")
    if (t := one("stop_timeout")) is not None:
        kw["stop_timeout"] = _int(t[0], "stop timeout")
    if (r := one("root")) is not None:
        kw["root"] = RootDevice(*r)
    if (n := one("nofile")) is not None:
        kw["nofile"] = _int(n[0], "nofile")
    if (a := one("exit_ack")) is not None:
        kw["exit_ack_ms"] = _int(a[0], "exit_ack")
    if (t := one("tty")) is not None:
        kw["tty"] = (_int(t[0], "tty rows"), _int(t[1], "tty columns"))
    return RunConfig(**kw)  # type: ignore[arg-type]
