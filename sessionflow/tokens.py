"""Recreate tokens: opaque, HMAC-signed references to the worker of a session."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from .errors import ConfigurationError, InvalidRecreateToken

_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _require_key(secret_key: str | None) -> bytes:
    if not secret_key:
        raise ConfigurationError(
            "recreate tokens are signed: set app.conf.sessionflow_secret_key to a long "
            "random string (the same on clients and workers)"
        )
    return secret_key.encode()


def make_token(secret_key: str | None, session_id: str, nodename: str) -> str:
    """Sign (session id, worker nodename) into a URL-safe token."""
    key = _require_key(secret_key)
    payload = _b64(json.dumps([_VERSION, session_id, nodename], separators=(",", ":")).encode())
    signature = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def read_token(secret_key: str | None, token: object) -> tuple[str, str]:
    """Verify a token; returns (session id, worker nodename)."""
    key = _require_key(secret_key)
    if not isinstance(token, str) or not token.isascii() or token.count(".") != 1:
        raise InvalidRecreateToken(
            "not a sessionflow recreate token: use SessionInfo.recreate_token"
        )
    payload, signature = token.split(".")
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature):
        raise InvalidRecreateToken(
            "recreate token signature does not match: it was altered or signed with "
            "another sessionflow_secret_key"
        )
    try:
        version, session_id, nodename = json.loads(_unb64(payload))
    except (ValueError, TypeError) as exc:
        raise InvalidRecreateToken("recreate token payload is malformed") from exc
    if version != _VERSION or not isinstance(session_id, str) or not isinstance(nodename, str):
        raise InvalidRecreateToken("recreate token was made by an incompatible sessionflow")
    return session_id, nodename
