"""Placement rules (resources.py, placement.py) and the task limiter: pure logic, no worker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sessionflow import ConfigurationError, InvalidArgument
from sessionflow.celery_ext.throttle import TaskLimiter
from sessionflow.placement import (
    Needs,
    Offer,
    describe,
    explain_busy,
    explain_unplaceable,
    judge,
    meets,
    placed,
    rank,
)
from sessionflow.records import NewSession, utcnow
from sessionflow.resources import (
    WorkerSpec,
    constraints,
    placement,
    prefer,
    requires,
    task_limits,
    worker_labels,
    worker_resources,
)

# -- worker specs ------------------------------------------------------------------------


def test_worker_specs_parse_from_options_and_settings() -> None:
    assert worker_resources("gpu=2, browser=8", "--x") == {"gpu": 2, "browser": 8}
    assert worker_resources({"gpu": 0}, "s") == {"gpu": 0}
    assert worker_resources("", "--x") == {} and worker_resources(None, "s") == {}
    assert worker_labels("zone=eu,model=llama3", "--x") == {"zone": "eu", "model": "llama3"}
    assert worker_labels({"vram_gb": 24}, "s") == {"vram_gb": "24"}
    assert task_limits("proj.render=1,other.task=3", "--x") == {"proj.render": 1, "other.task": 3}


@pytest.mark.parametrize(
    ("parse", "value", "words"),
    [
        (worker_resources, "sessions=4", "--max-sessions"),
        (worker_resources, "gpu", "NAME=VALUE"),
        (worker_resources, "gpu=-1", "whole number"),
        (worker_resources, "gpu=two", "whole number"),
        (worker_resources, "1gpu=1", "not a valid name"),
        (worker_resources, {"gpu": True}, "whole number"),
        (worker_resources, ["gpu"], "or a dict"),
        (worker_labels, "zone=", "1 to 255"),
        (worker_labels, {"zone": None}, "must be a string"),
        (task_limits, "proj.render=0", "from 1"),
    ],
)
def test_bad_worker_specs_are_configuration_errors(parse: Any, value: Any, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as err:
        parse(value, "--the-option")
    assert "--the-option" in str(err.value)


def test_worker_options_replace_settings_one_by_one() -> None:
    config = SimpleNamespace(
        session_resources={"gpu": 1}, session_labels={"zone": "eu"}, session_task_limits={}
    )
    spec = WorkerSpec.read(config, "gpu=4", None, "a.b=2")
    assert spec == WorkerSpec({"gpu": 4}, {"zone": "eu"}, {"a.b": 2})


# -- what a session asks for ---------------------------------------------------------------


def test_requests_become_canonical() -> None:
    assert requires({"gpu": 1}) == {"gpu": 1} and requires({}) is None and requires(None) is None
    assert constraints({"zone": "eu", "vram": (">=", 24), "tier": ("in", ["a", "b"])}) == {
        "zone": ["==", "eu"],
        "vram": [">=", 24],
        "tier": ["in", ["a", "b"]],
    }
    assert prefer({"zone": "eu", "model": "llama3"}) == [
        [1, {"zone": ["==", "eu"]}],
        [1, {"model": ["==", "llama3"]}],
    ]
    assert prefer([(10, {"zone": "eu"}), (-5, {"spot": "yes"})]) == [
        [10, {"zone": ["==", "eu"]}],
        [-5, {"spot": ["==", "yes"]}],
    ]
    assert placement("pack") == "pack" and placement(None) is None


@pytest.mark.parametrize(
    ("check", "value", "words"),
    [
        (requires, {"sessions": 1}, "sessions"),
        (requires, {"gpu": 0}, "from 1"),
        (requires, {"gpu": 1.5}, "whole number"),
        (requires, ["gpu"], "dict"),
        (requires, {"": 1}, "not a valid name"),
        (constraints, {"zone": ("~=", "eu")}, "op one of"),
        (constraints, {"vram": (">=", "big")}, "finite number"),
        (constraints, {"zone": ("in", [])}, "non-empty list"),
        (constraints, {"zone": None}, "string or a finite number"),
        (constraints, {"zone": float("nan")}, "string or a finite number"),
        (prefer, [(0, {"zone": "eu"})], "non-zero"),
        (prefer, [(5000, {"zone": "eu"})], "from -1000"),
        (prefer, [(1, {})], "at least one"),
        (prefer, [("zone", "eu")], "weight"),
        (prefer, "zone=eu", "dict of label"),
        (placement, "random", "'spread' or 'pack'"),
    ],
)
def test_bad_requests_are_invalid_arguments(check: Any, value: Any, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check(value)


def test_placed_sessions_are_the_ones_that_ask() -> None:
    base = {"id": "s", "created_at": utcnow(), "creation_timeout": 1.0, "execution_timeout": 1.0}
    assert not placed(NewSession(**base))
    assert placed(NewSession(**base, placement="spread"))
    new = NewSession(**base, requires={"gpu": 1}, constraints={"zone": ["==", "eu"]})
    assert placed(new) and placed(new.to_message())
    assert NewSession.from_message(new.to_message()) == new
    forged = {**new.to_message(), "constraints": {"zone": ["~=", "eu"]}}
    with pytest.raises(ValueError, match="op one of"):
        NewSession.from_message(forged)


# -- matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "condition", "expected"),
    [
        ("eu", ["==", "eu"], True),
        ("us", ["==", "eu"], False),
        ("12", ["==", 12], True),
        ("12.0", ["==", 12], True),
        ("twelve", ["==", 12], False),
        ("us", ["!=", "eu"], True),
        (None, ["!=", "eu"], True),
        (None, ["==", "eu"], False),
        ("24", [">=", 24], True),
        ("16", [">=", 24], False),
        ("48", [">", 24], True),
        ("8", ["<", 24], True),
        ("24", ["<=", 24], True),
        ("lots", [">=", 1], False),
        ("inf", [">=", 1], False),
        (None, [">=", 1], False),
        ("b", ["in", ["a", "b"]], True),
        ("c", ["in", ["a", "b"]], False),
        ("c", ["not in", ["a", "b"]], True),
        (None, ["not in", ["a"]], True),
        (None, ["in", ["a"]], False),
    ],
)
def test_conditions(label: str | None, condition: list[Any], expected: bool) -> None:
    assert meets(label, condition) is expected


def offer(name: str, cap: dict[str, int], labels: dict[str, str], used: dict[str, int]) -> Offer:
    return Offer(name, cap, labels, used)


GPU = Needs(requires={"gpu": 1}, constraints={"zone": ["==", "eu"]})


def test_constraints_filter_then_room_decides() -> None:
    offers = [
        offer("w1", {"gpu": 0, "sessions": 4}, {"zone": "eu"}, {"sessions": 0}),
        offer("w2", {"gpu": 2, "sessions": 4}, {"zone": "us"}, {"sessions": 0}),
        offer("w3", {"gpu": 2, "sessions": 4}, {"zone": "eu"}, {"gpu": 2, "sessions": 2}),
        offer("w4", {"gpu": 1, "sessions": 1}, {"zone": "eu"}, {"sessions": 1}),
    ]
    verdict = rank(offers, GPU)
    assert [o.nodename for o in verdict.could] == ["w3", "w4"]
    assert verdict.fits == []  # both are full: wait, do not refuse
    assert judge(offers[0], GPU) == ("mismatch", "gpu: has 0, wants 1")
    assert judge(offers[1], GPU) == ("mismatch", "zone=us, wants zone=eu")
    assert judge(offers[2], GPU) == ("busy", "gpu (2 of 2 in use, wants 1)")
    assert judge(offers[3], GPU) == ("busy", "sessions (1 of 1 open, wants 1)")


def test_preference_ranks_before_load_and_load_before_name() -> None:
    a = offer("a", {"gpu": 4, "sessions": 10}, {"zone": "eu"}, {"gpu": 3, "sessions": 3})
    b = offer("b", {"gpu": 4, "sessions": 10}, {"zone": "us"}, {"sessions": 0})
    c = offer("c", {"gpu": 4, "sessions": 10}, {"zone": "us"}, {"gpu": 1, "sessions": 1})
    d = offer("d", {"gpu": 4, "sessions": 10}, {"zone": "us"}, {"sessions": 0})
    spread = Needs(requires={"gpu": 1})
    assert [o.nodename for o in rank([a, b, c, d], spread).fits] == ["b", "d", "c", "a"]
    pack = Needs(requires={"gpu": 1}, placement="pack")
    assert [o.nodename for o in rank([a, b, c, d], pack).fits] == ["a", "c", "b", "d"]
    liked = Needs(requires={"gpu": 1}, prefer=[[5, {"zone": ["==", "eu"]}]])
    assert rank([a, b, c, d], liked).fits[0].nodename == "a"
    avoided = Needs(requires={"gpu": 1}, prefer=[[-5, {"zone": ["==", "us"]}]])
    assert [o.nodename for o in rank([b, a, d], avoided).fits] == ["a", "b", "d"]


def test_load_is_the_dominant_share_including_sessions() -> None:
    # x: gpu half used, sessions nearly free; y: gpu free, sessions nearly full.
    x = offer("x", {"gpu": 2, "sessions": 100}, {}, {"gpu": 1, "sessions": 1})
    y = offer("y", {"gpu": 2, "sessions": 4}, {}, {"sessions": 3})
    assert [o.nodename for o in rank([x, y], Needs(requires={"gpu": 1})).fits] == ["x", "y"]


def test_explanations_name_what_is_missing_and_what_is_short() -> None:
    offers = [
        offer("w1", {"gpu": 0, "sessions": 4}, {"zone": "eu"}, {}),
        offer("w2", {"gpu": 2, "sessions": 4}, {"zone": "us"}, {}),
        offer("w3", {"sessions": 4}, {}, {}),
    ]
    text = explain_unplaceable(offers, GPU)
    assert text.startswith(
        "no live worker has gpu >= 1 with zone=eu; live workers: w1 (gpu=0, zone=eu), "
        "w2 (gpu=2, zone=us), w3 (gpu=0, zone unset)."
    )
    assert "--session-resources" in text
    assert "no worker is live" in explain_unplaceable([], GPU)
    assert describe(Needs(constraints={"vram": [">=", 24]})) == (
        "a free session slot with vram >= 24"
    )
    full = offer("w9", {"gpu": 1, "sessions": 4}, {"zone": "eu"}, {"gpu": 1, "sessions": 1})
    assert explain_busy([full], GPU, ["w8"]) == (
        "w9 short of gpu (1 of 1 in use, wants 1); w8 did not answer"
    )


# -- the task limiter --------------------------------------------------------------------------


class FakeQos:
    def __init__(self) -> None:
        self.value = 8

    def increment_eventually(self, n: int = 1) -> None:
        self.value += n

    def decrement_eventually(self, n: int = 1) -> None:
        self.value -= n


def test_limiter_holds_over_the_limit_and_releases_in_order() -> None:
    qos = FakeQos()
    limiter = TaskLimiter()
    limiter.configure({"render": 1}, lambda: qos)
    pooled: list[str] = []
    callbacks: dict[str, dict[str, Any]] = {}

    def process_task(req: Any) -> None:  # what the pool's apply_async does: follow, queue
        options: dict[str, Any] = {}
        limiter.follow(req.id, options)
        callbacks[req.id] = options
        pooled.append(req.id)

    reqs = [SimpleNamespace(id=f"t{i}", name="render") for i in range(3)]
    for req in reqs:
        limiter.submit(req, process_task)
    other = SimpleNamespace(id="o", name="other")
    limiter.submit(other, process_task)
    assert pooled == ["t0", "o"] and qos.value == 10  # two held, prefetch raised by two
    assert limiter.describe() == {"render": {"limit": 1, "running": 1, "waiting": 2}}
    callbacks["t0"]["callback"]((False, None))
    assert pooled == ["t0", "o", "t1"] and qos.value == 9
    callbacks["t1"]["error_callback"](RuntimeError("lost"))
    assert pooled == ["t0", "o", "t1", "t2"] and qos.value == 8
    callbacks["t2"]["callback"]((False, None))
    assert limiter.describe() == {"render": {"limit": 1, "running": 0, "waiting": 0}}


def test_limiter_frees_a_slot_a_request_never_used() -> None:
    limiter = TaskLimiter()
    limiter.configure({"render": 1}, lambda: None)
    limiter.submit(SimpleNamespace(id="revoked", name="render"), lambda req: None)
    assert limiter.describe()["render"]["running"] == 0  # it never reached the pool
