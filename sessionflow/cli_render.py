"""The text that ``celery -A proj sessions ...`` prints for people: pure functions from
the plain dicts of :mod:`sessionflow.ops` to aligned tables and short lines (durations,
timestamps, plurals). No click and no I/O here; :mod:`sessionflow.celery_cli` echoes
what they return.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

EMPTY = "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned under upper-case headers; ``-`` for nothing."""
    cells = [[EMPTY if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [list(headers), *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def duration(seconds: float | None) -> str:
    """``7ms``, ``4.2s``, ``42s``, ``5m07s``, ``3h02m``, ``2d04h``."""
    if seconds is None:
        return EMPTY
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def timestamp(value: str | None) -> str:
    """An ISO timestamp from :mod:`ops` as ``2030-01-01 12:00:00Z``."""
    return EMPTY if not value else value[:19].replace("T", " ") + "Z"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def render_list(data: dict[str, Any]) -> str:
    found = data["sessions"]
    if not found:
        return "no sessions match"
    text = table(
        ["SESSION", "STATE", "WORKER", "USER", "AGENT", "TURNS", "AGE", "REASON"],
        [
            [
                s["session_id"],
                s["state"] + (" (moving)" if s["moving"] else ""),
                s["hostname"],
                s["user_id"],
                s["agent_id"],
                s["turns"] if s["max_turns"] is None else f"{s['turns']}/{s['max_turns']}",
                duration(s["age"]),
                s["reason"],
            ]
            for s in found
        ],
    )
    if data["more"]:
        text += f"\n(the newest {data['limit']} shown; more match: raise --limit)"
    return text


def render_show(data: dict[str, Any]) -> str:
    s = data["session"]
    info = [
        ("session", s["session_id"]),
        ("state", s["state"] + (" (moving to another worker)" if s["moving"] else "")),
        ("reason", s["reason"]),
        ("worker", s["hostname"]),
        ("queue", s["queue"]),
        ("user", s["user_id"]),
        ("agent", s["agent_id"]),
        ("turns", s["turns"] if s["max_turns"] is None else f"{s['turns']} of {s['max_turns']}"),
        ("created", f"{timestamp(s['created_at'])} ({duration(s['age'])} ago)"),
        ("opened", timestamp(s["opened_at"])),
        ("deadline", timestamp(s["deadline_at"])),
        ("closed", timestamp(s["closed_at"])),
        ("heartbeat", f"{duration(s['heartbeat_age'])} ago" if s["heartbeat_age"] else None),
        ("metadata", json.dumps(s["metadata"]) if s["metadata"] else None),
        ("requires", json.dumps(s["requires"]) if s.get("requires") else None),
        ("constraints", json.dumps(s["constraints"]) if s.get("constraints") else None),
        ("prefer", json.dumps(s["prefer"]) if s.get("prefer") else None),
        ("placement", s.get("placement")),
    ]
    width = max(len(k) for k, _ in info)
    parts = ["\n".join(f"{k:<{width}}  {EMPTY if v in (None, '') else v}" for k, v in info)]
    tasks = data["tasks"]
    parts.append(
        f"{plural(len(tasks), 'task')}\n"
        + (
            table(
                ["TASK", "NAME", "STATUS", "WORKER", "DISPATCHED", "STARTED", "FINISHED"],
                [
                    [
                        t["task_id"],
                        t["name"],
                        t["status"],
                        t["worker"],
                        timestamp(t["dispatched_at"]),
                        timestamp(t["started_at"]),
                        timestamp(t["finished_at"]),
                    ]
                    for t in tasks
                ],
            )
            if tasks
            else "no tasks"
        )
    )
    runs = data["history"]
    parts.append(
        f"history: {plural(len(runs), 'run')}\n"
        + (
            table(
                ["TASK", "NAME", "STATE", "WORKER", "STARTED", "RUNTIME", "ERROR"],
                [
                    [
                        r["task_id"],
                        r["name"],
                        r["state"],
                        r["worker"],
                        timestamp(r["started_at"]),
                        duration(r["runtime"]),
                        r["error"],
                    ]
                    for r in runs
                ],
            )
            if runs
            else "no runs"
        )
    )
    keys = data["state"]
    with_values = any("value" in k for k in keys)
    headers = ["KEY", "SCOPE", "SIZE", "VERSION"] + (["VALUE"] if with_values else [])
    parts.append(
        f"state: {plural(len(keys), 'key')}\n"
        + (
            table(
                headers,
                [
                    [k["key"], k["scope"], _size(k["size"]), k["version"]]
                    + ([json.dumps(k.get("value"))] if with_values else [])
                    for k in keys
                ],
            )
            if keys
            else "no keys"
        )
    )
    return "\n\n".join(parts)


def render_ended(results: list[dict[str, Any]]) -> str:
    shown = {
        "ended": "ended",
        "already_ended": "had ended",
        "not_open": "not open yet",
        "not_found": "not found",
    }
    return table(
        ["SESSION", "RESULT", "STATE", "REASON", "WORKER"],
        [
            [r["session_id"], shown[r["outcome"]], r["state"], r["reason"], r["hostname"]]
            for r in results
        ],
    )


def render_workers(data: dict[str, Any]) -> str:
    rows = []
    for w in data["workers"]:
        store, live = w["store"] or {}, w["live"]
        if live is not None:
            admission = "paused" if live["admission_paused"] else "taking requests"
            free = live["free"]
        else:
            admission = f"error: {w['live_error']}" if w["live_error"] else "no answer"
            free = store.get("free")
        offers = live if live is not None else store  # the live view when there is one
        used = offers.get("used") or {}
        resources = ", ".join(
            f"{name} {used.get(name, 0)}/{cap}"
            for name, cap in (offers.get("resources") or {}).items()
        )
        labels = ",".join(f"{k}={v}" for k, v in (offers.get("labels") or {}).items())
        rows.append(
            [
                w["nodename"],
                store.get("status", "not in store"),
                duration(store.get("heartbeat_age")) if store else None,
                store.get("pid"),
                f"{store.get('cap', EMPTY)}/{EMPTY if live is None else live['cap']}",
                f"{store.get('open', EMPTY)}/{EMPTY if live is None else live['open']}",
                free,
                admission,
                resources or None,
                labels or None,
            ]
        )
    if not rows:
        text = "no workers match"
    else:
        text = table(
            [
                "WORKER",
                "STATUS",
                "HEARTBEAT",
                "PID",
                "CAP STORE/LIVE",
                "OPEN STORE/LIVE",
                "FREE",
                "ADMISSION",
                "RESOURCES USED/CAP",
                "LABELS",
            ],
            rows,
        )
    if not data["answered"]:
        text += (
            f"\nno worker answered `inspect sessions` within {data['timeout']} s "
            "(are they running, on this broker, with SessionFlow(app)?)"
        )
    return text


def render_prune(data: dict[str, Any]) -> str:
    when = f"ended before {timestamp(data['ended_before'])} ({duration(data['older_than'])} ago)"
    if not data["sessions"]:
        return f"no sessions {when}: nothing to prune"
    counts = (
        f"{plural(data['sessions'], 'session')} {when}, with {plural(data['tasks'], 'task')}, "
        f"{plural(data['runs'], 'run')} and {plural(data['state_keys'], 'state key')}"
    )
    if data["deleted"]:
        return f"deleted {counts}"
    return f"would delete {counts}\nrun again with --yes to delete them"


def render_db(data: dict[str, Any]) -> str:
    return f"session store at {data['url']} is at revision {data['revision'] or 'none'}"


__all__ = [
    "EMPTY",
    "duration",
    "plural",
    "render_db",
    "render_ended",
    "render_list",
    "render_prune",
    "render_show",
    "render_workers",
    "table",
    "timestamp",
]
