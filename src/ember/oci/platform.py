"""Platforms (os/architecture/variant) and choosing a manifest from an index.

Names follow Go's GOOS/GOARCH as the image spec does; common aliases
(``x86_64``, ``aarch64``, ``armhf``) are normalised, and ``arm64`` with no
variant equals ``arm64/v8`` as in containerd.
"""

from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.oci.errors import InvalidPlatform, NoMatchingPlatform

if TYPE_CHECKING:
    from ember.oci.manifest import Descriptor, ImageIndex

_ARCH_ALIASES = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
}
_KNOWN_OS = {
    "linux",
    "windows",
    "darwin",
    "freebsd",
    "netbsd",
    "openbsd",
    "solaris",
    "illumos",
    "aix",
    "plan9",
    "android",
    "ios",
    "js",
    "wasip1",
    "dragonfly",
}
#: Go's architecture names (GOARCH), which a lone ``--platform ARCH`` must be one of (a
#: lone word that is neither an OS nor one of these is a typo, as containerd reads it)
_KNOWN_ARCH = {
    "386", "amd64", "amd64p32", "arm", "arm64", "arm64be", "armbe", "loong64", "mips",
    "mips64", "mips64le", "mips64p32", "mips64p32le", "mipsle", "ppc", "ppc64", "ppc64le",
    "riscv", "riscv64", "s390", "s390x", "sparc", "sparc64", "wasm",
}  # fmt: skip
_COMPONENT = re.compile(r"^[a-z0-9_.-]{1,64}$")


def is_platform_component(text: str) -> bool:
    """Whether ``text`` can be an OS, architecture or variant name (any case): what an
    image says of itself is printed in listings and messages, so no spaces, slashes,
    newlines or escape sequences."""
    return bool(_COMPONENT.fullmatch(text.lower()))


def _normalise(architecture: str, variant: str) -> tuple[str, str]:
    if architecture in _ARCH_ALIASES:
        arch, default_variant = _ARCH_ALIASES[architecture]
        return arch, variant or default_variant
    if architecture == "arm64" and variant in ("v8", "8"):
        return "arm64", ""
    if architecture == "arm" and not variant:
        return "arm", "v7"
    return architecture, variant


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def of(cls, os: str, architecture: str, variant: str | None = None) -> Platform:
        arch, var = _normalise(architecture.lower(), (variant or "").lower())
        return cls(os.lower(), arch, var)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]``; a lone architecture means linux, a lone OS this host's arch."""
        parts = text.strip().lower().split("/")
        if not 1 <= len(parts) <= 3 or not all(is_platform_component(p) for p in parts):
            raise InvalidPlatform(
                f"invalid platform {text[:100]!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64"
            )
        if len(parts) == 1:
            if parts[0] in _KNOWN_OS:
                host = host_platform()
                return cls.of(parts[0], host.architecture, host.variant)
            if parts[0] not in _KNOWN_ARCH and parts[0] not in _ARCH_ALIASES:
                raise InvalidPlatform(
                    f"invalid platform {text[:100]!r}: not an operating system or architecture "
                    "ember knows; expected OS/ARCH[/VARIANT], e.g. linux/arm64"
                )
            return cls.of("linux", parts[0])
        return cls.of(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: Platform) -> bool:
        """Does ``other`` (what an image offers) satisfy this (what was asked)?

        An empty variant asked for accepts any variant offered.
        """
        if self.os != other.os or self.architecture != other.architecture:
            return False
        return not self.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    machine = _platform.machine().lower() or "amd64"
    return Platform.of(_platform.system().lower() or "linux", machine)


def descriptor_platform(desc: Descriptor) -> Platform | None:
    p = desc.platform
    if p is None:
        return None
    return Platform.of(p.os, p.architecture, p.variant)


def select_manifest(index: ImageIndex, platform: Platform | None = None) -> Descriptor:
    """The index entry for ``platform`` (default: this host).

    An exact variant match is preferred over an entry without a variant.  If
    no entry says which platform it is for and there is just one image, that
    one is returned (the caller checks its config).
    """
    from ember.oci.mediatypes import INDEX_TYPES, MANIFEST_TYPES

    want = platform or host_platform()
    images = [d for d in index.manifests if d.media_type in MANIFEST_TYPES | INDEX_TYPES]
    best: Descriptor | None = None
    for desc in images:
        have = descriptor_platform(desc)
        if have is None or not want.matches(have):
            continue
        if best is None or have.variant == want.variant and descriptor_platform(best) != have:
            best = desc
    if best is not None:
        return best
    if len(images) == 1 and images[0].platform is None:
        return images[0]
    offered = sorted(
        {str(p) for d in images if (p := descriptor_platform(d)) is not None and p.os != "unknown"}
    )
    unlabelled = sum(1 for d in images if d.platform is None)
    if unlabelled:  # "available: none" hid them (a layout with one tag given twice, say)
        offered.append(f"{unlabelled} image{'s' if unlabelled > 1 else ''} that do not say their platform")
    listing = ", ".join(offered) if offered else "none"
    raise NoMatchingPlatform(f"no image for platform {want} in this index (available: {listing})")
