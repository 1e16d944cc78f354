"""Parallel branches: isolated copies of the session state, merged in member order.

The members of a group or chord header sent through ``Session.apply_async`` are
branches. At dispatch (in the same statement that registers the tasks) each such
group gets a row with its size; a group sent right away also gets a snapshot of
the session's own keys, a group that starts later (after a chain step, or as a
chord body) snapshots when its first task starts. Every task of a branch carries
``sessionflow_branch = [group id, member, step, member length]`` in its headers,
so tasks outside branches never look for one.

In a branch task, plain keys read ``snapshot + operations of the earlier steps of
the same member + its own``, and writes only append to its operation log. When the
body returns (before its result is stored) the step saves its log and counts
itself finished; the step that completes the group merges every member's log in
member order into the live state in that same transaction. So the merged state is
visible before the group result is ready and before a chord body starts, and the
outcome never depends on finishing order.

A step that fails counts as finished with its writes discarded, and so do the
later steps of its member, which will not run. With ``merge="raise"`` a conflict
fails the task that found it with :class:`StateConflict` and nothing is merged.
Only the outermost group of a canvas forms branches; ``user:`` and ``app:`` keys
are shared beyond the session and are written straight through.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from celery import Signature, states
from celery.canvas import _chain, _chord, group

from . import canvas
from .canvas import BRANCH_HEADER
from .merge import Reducer, merge_branches, replay, resolve_reducers
from .middleware import Middleware
from .records import GroupSpec
from .runtime import TaskRun
from .state import _EXTRA_KEY, BranchView, State

if TYPE_CHECKING:
    from .store import SessionStore

logger = logging.getLogger("sessionflow.state")
_VIEW_KEY = "sessionflow.branch"


# -- dispatch --------------------------------------------------------------------------


def find_groups(sig: Signature, immediate: bool = True) -> Iterator[tuple[list[list[str]], bool]]:
    """Each outermost group/chord header of a frozen canvas: member task ids, sent at once?"""
    if isinstance(sig, _chain):
        for index, step in enumerate(canvas._steps(sig)):
            yield from find_groups(step, immediate and index == 0)
    elif isinstance(sig, (_chord, group)):
        members = [[leaf.id for leaf in canvas.leaves(m)] for m in canvas._members(sig)]
        if members:
            yield members, immediate
        body = getattr(sig, "body", None)
        if body is not None:
            yield from find_groups(body, False)


def plan(sig: Signature) -> tuple[tuple[GroupSpec, ...], dict[str, list[Any]]]:
    """The branch groups of a frozen canvas and the branch header of each of their tasks."""
    specs: list[GroupSpec] = []
    headers: dict[str, list[Any]] = {}
    for members, immediate in find_groups(sig):
        group_id = str(uuid.uuid4())
        specs.append(GroupSpec(group_id, sum(len(ids) for ids in members), immediate))
        for member, ids in enumerate(members):
            for seq, task_id in enumerate(ids):
                headers[task_id] = [group_id, member, seq, len(ids)]
    return tuple(specs), headers


# -- in the worker ---------------------------------------------------------------------


def merger(registered: Mapping[str, Reducer]) -> Any:
    """The merge function the store runs when a group's last step finishes."""

    def merge(
        live: dict[str, Any],
        snapshot: dict[str, Any],
        logs: list[list[tuple[str, str, Any]]],
        policy: str,
        reducers: dict[str, str] | None,
    ) -> dict[str, Any]:
        return merge_branches(
            live,
            snapshot,
            logs,
            policy=policy,
            reducers=resolve_reducers(reducers, registered),
        )

    return merge


def _branch(run: TaskRun) -> list[Any] | None:
    value = (run.request or {}).get(BRANCH_HEADER)
    if isinstance(value, list) and len(value) == 4 and isinstance(value[0], str):
        return value
    return None


def start_member(flow: Any, store: SessionStore, run: TaskRun) -> None:
    """If ``run`` is a branch task, give it its private copy of the session state."""
    branch = _branch(run)
    if branch is None:
        return
    group_id, member, seq, _ = branch
    found = store.branch_view(group_id, member, seq)
    if found is None:
        return  # the group was merged already (a late retry): write through
    view = BranchView(group_id, replay(found.snapshot, found.earlier))
    run.extra[_VIEW_KEY] = view
    run.extra[_EXTRA_KEY] = State(flow, run.session_id, branch=view)


def finish_member(flow: Any, store: SessionStore, run: TaskRun) -> None:
    """Save a branch task's operations; the last step of the group merges them all.

    Raises the merge's error (a StateConflict, a missing or misbehaving reducer).
    """
    view: BranchView | None = run.extra.get(_VIEW_KEY)
    branch = _branch(run)
    if view is None or branch is None:
        return
    group_id, member, seq, _ = branch
    error = store.branch_done(group_id, member, seq, list(view.ops), merger(flow.reducers))
    run.extra[_VIEW_KEY] = None  # saved: a failure after this point must not discard it
    if error is not None:
        raise error


def fail_member(flow: Any, store: SessionStore, run: TaskRun, state: str) -> None:
    """A branch task ended without saving: discard it and the later steps of its member."""
    if state == states.RETRY or run.extra.get(_VIEW_KEY) is None:
        return
    branch = _branch(run)
    if branch is None:
        return
    group_id, member, seq, member_len = branch
    error = store.branch_failed(group_id, member, seq, member_len, merger(flow.reducers))
    if error is not None:
        logger.error("branches of group %s were not merged: %s", group_id, error)


class BranchMiddleware(Middleware):
    """Gives branch tasks their private state and merges branches when they end."""

    def __init__(self, flow: Any) -> None:
        self.flow = flow

    def before_body(self, run: TaskRun) -> None:
        start_member(self.flow, self.flow.store, run)

    def after_body(self, run: TaskRun, retval: Any) -> None:
        finish_member(self.flow, self.flow.store, run)

    def after_task(self, run: TaskRun, state: str) -> None:
        fail_member(self.flow, self.flow.store, run, state)
