"""Resources, labels and conditions: parsing and validation, before anything is written.

A worker offers **capacities** (``--session-resources "gpu=2,browser=8"``;
``sessions`` is its ``--max-sessions``) and **labels** (``--session-labels
"zone=eu"``); a session asks with ``requires``, ``constraints``, ``prefer`` and
``placement``. Bad worker specs raise :class:`ConfigurationError`, bad requests
:class:`InvalidArgument`; what passes is canonical (see :mod:`.placement`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import limits
from .errors import ConfigurationError, InvalidArgument

SESSIONS = "sessions"  # the implicit resource: one per open session, capacity --max-sessions
SPREAD, PACK = "spread", "pack"
PLACEMENTS = (SPREAD, PACK)
OPS = ("==", "!=", ">=", ">", "<=", "<", "in", "not in")
NUMERIC_OPS = (">=", ">", "<=", "<")
MAX_ENTRIES = 64  # resources, labels, conditions or preferences in one spec
MAX_WEIGHT = 1000
MAX_LABEL = 255
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]{0,62}$")
Condition = list[Any]  # canonical: [op, operand]


# -- what a worker offers ------------------------------------------------------------


def worker_resources(value: Any, source: str) -> dict[str, int]:
    """Capacities from ``"gpu=2,browser=8"`` or a dict; ConfigurationError naming ``source``."""
    pairs = _pairs(value, source)
    out: dict[str, int] = {}
    for name, amount in pairs.items():
        if name == SESSIONS:
            raise ConfigurationError(
                f"{source}: 'sessions' is the worker's --max-sessions "
                "(sessionflow_max_concurrent_sessions); set it there"
            )
        out[name] = _whole(amount, source, name, minimum=0)
    return out


def worker_labels(value: Any, source: str) -> dict[str, str]:
    """Labels from ``"zone=eu,model=llama3"`` or a dict of strings."""
    out: dict[str, str] = {}
    for name, text in _pairs(value, source).items():
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ConfigurationError(f"{source}: label {name!r} must be a string, got {text!r}")
        shown = str(text)
        if not shown or len(shown) > MAX_LABEL or "\x00" in shown:
            raise ConfigurationError(
                f"{source}: label {name!r} must be 1 to {MAX_LABEL} characters without NUL"
            )
        out[name] = shown
    return out


def task_limits(value: Any, source: str) -> dict[str, int]:
    """Per task name limits from ``"proj.render=1"`` or a dict (task names, >= 1)."""
    out: dict[str, int] = {}
    for name, amount in _pairs(value, source, names=r"^[^\s=,]{1,255}$").items():
        out[name] = _whole(amount, source, name, minimum=1)
    return out


def _pairs(value: Any, source: str, names: str = _NAME.pattern) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        found: dict[str, Any] = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            name, sep, amount = item.partition("=")
            if not sep:
                raise ConfigurationError(f"{source}: {item!r} is not NAME=VALUE")
            found[name.strip()] = amount.strip()
        value = found
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{source} must be 'name=value,...' or a dict, got {type(value).__name__}"
        )
    if len(value) > MAX_ENTRIES:
        raise ConfigurationError(f"{source}: at most {MAX_ENTRIES} entries")
    for name in value:
        if not isinstance(name, str) or not re.match(names, name):
            raise ConfigurationError(
                f"{source}: {name!r} is not a valid name (a letter or '_', then letters, "
                "digits, '_', '.', '-' or '/'; at most 63 characters)"
            )
    return dict(value)


def _whole(amount: Any, source: str, name: str, minimum: int) -> int:
    if isinstance(amount, str) and amount.strip().isdigit():
        amount = int(amount)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ConfigurationError(f"{source}: {name} must be a whole number, got {amount!r}")
    if not minimum <= amount <= limits.MAX_INT:
        raise ConfigurationError(
            f"{source}: {name} must be from {minimum} to {limits.MAX_INT}, got {amount}"
        )
    return amount


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker offers: its worker options, else the app's settings."""

    resources: dict[str, int]
    labels: dict[str, str]
    task_limits: dict[str, int]

    @classmethod
    def read(
        cls,
        config: Any,
        resource_option: str | None = None,
        label_option: str | None = None,
        limit_option: str | None = None,
    ) -> WorkerSpec:
        """``config``'s ``session_*`` settings, each replaced by its option when given."""
        found = cls(config.session_resources, config.session_labels, config.session_task_limits)
        if resource_option is not None:
            resources = worker_resources(resource_option, "--session-resources")
            found = replace(found, resources=resources)
        if label_option is not None:
            found = replace(found, labels=worker_labels(label_option, "--session-labels"))
        if limit_option is not None:
            found = replace(found, task_limits=task_limits(limit_option, "--session-task-limits"))
        return found


