"""Input checks every public call makes before anything is written, the same on every store.

Databases disagree about bad input (PostgreSQL refuses a 300-character
``VARCHAR(255)`` that SQLite stores, NUL bytes break PostgreSQL text, lone
surrogates cannot be encoded at all), so sessionflow refuses it first, with
:class:`~sessionflow.errors.InvalidArgument` saying what to change.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .enums import SessionStatus
from .errors import InvalidArgument

MAX_ID = 255  # user_id, agent_id, node names, task ids, state keys: the columns' width
MAX_SESSION_ID = 64
MAX_REASON = 64  # sf_sessions.reason
MAX_INT = 2**31 - 1  # limits, counts and turns fit a 32-bit INTEGER column everywhere
MAX_CAP = 1_000_000  # sessions one worker may have open at once
MAX_SECONDS = 10**9  # ~31 years: within what timers, timedelta and SQL timestamps take


def text(name: str, value: Any, *, max_len: int = MAX_ID, optional: bool = False) -> str | None:
    """A non-empty string without NUL or lone surrogates, at most ``max_len`` characters."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        wanted = "a non-empty string or None" if optional else "a non-empty string"
        raise InvalidArgument(f"{name} must be {wanted}, got {shown(value)}")
    if len(value) > max_len:
        raise InvalidArgument(
            f"{name} is {len(value)} characters long; at most {max_len} are allowed"
        )
    if "\x00" in value:
        raise InvalidArgument(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{name} contains a lone surrogate and cannot be stored; use valid Unicode text"
        ) from None
    return value


def ending_status(status: Any) -> SessionStatus:
    """``status`` as the SessionStatus a session ends with (closed or failed)."""
    try:
        ended = SessionStatus(status)
    except ValueError:
        ended = None
    if ended not in (SessionStatus.CLOSED, SessionStatus.FAILED):
        raise InvalidArgument(
            f"a session ends closed or failed (SessionStatus.CLOSED or FAILED), not {shown(status)}"
        )
    return ended


def whole(name: str, value: Any, *, minimum: int, optional: bool = False) -> int | None:
    """An int (not a bool) in ``minimum .. 2**31-1``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise InvalidArgument(
            f"{name} must be a whole number from {minimum} to {MAX_INT}, got {shown(value)}"
        )
    return value


def seconds(name: str, value: Any, *, optional: bool = False, zero: bool = False) -> float | None:
    """A positive (or ``zero``-allowed), finite number of seconds."""
    if value is None and optional:
        return None
    low_ok = _is_number(value) and (value >= 0 if zero else value > 0)
    if not finite(value) or not low_ok or value > MAX_SECONDS:
        kind = "a number of seconds >= 0" if zero else "a positive number of seconds"
        raise InvalidArgument(f"{name} must be {kind} (at most 1e9), got {shown(value)}")
    return float(value)


def json_document(name: str, value: Any, *, max_bytes: int) -> tuple[Any, int]:
    """A private copy of a JSON value (str dict keys, finite numbers, valid Unicode,
    nesting <= 64) and its encoded size."""
    from .merge import MAX_DEPTH, first_bad

    bad = first_bad(value)
    if bad is not None:
        what = (
            f"nested more than {MAX_DEPTH} levels deep"
            if type(bad).__name__ == "_TooDeep"
            else "a string that is not valid Unicode (a lone surrogate)"
            if isinstance(bad, str)
            else f"{type(bad).__name__}, which is not JSON"
        )
        raise InvalidArgument(
            f"{name} must hold only JSON values (None, bool, int, float, str, lists, dicts "
            f"with str keys): it holds {what}"
        )
    encoded = json.dumps(value, allow_nan=False, separators=(",", ":"))
    size = len(encoded)
    if size > max_bytes:
        raise InvalidArgument(f"{name} is {size} bytes as JSON; at most {max_bytes} are allowed")
    return json.loads(encoded), size


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    """A number (not a bool) that is not inf or nan; ``math.isfinite`` raises
    OverflowError for an int beyond a float's range (``10**400``), which is finite."""
    return _is_number(value) and (isinstance(value, int) or math.isfinite(value))


def shown(value: Any) -> str:
    """A short, safe rendering of a bad value for an error message."""
    try:
        shown = repr(value)
    except Exception:
        shown = f"<{type(value).__name__}>"
    return shown if len(shown) <= 60 else shown[:57] + "..."
