"""Image configuration (image-spec config.md): the parts that matter for running.

Docker and OCI configs share the shape; Docker writes ``null`` for empty
lists and objects, which are read as empty.  ``rootfs.diff_ids`` must be
present and of type ``layers``: it is how every layer is verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ember.oci._json import Fields, load_object
from ember.oci.digest import Digest
from ember.oci.errors import FormatError, InvalidConfig
from ember.oci.platform import is_platform_component

MAX_CONFIG_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class HistoryEntry:
    """One step of how the image was built (config ``history``, oldest first); each
    step that is not an ``empty_layer`` made the next layer."""

    created: str | None = None
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    empty_layer: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "created_by": self.created_by,
            "author": self.author,
            "comment": self.comment,
            "empty_layer": self.empty_layer,
        }


@dataclass(frozen=True)
class ImageConfig:
    architecture: str
    os: str
    variant: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    user: str = ""
    working_dir: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    stop_signal: str | None = None
    volumes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    diff_ids: list[Digest] = field(default_factory=list)
    created: str | None = None
    author: str | None = None
    #: the config's ``history`` as it came (JSON values), read by ``history`` on demand:
    #: nothing needs it to run the image, and a config can hold millions of entries
    raw_history: list[Any] = field(default_factory=list, compare=False, repr=False)

    @property
    def history(self) -> list[HistoryEntry]:
        """The build steps, oldest first.  Read leniently, for display: an entry or a field
        of the wrong type reads as empty (Go's decoder takes ``null`` entries; an image
        is never refused over its history)."""
        out = []
        for item in self.raw_history:
            doc = item if isinstance(item, dict) else {}

            def text(key: str, doc: dict[str, Any] = doc) -> str | None:
                value = doc.get(key)
                return value if isinstance(value, str) else None

            out.append(HistoryEntry(
                created=text("created"), created_by=text("created_by"), author=text("author"),
                comment=text("comment"), empty_layer=doc.get("empty_layer") is True,
            ))  # fmt: skip
        return out

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (for ``ember image inspect``)."""
        return {
            "architecture": self.architecture,
            "os": self.os,
            "variant": self.variant,
            "created": self.created,
            "author": self.author,
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
            "env": list(self.env),
            "user": self.user,
            "working_dir": self.working_dir,
            "exposed_ports": list(self.exposed_ports),
            "stop_signal": self.stop_signal,
            "volumes": list(self.volumes),
            "labels": dict(self.labels),
            "diff_ids": [str(d) for d in self.diff_ids],
            "history": [h.as_dict() for h in self.history],
        }


def _key_set(f: Fields, key: str) -> list[str]:
    """Docker's ``{"80/tcp": {}}`` sets, as a sorted list of keys."""
    value = f.obj(key)
    return sorted(value) if value else []


def parse_config(data: bytes) -> ImageConfig:
    doc = load_object(data, "image config", MAX_CONFIG_SIZE, InvalidConfig)
    top = Fields(doc, "image config", InvalidConfig)
    architecture = top.text("architecture", required=True) or ""
    os_name = top.text("os", required=True) or ""
    if not architecture or not os_name:
        raise InvalidConfig("image config: 'architecture' and 'os' must not be empty")
    variant = top.text("variant")
    for key, value in (("os", os_name), ("architecture", architecture), ("variant", variant)):
        if value and not is_platform_component(value):
            raise InvalidConfig(
                f"image config.{key} {value[:64]!r} is not a platform name (letters, digits, '_', '.', '-')"
            )
    rootfs = top.obj("rootfs", required=True)
    assert rootfs is not None
    rf = Fields(rootfs, "image config.rootfs", InvalidConfig)
    if rf.text("type", required=True) != "layers":
        raise rf.fail("type", "must be 'layers'")
    diff_ids: list[Digest] = []
    for i, text in enumerate(rf.array("diff_ids", required=True) or []):
        if not isinstance(text, str):
            raise InvalidConfig(f"image config.rootfs.diff_ids[{i}] must be a string")
        try:
            diff_ids.append(Digest.parse(text))
        except FormatError as e:
            raise InvalidConfig(f"image config.rootfs.diff_ids[{i}]: {e}") from None

    cdoc = top.obj("config") or {}
    c = Fields(cdoc, "image config.config", InvalidConfig)
    env = c.texts("Env") or []
    labels = c.text_map("Labels") or {}
    return ImageConfig(
        architecture=architecture,
        os=os_name,
        variant=variant,
        entrypoint=c.str_slice("Entrypoint"),
        cmd=c.str_slice("Cmd"),
        env=env,
        user=c.text("User") or "",
        working_dir=c.text("WorkingDir") or "",
        exposed_ports=_key_set(c, "ExposedPorts"),
        stop_signal=c.text("StopSignal") or None,
        volumes=_key_set(c, "Volumes"),
        labels=labels,
        diff_ids=diff_ids,
        created=top.text("created"),
        author=top.text("author"),
        # not checked here: see ImageConfig.history (Go takes only a list, or null)
        raw_history=history if isinstance(history := doc.get("history"), list) else [],
    )
