"""Image manifests and indexes (OCI image spec 1.1, Docker schema 2).

``parse_manifest`` validates everything a later step relies on: the schema
version, the media type (the document's own and the one the server claimed
must agree, and a document may not look like both a manifest and an index:
CVE-2021-41190), every descriptor's digest, size and media type.  Docker
schema 1 is refused with a message that says what to do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ember.oci import mediatypes as mt
from ember.oci._json import Fields, load_object
from ember.oci.digest import Digest
from ember.oci.errors import FormatError, InvalidManifest, UnsupportedMediaType, UnsupportedSchema

#: the largest manifest or index ember reads (the distribution spec's 4 MiB)
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_DESCRIPTORS = 10_000

_MEDIA_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
# Content-Type values that say nothing about which manifest format a body is.
_GENERIC_TYPES = {"", "application/json", "text/plain", "application/octet-stream"}


@dataclass(frozen=True)
class DescriptorPlatform:
    """The ``platform`` object of an index entry, as written."""

    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = None
    os_features: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version is not None:
            out["os.version"] = self.os_version
        if self.os_features is not None:
            out["os.features"] = list(self.os_features)
        if self.variant is not None:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: DescriptorPlatform | None = None
    annotations: dict[str, str] | None = None
    artifact_type: str | None = None
    urls: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.urls is not None:
            out["urls"] = list(self.urls)
        if self.annotations is not None:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.as_dict()
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        return out


def _document(doc: ImageManifest | ImageIndex, **body: Any) -> dict[str, Any]:
    """The JSON of a manifest or index: the shared envelope around ``body``, in spec key order."""
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": doc.media_type}
    if doc.artifact_type is not None:
        out["artifactType"] = doc.artifact_type
    out.update(body)
    if doc.subject is not None:
        out["subject"] = doc.subject.as_dict()
    if doc.annotations is not None:
        out["annotations"] = dict(doc.annotations)
    return out


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor] = field(default_factory=list)
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return _document(
            self,
            config=self.config.as_dict(),
            layers=[layer.as_dict() for layer in self.layers],
        )

    def to_json(self) -> bytes:
        """Canonical bytes (compact, fixed key order): a stable digest for synthesised manifests."""
        return json.dumps(self.as_dict(), separators=(",", ":")).encode()


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: list[Descriptor] = field(default_factory=list)
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return _document(self, manifests=[m.as_dict() for m in self.manifests])


def valid_media_type(value: str) -> bool:
    """``type/subtype`` as RFC 6838 and the OCI specs write media types (no parameters)."""
    return _MEDIA_TYPE.fullmatch(value) is not None


def _media_type(value: str, what: str) -> str:
    if not valid_media_type(value):
        raise InvalidManifest(f"{what}: invalid media type {value[:150]!r}")
    return value


def parse_descriptor(doc: Any, where: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise InvalidManifest(f"{where}: a descriptor must be an object, not {type(doc).__name__}")
    f = Fields(doc, where, InvalidManifest)
    media_type = _media_type(f.text("mediaType", required=True) or "", where)
    try:
        digest = Digest.parse(f.text("digest", required=True) or "")
    except FormatError as e:
        raise InvalidManifest(f"{where}: {e}") from None
    size = f.integer("size", required=True)
    assert size is not None
    if size < 0:
        raise f.fail("size", "must not be negative")
    platform = None
    pdoc = f.obj("platform")
    if pdoc is not None:
        pf = Fields(pdoc, f"{where}.platform", InvalidManifest)
        platform = DescriptorPlatform(
            architecture=pf.text("architecture", required=True) or "",
            os=pf.text("os", required=True) or "",
            variant=pf.text("variant"),
            os_version=pf.text("os.version"),
            os_features=pf.texts("os.features"),
        )
    artifact_type = f.text("artifactType")
    if artifact_type is not None:
        _media_type(artifact_type, where)
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        platform=platform,
        annotations=f.text_map("annotations"),
        artifact_type=artifact_type,
        urls=f.texts("urls"),
    )


def _descriptors(f: Fields, key: str) -> list[Descriptor]:
    items = f.array(key) or []
    if len(items) > MAX_DESCRIPTORS:
        raise f.fail(
            key, f"has {len(items)} entries, more than the {MAX_DESCRIPTORS} ember accepts"
        )
    return [parse_descriptor(item, f"{f.where}.{key}[{i}]") for i, item in enumerate(items)]


def _strip_params(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _kind(doc: dict[str, Any], declared: str | None, claimed: str) -> str:
    """Decide manifest vs index from the document and the transport's claim."""
    if declared in mt.SCHEMA1_TYPES or claimed in mt.SCHEMA1_TYPES:
        raise UnsupportedSchema(_SCHEMA1_MESSAGE)
    if declared is not None and claimed not in _GENERIC_TYPES and declared != claimed:
        raise InvalidManifest(
            f"manifest declares media type {declared[:120]!r} but its Content-Type says {claimed[:120]!r}"
        )
    if declared is None and claimed in _DOCKER_TYPES:
        # Docker's schema 2 makes the field mandatory (docker/distribution refuses
        # such a PUT): only OCI documents may let their shape tell their kind.
        raise InvalidManifest(
            f"a document sent as {claimed} must declare it in its mediaType field "
            "(only OCI manifests and indexes may leave it out)"
        )
    media_type = declared or (claimed if claimed not in _GENERIC_TYPES else "")
    looks_index = "manifests" in doc
    looks_manifest = "config" in doc or "layers" in doc
    if looks_index and looks_manifest:
        raise InvalidManifest(
            "document has both 'manifests' and 'config'/'layers': ambiguous, refused"
        )
    if not media_type:
        # OCI allows omitting mediaType; the shape then tells the kind.
        if looks_index:
            return mt.OCI_INDEX
        if looks_manifest:
            return mt.OCI_MANIFEST
        raise InvalidManifest(
            "document is neither an image manifest nor an index (no mediaType, config or manifests)"
        )
    if media_type in mt.INDEX_TYPES and looks_manifest:
        raise InvalidManifest(f"an index ({media_type}) must not have 'config' or 'layers'")
    if media_type in mt.MANIFEST_TYPES and looks_index:
        raise InvalidManifest(f"an image manifest ({media_type}) must not have 'manifests'")
    if media_type not in mt.MANIFEST_TYPES | mt.INDEX_TYPES:
        raise UnsupportedMediaType(
            f"unsupported manifest media type {media_type[:150]!r} (ember reads OCI manifests and indexes "
            "and Docker schema 2 manifests and manifest lists)"
        )
    return media_type


