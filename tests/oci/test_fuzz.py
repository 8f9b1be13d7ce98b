"""Fuzz the parsers: any input gives a parsed object or a FormatError, nothing else."""

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.oci import mediatypes as mt
from ember.oci.config import parse_config
from ember.oci.errors import FormatError
from ember.oci.manifest import parse_manifest

DIGESTS = st.sampled_from(["sha256:" + "a" * 64, "sha512:" + "b" * 128, "sha256:x", "", 7])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
MEDIA = st.sampled_from(
    [
        mt.OCI_MANIFEST,
        mt.OCI_INDEX,
        mt.DOCKER_MANIFEST,
        mt.DOCKER_MANIFEST_LIST,
        mt.DOCKER_SCHEMA1,
        mt.OCI_CONFIG,
        "x/y",
        "bad",
        None,
    ]
)
DESCRIPTOR = st.fixed_dictionaries(
    {"mediaType": MEDIA, "digest": DIGESTS, "size": st.one_of(st.integers(-2, 10**6), SCALARS)},
    optional={
        "platform": st.one_of(
            SCALARS,
            st.fixed_dictionaries(
                {
                    "os": st.sampled_from(["linux", 1]),
                    "architecture": st.sampled_from(["amd64", None]),
                }
            ),
        ),
        "annotations": st.one_of(
            SCALARS,
            st.dictionaries(
                st.text(max_size=5), st.one_of(st.text(max_size=5), SCALARS), max_size=3
            ),
        ),
        "urls": st.one_of(SCALARS, st.lists(st.one_of(st.text(max_size=5), SCALARS), max_size=2)),
    },
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
MANIFESTISH = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), SCALARS),
        "mediaType": MEDIA,
        "config": st.one_of(DESCRIPTOR, SCALARS),
        "layers": st.one_of(st.lists(st.one_of(DESCRIPTOR, SCALARS), max_size=3), SCALARS),
        "manifests": st.one_of(st.lists(st.one_of(DESCRIPTOR, SCALARS), max_size=3), SCALARS),
        "subject": st.one_of(DESCRIPTOR, SCALARS),
        "annotations": JSONISH,
    },
)
CONFIGISH = st.fixed_dictionaries(
    {},
    optional={
        "architecture": st.one_of(st.just("amd64"), SCALARS),
        "os": st.one_of(st.just("linux"), SCALARS),
        "config": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    k: st.one_of(JSONISH, st.lists(st.text(max_size=5), max_size=3))
                    for k in ["Cmd", "Env", "Entrypoint", "Labels", "ExposedPorts", "User"]
                },
            ),
            SCALARS,
        ),
        "rootfs": st.one_of(
            st.fixed_dictionaries(
                {
                    "type": st.sampled_from(["layers", "x"]),
                    "diff_ids": st.lists(DIGESTS, max_size=3),
                }
            ),
            JSONISH,
        ),
    },
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(fn: Any, data: bytes, *args: Any) -> None:
    with contextlib.suppress(FormatError):
        fn(data, *args)


@FUZZ
@given(MANIFESTISH, MEDIA)
def test_manifest_parser_structured(doc: dict[str, Any], served: str | None) -> None:
    _check(parse_manifest, json.dumps(doc).encode(), served)


@FUZZ
@given(CONFIGISH)
def test_config_parser_structured(doc: dict[str, Any]) -> None:
    _check(parse_config, json.dumps(doc).encode())


@FUZZ
@given(st.binary(max_size=200))
def test_parsers_raw_bytes(data: bytes) -> None:
    _check(parse_manifest, data)
    _check(parse_config, data)


REF_ALPHABET = st.sampled_from(list("abcAZ019:/@._-") + ["sha256:" + "a" * 64, "localhost", "docker.io", " "])


@FUZZ
@given(st.lists(REF_ALPHABET, max_size=30).map("".join))
def test_reference_parser(text: str) -> None:
    from ember.oci.errors import InvalidReference
    from ember.oci.reference import Reference

    try:
        ref = Reference.parse(text)
    except InvalidReference:
        return
    # a parsed reference normalises to a fixed point
    assert Reference.parse(str(ref)) == ref