# -- what a session asks for ----------------------------------------------------------


def requires(value: Any) -> dict[str, int] | None:
    """``requires={"gpu": 1}``: amounts >= 1 of declared resources (not ``sessions``)."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        raise InvalidArgument(
            f"requires must be a dict of resource name -> amount, got {limits.shown(value)}"
        )
    for name, amount in value.items():
        _check_name("requires", name)
        if name == SESSIONS:
            raise InvalidArgument(
                "requires must not name 'sessions': every session takes one of its worker's "
                "--max-sessions slots already"
            )
        limits.whole(f"requires[{name!r}]", amount, minimum=1)
    return dict(value) or None


def constraints(value: Any, what: str = "constraints") -> dict[str, Condition] | None:
    """``{"zone": "eu", "vram_gb": (">=", 24)}`` as ``{label: [op, operand]}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        raise InvalidArgument(
            f"{what} must be a dict of label -> value or (op, operand), got {limits.shown(value)}"
        )
    out = {}
    for name, condition in value.items():
        _check_name(what, name)
        out[name] = _condition(f"{what}[{name!r}]", condition)
    return out or None


def prefer(value: Any) -> list[list[Any]] | None:
    """``{"zone": "eu"}`` (weight 1 per label) or ``[(weight, {label: condition}), ...]``.

    Canonical form: ``[[weight, {label: [op, operand]}], ...]``; weights are whole
    numbers from -1000 to 1000 (negative: avoid), not 0.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        terms = constraints(value, "prefer") or {}
        return [[1, {name: cond}] for name, cond in terms.items()] or None
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ENTRIES:
        raise InvalidArgument(
            "prefer must be a dict of label -> condition, or a list of (weight, {label: "
            f"condition}}) pairs, got {limits.shown(value)}"
        )
    out: list[list[Any]] = []
    for index, entry in enumerate(value):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise InvalidArgument(f"prefer[{index}] must be a (weight, {{label: condition}}) pair")
        weight, terms = entry
        if isinstance(weight, bool) or not isinstance(weight, int) or weight == 0:
            raise InvalidArgument(f"prefer[{index}]: the weight must be a non-zero whole number")
        if abs(weight) > MAX_WEIGHT:
            raise InvalidArgument(f"prefer[{index}]: weights go from -{MAX_WEIGHT} to {MAX_WEIGHT}")
        checked = constraints(terms, f"prefer[{index}]")
        if not checked:
            raise InvalidArgument(f"prefer[{index}] needs at least one label condition")
        out.append([weight, checked])
    return out or None


def placement(value: Any) -> str | None:
    if value is None or value in PLACEMENTS:
        return value  # type: ignore[no-any-return]
    raise InvalidArgument(f"placement must be 'spread' or 'pack', got {limits.shown(value)}")


def _check_name(what: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"{what}: {limits.shown(name)} is not a valid name (a letter or '_', then letters, "
            "digits, '_', '.', '-' or '/'; at most 63 characters)"
        )


def _condition(what: str, value: Any) -> Condition:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] not in OPS:
            raise InvalidArgument(f"{what} must be a value or (op, operand) with op one of {OPS}")
        op, operand = value
    else:
        op, operand = "==", value
    if op in ("in", "not in"):
        if not isinstance(operand, (list, tuple)) or not 0 < len(operand) <= MAX_ENTRIES:
            raise InvalidArgument(f"{what}: {op!r} needs a non-empty list of values")
        return [op, [_scalar(what, item, numeric=False) for item in operand]]
    return [op, _scalar(what, operand, numeric=op in NUMERIC_OPS)]


def _scalar(what: str, value: Any, numeric: bool) -> Any:
    if limits.finite(value) and abs(value) <= 2**53:  # exact as a float, comparable
        return value
    if isinstance(value, str) and not numeric:
        limits.text(what, value, max_len=MAX_LABEL)
        return value
    wanted = "a finite number (at most 2**53)" if numeric else "a string or a finite number"
    raise InvalidArgument(f"{what} must be {wanted}, got {limits.shown(value)}")


def spec_text(values: Mapping[str, Any]) -> str:
    """``gpu=2,browser=8``: a spec as the worker options take it (``-`` when empty)."""
    return ",".join(f"{k}={v}" for k, v in sorted(values.items())) or "-"
