"""Image references with Docker's normalisation.

Grammar (distribution/reference)::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [domain "/"] path-component ["/" path-component]*
    domain     := host [":" port]
    tag        := [\\w][\\w.-]{0,127}

The first component is a registry host when it contains ``.`` or ``:``, is
``localhost``, or has an uppercase letter; otherwise the reference is on
Docker Hub, where one-component names live under ``library/``.  So ``debian``
normalises to ``docker.io/library/debian:latest``.  A reference with a digest
gets no implicit tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.oci.digest import Digest
from ember.oci.errors import InvalidDigest, InvalidReference

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
#: docker.io is a name, not the API endpoint
DOCKER_HUB_API_HOST = "registry-1.docker.io"
MAX_NAME_LENGTH = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])"
_DOMAIN_RE = re.compile(rf"^{_HOST}(?::[0-9]+)?$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
#: a whole reference that is an image ID: as Docker, never read as a repository name
_ID_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not isinstance(text, str) or not text:
            raise InvalidReference("image reference is empty")
        shown = text[:300]
        if text != text.strip() or any(c.isspace() for c in text):
            raise InvalidReference(f"invalid image reference {shown!r}: contains whitespace")

        if _ID_RE.fullmatch(text):
            raise InvalidReference(
                f"invalid repository name {shown!r}: 64 hexadecimal characters are an image ID, "
                "not a name"
            )
        rest = text
        digest: Digest | None = None
        if "@" in rest:
            rest, _, dtext = rest.partition("@")
            try:
                digest = Digest.parse(dtext)
            except InvalidDigest as e:
                raise InvalidReference(f"invalid image reference {shown!r}: {e}") from None

        tag: str | None = None
        # A ':' after the last '/' separates the tag; one before it is a port.
        colon = rest.rfind(":")
        if colon > rest.rfind("/"):
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG_RE.fullmatch(tag):
                raise InvalidReference(
                    f"invalid tag {tag[:150]!r} in {shown!r}: tags are up to 128 letters, digits, "
                    "'_', '.' or '-', not starting with '.' or '-'"
                )

        if not rest:
            raise InvalidReference(f"invalid image reference {shown!r}: no repository name")
        registry, repository = _split_domain(rest)
        if not _DOMAIN_RE.fullmatch(registry):
            raise InvalidReference(f"invalid registry host {registry[:150]!r} in {shown!r}")
        _check_port(registry, shown)
        if repository != repository.lower() and _PATH_RE.fullmatch(repository.lower()):
            raise InvalidReference(
                f"invalid image reference {shown!r}: repository names must be lowercase"
            )
        if not _PATH_RE.fullmatch(repository):
            # the name as written: Docker Hub's implicit "library/" is not the user's
            written = rest[len(registry) + 1 :] if rest.startswith(registry + "/") else rest
            raise InvalidReference(
                f"invalid repository name {written[:150]!r} in {shown!r}: components are lowercase "
                "letters and digits separated by '.', '_', '__' or '-', joined by '/'"
            )
        if len(registry) + 1 + len(repository) > MAX_NAME_LENGTH:
            raise InvalidReference(
                f"invalid image reference {shown!r}: name longer than {MAX_NAME_LENGTH} characters"
            )
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def target(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest wins over the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The host serving the registry API for this reference."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    def familiar(self) -> str:
        """The short form Docker prints (``debian:latest``)."""
        name = self.name
        if self.registry == DEFAULT_REGISTRY:
            name = self.repository.removeprefix("library/")
        return _join(name, self.tag, self.digest)

    def __str__(self) -> str:
        return _join(self.name, self.tag, self.digest)


def _join(name: str, tag: str | None, digest: Digest | None) -> str:
    out = name
    if tag is not None:
        out += f":{tag}"
    if digest is not None:
        out += f"@{digest}"
    return out


def _check_port(registry: str, shown: str) -> None:
    # The grammar allows any digits; a port no socket can have would fail later
    # (in URL parsing), and port 0 would silently mean the scheme's default.
    _host, colon, port = registry.rpartition(":")
    if not colon or not port.isdigit():
        return  # no port (an IPv6 address's colons are inside its brackets)
    digits = port.lstrip("0")
    if len(digits) > 5 or not 1 <= int(digits or "0") <= 65535:
        raise InvalidReference(
            f"invalid port {port[:20]} in {shown!r}: a port is a number from 1 to 65535"
        )


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, remainder = name.partition("/")
    if not sep or (
        "." not in first and ":" not in first and first != "localhost" and first == first.lower()
    ):
        registry, repository = DEFAULT_REGISTRY, name
    else:
        registry, repository = first, remainder
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    return registry, repository
