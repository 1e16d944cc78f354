"""tokens.py: signed recreate tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionflow import InvalidArgument, InvalidRecreateToken
from sessionflow.tokens import make_token, read_token, sign_task, task_signed

KEY = b"unit-test-secret-key-0123456789-0123"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed(payload: str, key: bytes = KEY) -> str:
    """A token with a valid signature over an arbitrary payload string."""
    signature = b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def test_round_trip() -> None:
    token = make_token(KEY, "session-1", "w1@host")
    assert isinstance(token, str)
    assert read_token(KEY, token) == ("session-1", "w1@host")


def test_token_is_url_safe_and_deterministic() -> None:
    token = make_token(KEY, "s", "w@h")
    assert token == make_token(KEY, "s", "w@h")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


@given(st.text(), st.text())
def test_round_trip_any_text(session_id: str, nodename: str) -> None:
    assert read_token(KEY, make_token(KEY, session_id, nodename)) == (session_id, nodename)


def test_invalid_token_is_an_invalid_argument() -> None:
    assert issubclass(InvalidRecreateToken, InvalidArgument)


def test_tampered_payload() -> None:
    token = make_token(KEY, "session-1", "w1@host")
    _, signature = token.split(".")
    forged = b64(json.dumps([1, "session-1", "w2@host"], separators=(",", ":")).encode())
    with pytest.raises(InvalidRecreateToken, match="signature does not match"):
        read_token(KEY, f"{forged}.{signature}")


def test_tampered_signature() -> None:
    token = make_token(KEY, "session-1", "w1@host")
    payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(InvalidRecreateToken, match="signature does not match"):
        read_token(KEY, f"{payload}.{flipped}")


def test_foreign_key() -> None:
    token = make_token(b"another-key-another-key-another-key", "session-1", "w1@host")
    with pytest.raises(InvalidRecreateToken, match="another sessionflow_secret_key"):
        read_token(KEY, token)


@pytest.mark.parametrize("token", [None, 42, b"a.b", ["a", "b"]])
def test_not_a_string(token: Any) -> None:
    with pytest.raises(InvalidRecreateToken, match="not a sessionflow recreate token"):
        read_token(KEY, token)


@pytest.mark.parametrize("token", ["", "nodot", "a.b.c", "..", "a.b.c.d"])
def test_wrong_shape(token: str) -> None:
    with pytest.raises(InvalidRecreateToken):
        read_token(KEY, token)


@pytest.mark.parametrize(
    "payload",
    [
        "!!!not-base64!!!",
        "A",  # one leftover base64 character: invalid length
        b64(b"not json"),
        b64(b"\xff\xfe\x00"),  # not UTF-8
        b64(b'"just a string"'),
        b64(b"7"),
        b64(b"[1, 2]"),
        b64(b"null"),
    ],
)
def test_malformed_payload_with_valid_signature(payload: str) -> None:
    with pytest.raises(InvalidRecreateToken):
        read_token(KEY, signed(payload))


@pytest.mark.parametrize(
    "content",
    [[2, "s", "w@h"], [0, "s", "w@h"], ["1", "s", "w@h"], [1, 5, "w@h"], [1, "s", None]],
)
def test_wrong_version_or_types(content: list[Any]) -> None:
    payload = b64(json.dumps(content).encode())
    with pytest.raises(InvalidRecreateToken, match="incompatible"):
        read_token(KEY, signed(payload))


def test_non_ascii_signature() -> None:
    payload = make_token(KEY, "s", "w@h").split(".")[0]
    with pytest.raises(InvalidRecreateToken):
        read_token(KEY, f"{payload}.sïgnature")


def test_deeply_nested_signed_payload_is_malformed_not_a_crash() -> None:
    payload = b64(("[" * 10_000 + "]" * 10_000).encode())
    with pytest.raises(InvalidRecreateToken):
        read_token(KEY, signed(payload))


def test_oversized_token_refused_before_any_work() -> None:
    with pytest.raises(InvalidRecreateToken, match="not a sessionflow recreate token"):
        read_token(KEY, "a" * 5000 + ".b")


def test_task_signatures() -> None:
    sig = sign_task(KEY, "s-1", "t-1")
    assert task_signed(KEY, "s-1", "t-1", sig)
    assert not task_signed(KEY, "s-2", "t-1", sig)  # another session
    assert not task_signed(KEY, "s-1", "t-2", sig)  # another task
    assert not task_signed(b"x" * 32, "s-1", "t-1", sig)  # another key
    assert not task_signed(KEY, "s-1", "t-1", None)
    assert not task_signed(KEY, "s-1", "t-1", 12)
    assert KEY.decode() not in sig
