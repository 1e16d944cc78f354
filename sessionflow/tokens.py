"""HMAC signatures: of session task headers, and of recreate tokens.

The key is ``sessionflow_secret_key`` when it is set, otherwise a random key the
store generates once and every process reads (so anyone with store access has
it — the trust model says store access is full access anyway).

A session task carries ``sessionflow_sig = HMAC(key, session id, task id)``: the
worker can tell a task genuinely sent through a session from a forged header
without asking the store.

Recreate tokens carry (session id, worker node name) and a signature. They do
not expire and may be used more than once: each use asks for a *new* session on
the same worker, which any process with the app could ask for anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from .errors import InvalidRecreateToken

_VERSION = 1
MAX_TOKEN = 2048  # characters; real tokens are ~150


def sign_task(key: bytes, session_id: str, task_id: str) -> str:
    """The signature header value of ``task_id`` sent through ``session_id``."""
    message = f"{session_id}\x00{task_id}".encode("utf-8", "surrogatepass")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def task_signed(key: bytes, session_id: str, task_id: str, signature: object) -> bool:
    """Whether ``signature`` was made by :func:`sign_task` with this key."""
    if not isinstance(signature, str) or not isinstance(task_id, str):
        return False
    return hmac.compare_digest(sign_task(key, session_id, task_id), signature)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(key: bytes, session_id: str, nodename: str) -> str:
    """Sign (session id, worker node name) into a URL-safe token."""
    payload = _b64(json.dumps([_VERSION, session_id, nodename], separators=(",", ":")).encode())
    signature = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def read_token(key: bytes, token: object) -> tuple[str, str]:
    """Verify a token; returns (session id, worker node name)."""
    if (
        not isinstance(token, str)
        or len(token) > MAX_TOKEN
        or not token.isascii()
        or token.count(".") != 1
    ):
        raise InvalidRecreateToken(
            "not a sessionflow recreate token: use SessionInfo.recreate_token"
        )
    payload, signature = token.split(".")
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature):
        raise InvalidRecreateToken(
            "recreate token signature does not match: it was altered, or signed with another "
            "sessionflow_secret_key (or another store's generated key)"
        )
    try:
        version, session_id, nodename = json.loads(_unb64(payload))
    except (ValueError, TypeError, RecursionError):
        raise InvalidRecreateToken("recreate token payload is malformed") from None
    if version != _VERSION or not isinstance(session_id, str) or not isinstance(nodename, str):
        raise InvalidRecreateToken("recreate token was made by an incompatible sessionflow")
    return session_id, nodename
