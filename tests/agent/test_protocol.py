"""The agent's wire format (pure)."""

from __future__ import annotations

import pytest

from ember.agent import protocol
from ember.agent.protocol import ProtocolError, Request


def roundtrip(request: Request) -> Request:
    return protocol.decode_request(protocol.encode_request(request))


def test_request_roundtrip_keeps_bytes_that_are_not_utf8() -> None:
    request = Request(
        argv=[b"image", b"unpack", b"\xff\xfe-name", b""],
        cwd=b"/tmp/w\xe9rk",
        env=[b"EMBER_HOME=/x", b"EMPTY=", b"WEIRD=a=b"],
        umask=0o027,
        code=b"/opt/ember/agent/client.py",
    )
    back = roundtrip(request)
    assert back.code == b"/opt/ember/agent/client.py"
    assert back.argv == request.argv
    assert back.cwd == request.cwd
    assert back.env == request.env
    assert back.umask == 0o027
    assert back.environment() == {b"EMBER_HOME": b"/x", b"EMPTY": b"", b"WEIRD": b"a=b"}


def test_no_arguments_and_an_empty_environment() -> None:
    back = roundtrip(Request(argv=[], cwd=b"/", env=[], umask=0))
    assert (back.argv, back.env, back.umask) == ([], [], 0)


def test_nul_bytes_cannot_be_encoded() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode_request(Request(argv=[b"a\0b"], cwd=b"/", env=[], umask=0))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"HTTP/1.1 GET /",
        b"EMBER-AGENT/2\0/c\0/\0022\0000",
        b"EMBER-AGENT/1\0/\0022\0000",  # no code field
        b"EMBER-AGENT/1\0relative\0/\0022\0000",
        b"EMBER-AGENT/1\0/c\0relative\0022\0000",
        b"EMBER-AGENT/1\0/c\0/\0999\0000",
        b"EMBER-AGENT/1\0/c\0/\0-1\0000",
        b"EMBER-AGENT/1\0/c\0/\0022\0003\0a",  # fewer arguments than announced
        b"EMBER-AGENT/1\0/c\0/\0022\00099999999\0a",
        b"EMBER-AGENT/1\0/c\0/\0022\0000\0NOEQUALS",
        b"EMBER-AGENT/1\0/c\0/\0022\0000\0=value",
    ],
)
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_request(payload)


def test_frames_are_bounded() -> None:
    assert protocol.frame(b"abc") == b"\0\0\0\x03abc"
    with pytest.raises(ProtocolError):
        protocol.frame_length((protocol.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError):
        protocol.frame(b"x" * (protocol.MAX_FRAME + 1))


def test_only_terminal_signals_may_be_forwarded() -> None:
    assert protocol.parse_signal(protocol.signal_message(2)) == 2
    assert protocol.parse_signal(protocol.signal_message(28)) == 28
    for bad in (b"K9", b"K19", b"K", b"Kx", b"X2", b"K-2"):
        with pytest.raises(ProtocolError):
            protocol.parse_signal(bad)


def test_exit_messages() -> None:
    assert protocol.parse_exited(protocol.exited(3)) == (3, 0)
    assert protocol.parse_exited(protocol.exited(130, 2)) == (130, 2)
    with pytest.raises(ProtocolError):
        protocol.parse_exited(b"Xabc")
