"""Placement rules: who may take a session, in which order, and why not.

Pure functions over plain values, no I/O: the client ranks workers with them,
the worker judges a request with them before it admits it (the worker's answer
is the one that counts), and both explain a refusal with them.

- A condition is canonical ``[op, operand]`` (see :mod:`.resources`). A worker
  without the label meets only ``!=`` and ``not in`` (as Kubernetes' ``NotIn``);
  numeric operators read the label as a number (a label that is not one fails).
- Constraints filter; among the workers with room now, the preference score
  (sum of the weights of the preferences a worker meets) ranks first, then the
  load (the dominant share: the highest fraction in use of any resource the
  session takes, after placing it; ``spread``: lowest first, ``pack``: highest
  first), then the node name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import resources
from .resources import SESSIONS, SPREAD, Condition

# -- matching and ranking --------------------------------------------------------------


@dataclass(frozen=True)
class Needs:
    """What one session asks of its worker, canonical (as stored and sent)."""

    requires: dict[str, int] = field(default_factory=dict)
    constraints: dict[str, Condition] = field(default_factory=dict)
    prefer: list[list[Any]] = field(default_factory=list)
    placement: str = SPREAD

    @classmethod
    def of(cls, source: Any) -> Needs:
        """From anything with ``requires``/``constraints``/``prefer``/``placement``
        attributes (a NewSession, a SessionRecord) or keys (a request body)."""

        def get(name: str) -> Any:
            if isinstance(source, Mapping):
                return source.get(name)
            return getattr(source, name, None)

        return cls(
            dict(get("requires") or {}),
            dict(get("constraints") or {}),
            list(get("prefer") or []),
            get("placement") or SPREAD,
        )

    @classmethod
    def checked(cls, source: Any) -> Needs:
        """As :meth:`of`, validated (a request from the broker); InvalidArgument if bad."""
        raw = cls.of(source)
        return cls(
            resources.requires(raw.requires) or {},
            resources.constraints(raw.constraints) or {},
            resources.prefer(raw.prefer) or [],
            resources.placement(raw.placement) or SPREAD,
        )

    @property
    def amounts(self) -> dict[str, int]:
        return {**self.requires, SESSIONS: 1}

    def message(self) -> dict[str, Any]:
        return {"requires": self.requires, "constraints": self.constraints}


FIELDS = ("requires", "constraints", "prefer", "placement")


def placed(source: Any) -> bool:
    """Whether a session (NewSession, SessionRecord, or its message) asked for any
    placement option: such sessions are placed by ranking workers, the others go to
    the shared queue."""
    if isinstance(source, Mapping):
        return any(source.get(name) is not None for name in FIELDS)
    return any(getattr(source, name, None) is not None for name in FIELDS)


@dataclass(frozen=True)
class Offer:
    """One worker as placement sees it: capacities (``sessions`` included) and usage."""

    nodename: str
    capacity: dict[str, int]
    labels: dict[str, str]
    used: dict[str, int]

    def free(self, resource: str) -> int:
        return self.capacity.get(resource, 0) - self.used.get(resource, 0)


def meets(label: str | None, condition: Condition) -> bool:
    """Whether a worker's value of a label (None: it has none) meets a canonical condition."""
    op: str = condition[0]
    operand: Any = condition[1]
    if label is None:
        return op in ("!=", "not in")
    if op in ("in", "not in"):
        found = any(_equal(label, item) for item in operand)
        return found if op == "in" else not found
    if op in ("==", "!="):
        return _equal(label, operand) == (op == "==")
    number = _number(label)
    if number is None:
        return False
    bound = float(operand)
    return {
        ">=": number >= bound,
        ">": number > bound,
        "<=": number <= bound,
        "<": number < bound,
    }[op]


def _equal(label: str, operand: Any) -> bool:
    if isinstance(operand, str):
        return label == operand
    return _number(label) == float(operand)


def _number(label: str) -> float | None:
    try:
        value = float(label)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def mismatched(labels: Mapping[str, str], conditions: Mapping[str, Condition]) -> list[str]:
    """The labels whose condition a worker fails."""
    return [name for name, cond in conditions.items() if not meets(labels.get(name), cond)]


def lacking(offer: Offer, needs: Needs) -> list[str]:
    """Resources the worker does not declare enough of, even when idle."""
    return [r for r, n in needs.amounts.items() if offer.capacity.get(r, 0) < n]


def short(offer: Offer, needs: Needs) -> list[str]:
    """Resources with too little free right now."""
    return [r for r, n in needs.amounts.items() if offer.free(r) < n]


