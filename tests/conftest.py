from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "integration"))

from harness import SPECS, Stack, service_up

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _stack_params() -> list[object]:
    wanted = [n for n in os.environ.get("SF_STACKS", "").split(",") if n] or list(SPECS)
    params: list[object] = []
    for name in wanted:
        spec = SPECS[name]
        missing = [s for s in spec.services if not service_up(s)]
        if missing and not CI:
            reason = f"{', '.join(missing)} not running here (with CI=true this is an error)"
            params.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=reason)))
        else:
            params.append(pytest.param(name, id=name))
    return params


@pytest.fixture(scope="session", params=_stack_params())
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    spec = SPECS[request.param]
    missing = [s for s in spec.services if not service_up(s)]
    if missing:
        pytest.fail(f"CI=true but {', '.join(missing)} is not reachable on 127.0.0.1")
    stack = Stack(spec, tmp_path_factory.mktemp(spec.name))
    try:
        stack.setup()
        stack.start_worker("w1", wait=False)
        stack.start_worker("w2", wait=False)
        for worker in stack.workers.values():
            stack.wait_ready(worker)
        yield stack
    finally:
        stack.teardown()
    leaked = stack.leaked_secrets()
    assert not leaked, f"a secret appeared in the output of the {spec.name} stack: {leaked}"


@pytest.fixture
def flow(stack: Stack) -> Iterator[object]:
    """The stack's SessionFlow; open sessions are completed and workers revived afterwards."""
    yield stack.flow
    stack.close_open_sessions()
    for name, worker in list(stack.workers.items()):
        if not worker.alive() and name in ("w1", "w2"):
            stack.start_worker(name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) tests marked ``only_stacks`` for stacks they do not apply to."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("only_stacks")
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("stack") if callspec else None
        if marker is None or name is None:
            keep.append(item)
            continue
        spec = SPECS[name]
        wanted_brokers = marker.kwargs.get("brokers")
        wanted_stores = marker.kwargs.get("stores")
        if (wanted_brokers and spec.broker not in wanted_brokers) or (
            wanted_stores and spec.store not in wanted_stores
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
