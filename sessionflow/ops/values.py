"""Values the operator's commands read and print: durations, timestamps, sizes."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from ..errors import InvalidArgument
from ..records import utcnow

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1w"`` -> seconds."""
    match = _DURATION.match(text or "")
    if match is None:
        raise InvalidArgument(
            f"not a duration: {text!r}; use a number with s, m, h, d or w, e.g. 90s, 15m, 7d"
        )
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _UNITS[unit]


def iso(value: datetime | None) -> str | None:
    """A timestamp as ISO 8601 in UTC (None stays None)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def age(value: datetime | None, now: datetime | None = None) -> float | None:
    """Seconds since ``value``."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return round(((now or utcnow()) - value).total_seconds(), 3)


def json_size(value: Any) -> int:
    """Bytes of a state value as stored (compact JSON, UTF-8)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