def score(labels: Mapping[str, str], prefer: Sequence[Sequence[Any]]) -> int:
    """Sum of the weights of the preferences whose every condition the labels meet."""
    return sum(weight for weight, terms in prefer if not mismatched(labels, terms))


def load(offer: Offer, needs: Needs) -> float:
    """The dominant share after placing: the highest fraction in use of any resource
    the session takes (``sessions`` included)."""
    return max(
        (offer.used.get(r, 0) + n) / offer.capacity[r]
        for r, n in needs.amounts.items()
        if offer.capacity.get(r, 0) > 0
    )


@dataclass(frozen=True)
class Verdict:
    could: list[Offer]  # meet the constraints and declare enough of everything
    fits: list[Offer]  # of those, the ones with room now, best first


def rank(offers: Sequence[Offer], needs: Needs) -> Verdict:
    """Constraints filter, then (among workers with room) preference score, then load
    (spread: least loaded first; pack: most loaded first), then node name."""
    could = [
        o for o in offers if not mismatched(o.labels, needs.constraints) and not lacking(o, needs)
    ]
    fits = [o for o in could if not short(o, needs)]
    sign = 1 if needs.placement == SPREAD else -1
    fits.sort(key=lambda o: (-score(o.labels, needs.prefer), sign * load(o, needs), o.nodename))
    return Verdict(could, fits)


def judge(offer: Offer, needs: Needs) -> tuple[str, str] | None:
    """The worker's own verdict: None (admit), ``("mismatch", why)`` or ``("busy", why)``."""
    bad = mismatched(offer.labels, needs.constraints)
    if bad:
        return "mismatch", ", ".join(
            f"{_label(offer.labels, n)}, wants {_show(n, needs.constraints[n])}" for n in bad
        )
    missing = lacking(offer, needs)
    if missing:
        return "mismatch", ", ".join(
            f"{r}: has {offer.capacity.get(r, 0)}, wants {needs.amounts[r]}" for r in missing
        )
    busy = short(offer, needs)
    if busy:
        return "busy", ", ".join(_in_use(offer, r, needs.amounts[r]) for r in busy)
    return None


# -- explanations -----------------------------------------------------------------------


def describe(needs: Needs) -> str:
    """``gpu >= 1 with zone=eu`` (what a request asks for, in words)."""
    wants = [f"{r} >= {n}" for r, n in needs.requires.items()] or ["a free session slot"]
    text = " and ".join(wants)
    if needs.constraints:
        text += " with " + ", ".join(_show(n, c) for n, c in needs.constraints.items())
    return text


def explain_unplaceable(offers: Sequence[Offer], needs: Needs, hint: str = "") -> str:
    shown = [_worker(o, needs) for o in offers[:10]]
    if len(offers) > 10:
        shown.append(f"and {len(offers) - 10} more")
    live = "; live workers: " + ", ".join(shown) if shown else "; no worker is live"
    return (
        f"no live worker has {describe(needs)}{live}. Start a worker with matching "
        "--session-resources/--session-labels, change them at run time (celery control "
        f"sessions_resources / sessions_labels), or ask for less{hint}"
    )


def explain_busy(offers: Sequence[Offer], needs: Needs, silent: Sequence[str] = ()) -> str:
    parts = [
        f"{o.nodename} short of "
        + ", ".join(_in_use(o, r, needs.amounts[r]) for r in short(o, needs))
        for o in offers[:10]
        if short(o, needs)
    ]
    parts += [f"{name} did not answer" for name in silent]
    return "; ".join(parts) or "every worker that could take it was busy"


def _in_use(offer: Offer, resource: str, wanted: int) -> str:
    used, cap = offer.used.get(resource, 0), offer.capacity.get(resource, 0)
    what = "open" if resource == SESSIONS else "in use"
    return f"{resource} ({used} of {cap} {what}, wants {wanted})"


def _worker(offer: Offer, needs: Needs) -> str:
    parts = [f"{r}={offer.capacity.get(r, 0)}" for r in needs.requires]
    parts += [_label(offer.labels, n) for n in needs.constraints]
    return f"{offer.nodename} ({', '.join(parts)})" if parts else offer.nodename


def _label(labels: Mapping[str, str], name: str) -> str:
    return f"{name}={labels[name]}" if name in labels else f"{name} unset"


def _show(name: str, condition: Condition) -> str:
    op, operand = condition
    if op in ("in", "not in"):
        return f"{name} {op} ({', '.join(str(v) for v in operand)})"
    return f"{name}={operand}" if op == "==" else f"{name} {op} {operand}"


__all__ = [
    "Needs",
    "Offer",
    "Verdict",
    "describe",
    "explain_busy",
    "explain_unplaceable",
    "judge",
    "load",
    "meets",
    "rank",
    "score",
]
