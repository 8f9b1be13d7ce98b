"""What the image service hands out: an image and its layers, resolved and verified."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ember.oci.config import HistoryEntry, ImageConfig
from ember.oci.digest import Digest
from ember.oci.manifest import ImageManifest
from ember.oci.platform import Platform


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: Digest  # of the blob as stored (usually compressed)
    size: int
    diff_id: Digest  # of the uncompressed tar, from the config
    chain_id: Digest  # identity of this layer stacked on all below it

    def as_dict(self) -> dict[str, Any]:
        return {
            "media_type": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
            "diff_id": str(self.diff_id),
            "chain_id": str(self.chain_id),
        }


@dataclass(frozen=True)
class Image:
    reference: str
    manifest_digest: Digest
    manifest: ImageManifest
    config_digest: Digest
    config: ImageConfig
    platform: Platform
    layers: list[Layer]
    #: bytes of the manifest as stored (0: not known, for an image made by hand)
    manifest_size: int = 0

    @property
    def size(self) -> int:
        """Compressed size of the layers."""
        return sum(layer.size for layer in self.layers)

    @property
    def content_size(self) -> int:
        """Bytes of the image's blobs as pulled: manifest, config and (compressed) layers,
        the size the image table records and ``ember image ls`` shows."""
        return self.manifest_size + self.manifest.config.size + self.size

    def history(self) -> list[tuple[HistoryEntry | None, Layer | None]]:
        """The config's build steps, oldest first, each with the layer it made (None for
        an ``empty_layer`` step, or a step past the last layer); layers the history does
        not account for come last, with no step (an image made without history)."""
        layers = iter(self.layers)
        steps: list[tuple[HistoryEntry | None, Layer | None]] = [
            (entry, None if entry.empty_layer else next(layers, None))
            for entry in self.config.history
        ]
        steps += [(None, layer) for layer in layers]
        return steps

    def as_dict(self) -> dict[str, Any]:
        """The JSON ``ember image inspect`` prints."""
        return {
            "reference": self.reference,
            "manifest_digest": str(self.manifest_digest),
            "media_type": self.manifest.media_type,
            "platform": str(self.platform),
            "config_digest": str(self.config_digest),
            "config": self.config.as_dict(),
            "layers": [layer.as_dict() for layer in self.layers],
            # the same quantity as ``ember image ls``'s: manifest + config + layers
            "size": self.content_size,
            "layers_size": self.size,
        }
