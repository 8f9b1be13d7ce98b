"""The checks that turn a manifest and a config into an Image (pure)."""

from __future__ import annotations

import pytest

from ember.images import InvalidImage
from ember.images.model import Image
from ember.images.service import build_image
from ember.oci import mediatypes as mt
from ember.oci.chainid import chain_ids
from ember.oci.config import ImageConfig
from ember.oci.digest import Digest
from ember.oci.errors import UnsupportedMediaType
from ember.oci.manifest import Descriptor, ImageManifest
from ember.oci.platform import Platform

DIFFS = [Digest.of(b"d1"), Digest.of(b"d2")]
BLOBS = [Digest.of(b"b1"), Digest.of(b"b2")]
CONFIG = Descriptor(mt.OCI_CONFIG, Digest.of(b"config"), 6)


def manifest(layers: list[Descriptor] | None = None, config: Descriptor = CONFIG) -> ImageManifest:
    if layers is None:
        layers = [Descriptor(mt.OCI_LAYER_GZIP, d, 10 + i) for i, d in enumerate(BLOBS)]
    return ImageManifest(mt.OCI_MANIFEST, config, layers)


def config(diff_ids: list[Digest] = DIFFS) -> ImageConfig:
    return ImageConfig(architecture="arm64", os="linux", variant="v8", diff_ids=diff_ids)


def test_layers_carry_diff_and_chain_ids() -> None:
    image = build_image("r", Digest.of(b"m"), manifest(), CONFIG.digest, config())
    assert [x.digest for x in image.layers] == BLOBS
    assert [x.diff_id for x in image.layers] == DIFFS
    assert [x.chain_id for x in image.layers] == chain_ids(DIFFS)
    assert image.platform == Platform("linux", "arm64", "")
    assert image.size == 21
    assert image.as_dict()["layers"][1]["chain_id"] == str(chain_ids(DIFFS)[1])


def test_layer_count_must_match_diff_ids() -> None:
    with pytest.raises(InvalidImage, match="2 layers but the config lists 1"):
        build_image("r", Digest.of(b"m"), manifest(), CONFIG.digest, config(DIFFS[:1]))


def test_more_layers_than_a_host_takes_are_refused() -> None:
    """Every layer is a snapshot on every host that runs the image: a manifest may list
    10,000 (empty) layers, which cost minutes and pool space before the first boot."""
    from ember.images.service import MAX_LAYERS

    def of(n: int) -> tuple[ImageManifest, ImageConfig]:
        blobs = [Descriptor(mt.OCI_LAYER_GZIP, Digest.of(b"b%d" % i), 10) for i in range(n)]
        return manifest(blobs), config([Digest.of(b"d%d" % i) for i in range(n)])

    assert len(build_image("r", Digest.of(b"m"), of(MAX_LAYERS)[0], CONFIG.digest,
                           of(MAX_LAYERS)[1]).layers) == MAX_LAYERS  # fmt: skip
    too_many, its_config = of(MAX_LAYERS + 1)
    with pytest.raises(InvalidImage, match=f"r has {MAX_LAYERS + 1} layers; .* at most {MAX_LAYERS}"):
        build_image("r", Digest.of(b"m"), too_many, CONFIG.digest, its_config)


def test_not_a_container_image() -> None:
    artifact = Descriptor("application/vnd.example.sbom+json", Digest.of(b"c"), 1)
    with pytest.raises(InvalidImage, match="not a container image"):
        build_image("r", Digest.of(b"m"), manifest(config=artifact), artifact.digest, config())


def test_unknown_layer_type() -> None:
    layers = [Descriptor("application/x-rar", d, 1) for d in BLOBS]
    with pytest.raises(UnsupportedMediaType, match="application/x-rar"):
        build_image("r", Digest.of(b"m"), manifest(layers), CONFIG.digest, config())


def test_history_steps_get_the_layers_they_made() -> None:
    made, env, more = {"created_by": "RUN a"}, {"created_by": "ENV x", "empty_layer": True}, {"created_by": "RUN b"}

    def image_of(history: list[dict[str, object]]) -> Image:
        cfg = ImageConfig(architecture="arm64", os="linux", diff_ids=DIFFS, raw_history=history)
        return build_image("r", Digest.of(b"m"), manifest(), CONFIG.digest, cfg)

    def steps(image: Image) -> list[tuple[str | None, Digest | None]]:
        return [(e.created_by if e else None, x.digest if x else None) for e, x in image.history()]

    image = image_of([made, env, more])
    assert steps(image) == [("RUN a", BLOBS[0]), ("ENV x", None), ("RUN b", BLOBS[1])]
    # fewer steps than layers (an image made by hand): the rest come last, with no step
    assert steps(image_of([made])) == [("RUN a", BLOBS[0]), (None, BLOBS[1])]
    # more steps than layers: the extra ones made none
    assert steps(image_of([made, more, made])) == [("RUN a", BLOBS[0]), ("RUN b", BLOBS[1]), ("RUN a", None)]
