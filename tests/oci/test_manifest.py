import json
from typing import Any

import pytest

from ember.oci import mediatypes as mt
from ember.oci.digest import Digest
from ember.oci.errors import InvalidManifest, UnsupportedMediaType, UnsupportedSchema
from ember.oci.manifest import MAX_MANIFEST_SIZE, ImageIndex, ImageManifest, parse_manifest

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def manifest(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [
            {"mediaType": mt.OCI_LAYER_GZIP, "digest": D2, "size": 20, "annotations": {"a": "b"}}
        ],
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def index(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": D1,
                "size": 100,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            }
        ],
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def b(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_parse_oci_manifest() -> None:
    m = parse_manifest(b(manifest()), mt.OCI_MANIFEST)
    assert isinstance(m, ImageManifest)
    assert m.config.digest == Digest.parse(D1)
    assert m.config.size == 10
    assert m.layers[0].media_type == mt.OCI_LAYER_GZIP
    assert m.layers[0].annotations == {"a": "b"}
    # round trip through the canonical serialisation
    assert parse_manifest(m.to_json()) == m


def test_parse_docker_manifest_and_list() -> None:
    m = parse_manifest(b(manifest(mediaType=mt.DOCKER_MANIFEST)), mt.DOCKER_MANIFEST)
    assert isinstance(m, ImageManifest) and m.media_type == mt.DOCKER_MANIFEST
    i = parse_manifest(
        b(index(mediaType=mt.DOCKER_MANIFEST_LIST)), f"{mt.DOCKER_MANIFEST_LIST}; charset=utf-8"
    )
    assert isinstance(i, ImageIndex) and i.manifests[0].platform is not None
    assert i.manifests[0].platform.variant == "v8"


def test_media_type_from_shape_when_absent() -> None:
    assert isinstance(parse_manifest(b(manifest(mediaType=None))), ImageManifest)
    assert isinstance(parse_manifest(b(index(mediaType=None)), "application/json"), ImageIndex)
    assert parse_manifest(b(manifest(mediaType=None)), mt.OCI_MANIFEST).media_type == mt.OCI_MANIFEST
    assert parse_manifest(b(index(mediaType=None)), mt.OCI_INDEX).media_type == mt.OCI_INDEX
    with pytest.raises(InvalidManifest):
        parse_manifest(b(manifest(mediaType=None)), mt.OCI_INDEX)


def test_schema1_refused_clearly() -> None:
    doc = {"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}
    with pytest.raises(UnsupportedSchema, match="schema 1"):
        parse_manifest(b(doc), mt.DOCKER_SCHEMA1_SIGNED)
    with pytest.raises(UnsupportedSchema):
        parse_manifest(b(manifest(mediaType=mt.DOCKER_SCHEMA1)))
    with pytest.raises(UnsupportedSchema):
        parse_manifest(b(manifest()), mt.DOCKER_SCHEMA1_SIGNED)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"not json",
        b'{"schemaVersion": 2, "schemaVersion": 2}',
        b(manifest(schemaVersion=3)),
        b(manifest(schemaVersion=True)),
        b(manifest(schemaVersion="2")),
        b(manifest(schemaVersion=2.0)),  # equal to 2 in Python; Go clients cannot read it
        b(manifest(config=None)),
        b(manifest(layers=None)),
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": D1})),
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": D1, "size": -1})),
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": D1, "size": 1.5})),
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": D1, "size": True})),
        # sizes are int64: Go clients cannot read a bigger one back (it got stored)
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": D1, "size": 1 << 63})),
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": D1, "size": 10**400})),
        b(manifest(subject={"mediaType": mt.OCI_MANIFEST, "digest": D1, "size": 1 << 80})),
        # a trailing newline in a digest or media type (go-digest refuses those)
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": D1 + "\n", "size": 1})),
        b(manifest(config={"mediaType": mt.OCI_CONFIG + "\n", "digest": D1, "size": 1})),
        b(manifest(artifactType="application/x-foo\n")),
        b(manifest(config={"mediaType": mt.OCI_CONFIG, "digest": "sha256:xyz", "size": 1})),
        b(manifest(config={"mediaType": "no slash", "digest": D1, "size": 1})),
        b(manifest(config={"digest": D1, "size": 1})),
        b(manifest(layers={})),
        b(manifest(layers=["x"])),
        b(manifest(annotations={"a": 1})),
        b(manifest(manifests=[])),  # type confusion (CVE-2021-41190)
        b(index(layers=[])),
        b(index(mediaType=None, config={})),
        b(
            index(
                manifests=[
                    {
                        "mediaType": mt.OCI_MANIFEST,
                        "digest": D1,
                        "size": 1,
                        "platform": {"os": "linux"},
                    }
                ]
            )
        ),
        b({"schemaVersion": 2}),
    ],
)
def test_invalid(data: bytes) -> None:
    with pytest.raises(InvalidManifest):
        parse_manifest(data)


def test_declared_and_served_type_must_agree() -> None:
    with pytest.raises(InvalidManifest, match="Content-Type says"):
        parse_manifest(b(manifest()), mt.OCI_INDEX)


@pytest.mark.parametrize(
    ("doc", "claimed"),
    [(manifest(mediaType=None), mt.DOCKER_MANIFEST), (index(mediaType=None), mt.DOCKER_MANIFEST_LIST)],
)
def test_docker_types_must_be_declared_in_the_document(doc: dict[str, Any], claimed: str) -> None:
    # docker/distribution refuses such a PUT; the shape may tell only an OCI kind
    with pytest.raises(InvalidManifest, match="must declare it in its mediaType"):
        parse_manifest(b(doc), claimed)


def test_unknown_manifest_type() -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_manifest(b(manifest(mediaType="application/vnd.example+json")))


def test_size_limit() -> None:
    big = manifest(annotations={"pad": "x" * MAX_MANIFEST_SIZE})
    with pytest.raises(InvalidManifest, match="more than"):
        parse_manifest(b(big))


def test_subject_and_artifact_type() -> None:
    m = parse_manifest(
        b(
            manifest(
                subject={"mediaType": mt.OCI_MANIFEST, "digest": D2, "size": 5},
                artifactType="application/x.sig",
            )
        )
    )
    assert isinstance(m, ImageManifest)
    assert m.subject is not None and m.subject.digest == Digest.parse(D2)
    assert m.artifact_type == "application/x.sig"


def test_empty_index_is_valid() -> None:
    i = parse_manifest(b(index(manifests=[])))
    assert isinstance(i, ImageIndex) and i.manifests == []