_DOCKER_TYPES = frozenset({mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST})

_SCHEMA1_MESSAGE = (
    "Docker image manifest schema 1 is not supported (deprecated since 2017): "
    "rebuild or re-push the image with a current tool to get a schema 2 or OCI manifest"
)


def parse_manifest(data: bytes, media_type: str | None = None) -> ImageManifest | ImageIndex:
    """Parse and validate a manifest or index; ``media_type`` is what the server said it is."""
    doc = load_object(data, "manifest", MAX_MANIFEST_SIZE, InvalidManifest)
    f = Fields(doc, "manifest", InvalidManifest)
    version = doc.get("schemaVersion")
    if version == 1:
        raise UnsupportedSchema(_SCHEMA1_MESSAGE)
    # an integer, as Go clients read it: 2.0 equals 2 in Python, and skopeo cannot read it
    if type(version) is not int or version != 2:
        raise InvalidManifest(f"manifest has schemaVersion {str(version)[:20]}, expected 2")
    kind = _kind(doc, f.text("mediaType"), _strip_params(media_type))
    subject_doc = doc.get("subject")
    subject = parse_descriptor(subject_doc, "manifest.subject") if subject_doc is not None else None
    artifact_type = f.text("artifactType")
    if artifact_type is not None:
        _media_type(artifact_type, "manifest")
    annotations = f.text_map("annotations")
    if kind in mt.INDEX_TYPES:
        return ImageIndex(
            media_type=kind,
            manifests=_descriptors(f, "manifests"),
            subject=subject,
            artifact_type=artifact_type,
            annotations=annotations,
        )
    config_doc = doc.get("config")
    if config_doc is None:
        raise f.fail("config", "is missing")
    if "layers" not in doc:
        raise f.fail("layers", "is missing")
    return ImageManifest(
        media_type=kind,
        config=parse_descriptor(config_doc, "manifest.config"),
        layers=_descriptors(f, "layers"),
        subject=subject,
        artifact_type=artifact_type,
        annotations=annotations,
    )
