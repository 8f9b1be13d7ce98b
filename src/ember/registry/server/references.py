"""What a manifest or index references, as the metadata stores it (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ember.oci import mediatypes as mt
from ember.oci.digest import Digest
from ember.oci.errors import InvalidManifest
from ember.oci.manifest import Descriptor, ImageIndex, ImageManifest


@dataclass(frozen=True)
class NewManifest:
    """A manifest about to be stored, with what it references."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    subject: str | None
    annotations: dict[str, str] | None
    blobs: Mapping[str, int]  # digest -> size its descriptor declares
    children: Mapping[str, int]


def _sizes(descriptors: list[Descriptor]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for d in descriptors:
        key = str(d.digest)
        if sizes.setdefault(key, d.size) != d.size:
            raise InvalidManifest(f"{key} is listed twice with different sizes")
    return sizes


def describe_manifest(parsed: ImageManifest | ImageIndex, digest: Digest, size: int) -> NewManifest:
    """What the metadata needs to know about a validated manifest or index."""
    if isinstance(parsed, ImageManifest):
        blobs = _sizes(
            [parsed.config]
            + [
                layer
                for layer in parsed.layers
                # a foreign layer is fetched from its urls, never from this registry
                if not (mt.is_nondistributable(layer.media_type) and layer.urls)
            ]
        )
        children: dict[str, int] = {}
        # image-spec: a referrer's artifactType falls back to its config's media type
        artifact_type: str | None = parsed.artifact_type or parsed.config.media_type
    else:
        blobs, children = {}, _sizes(parsed.manifests)
        artifact_type = parsed.artifact_type
    return NewManifest(
        digest=str(digest),
        media_type=parsed.media_type,
        size=size,
        artifact_type=artifact_type,
        subject=str(parsed.subject.digest) if parsed.subject is not None else None,
        annotations=parsed.annotations,
        blobs=blobs,
        children=children,
    )
