"""One ``Session.state`` shared by threads (or asyncio tasks): each compare-and-set uses
the version its own thread or task read, so a read-modify-write never overwrites
another thread's write (review: B's ``set`` used A's version and lost A's update)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from store_contract.helpers import opened

from sessionflow import StateConflict
from sessionflow.config import Config
from sessionflow.session import Session
from sessionflow.state import State
from sessionflow.store import SessionStore
from sessionflow.store.memory import MemoryStore
from sessionflow.store.sql import SQLStore

Step = Callable[[State], Any]


@pytest.fixture(params=["sqlite", "memory"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[State]:
    """The cached ``Session.state`` of an open session, as a web app's shared handle has."""
    store: SessionStore
    if request.param == "sqlite":
        config = Config(database_url=f"sqlite:///{tmp_path / 'store.db'}")
        store = SQLStore(config)
        store.upgrade()
    else:
        config, store = Config(), MemoryStore()
    flow = SimpleNamespace(store=store, config=config)
    session = Session(flow, opened(store))  # type: ignore[arg-type]
    assert session.state is session.state
    yield session.state
    store.dispose()


def in_two_threads(
    shared: State, first: list[Step], second: list[Step]
) -> tuple[list[Any], list[Any]]:
    """Run the steps of two threads on ``shared`` in lockstep: step i of ``first``, then
    step i of ``second``.

    Each step's return value (or the exception it raised) is collected per thread.
    """
    rounds = max(len(first), len(second))
    turns = [threading.Event() for _ in range(2 * rounds + 1)]
    outcomes: tuple[list[Any], list[Any]] = ([], [])

    def run(steps: list[Step], me: int) -> None:
        for i in range(rounds):
            if not turns[2 * i + me].wait(10):
                return  # the other thread is stuck; the caller's join reports it
            if i < len(steps):
                try:
                    outcomes[me].append(steps[i](shared))
                except Exception as exc:
                    outcomes[me].append(exc)
            turns[2 * i + me + 1].set()

    threads = [
        threading.Thread(target=run, args=(steps, me)) for me, steps in enumerate((first, second))
    ]
    for thread in threads:
        thread.start()
    turns[0].set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a thread is stuck"
    assert [len(out) for out in outcomes] == [len(first), len(second)], "a thread is stuck"
    return outcomes


def test_a_read_modify_write_never_overwrites_another_threads_write(state: State) -> None:
    state["n"] = 0
    a, b = in_two_threads(
        state,
        [lambda st: st.get("n"), lambda st: st.set("n", 1)],
        [
            lambda st: st.get("n"),
            lambda st: st.set("n", 1),  # B read before A wrote: a conflict, not an overwrite
            lambda st: st.set("n", st.get("n") + 1),  # B reads again and retries
        ],
    )
    assert a == [0, None]
    assert b[0] == 0 and isinstance(b[1], StateConflict) and b[1].keys == ["n"]
    assert b[2] is None
    assert state["n"] == 2


def test_a_delete_is_compare_and_set_per_thread(state: State) -> None:
    state["k"] = "v"
    _, b = in_two_threads(
        state,
        [lambda st: st.get("k"), lambda st: st.set("k", "a")],
        [lambda st: st.get("k"), lambda st: st.delete("k")],
    )
    assert b[0] == "v" and isinstance(b[1], StateConflict)
    assert state["k"] == "a"


def test_a_thread_that_never_read_a_key_writes_blindly(state: State) -> None:
    state["k"] = 0
    a, b = in_two_threads(
        state,
        [lambda st: st.get("k"), lambda st: st.set("k", "a")],
        [lambda st: None, lambda st: st.set("k", "b")],
    )
    assert a == [0, None]  # B wrote nothing between A's read and A's write
    assert b == [None, None]  # B never read k: its write is blind
    assert state["k"] == "b"


def test_each_asyncio_task_on_one_thread_uses_its_own_read_versions(state: State) -> None:
    state["n"] = 0

    async def main() -> list[Any]:
        both_read = [asyncio.Event(), asyncio.Event()]
        a_written = asyncio.Event()

        async def bump(me: int) -> Any:
            value = state.get("n")
            both_read[me].set()
            for event in both_read:
                await event.wait()
            if me == 1:
                await a_written.wait()
            try:
                state.set("n", value + 1)
                return "ok"
            except StateConflict as exc:
                return exc
            finally:
                a_written.set()

        return list(await asyncio.gather(bump(0), bump(1)))

    a, b = asyncio.run(main())
    assert a == "ok" and isinstance(b, StateConflict)
    assert state["n"] == 1
