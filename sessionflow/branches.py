"""Parallel branches: isolated copies of the session state, merged in member order.

The members of a group or chord header sent through ``Session.apply_async`` are
branches. At dispatch (in the same statement that registers the tasks) each such
group gets a row with its size; a group sent right away also gets a snapshot of
the session's own keys, a group that starts later (after a chain step, or as a
chord body) snapshots when one of its tasks first uses the session state. Every
task of a branch carries ``sessionflow_branch = [group id, member, step, member
length]`` in its headers, so tasks outside branches never look for one.

A branch task reads its view (the snapshot and its member's earlier steps) when
its body first touches ``state``, not before the body starts: a branch task that
never uses the state costs no store round trip on its way to its body.

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
from .errors import StoreRefused
from .merge import Reducer, merge_branches, replay, resolve_reducers
from .middleware import Middleware
from .records import GroupSpec
from .runtime import TaskRun
from .state import BranchView, State

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


_UNLOADED = BranchView("", {})  # a branch task started; its view is read on first use


def start_member(run: TaskRun) -> None:
    """Mark a branch task as started: its private view is read when it first uses the
    session state (:func:`member_state`), so nothing is read before its body."""
    if _branch(run) is not None and _VIEW_KEY not in run.extra:
        run.extra[_VIEW_KEY] = _UNLOADED


def member_state(flow: Any, run: TaskRun) -> State:
    """The State of a task: for a branch task, its private copy of the session state
    (read now: the snapshot, taken now if the group has none yet, and the operations
    of its member's earlier steps); write-through if the group was merged already."""
    branch = _branch(run)
    if branch is None or run.extra.get(_VIEW_KEY, _UNLOADED) is not _UNLOADED:
        return State(flow, run.session_id)
    group_id, member, seq, _ = branch
    found = flow.store.branch_view(group_id, member, seq)
    if found is None:  # the group was merged already (a late retry): write through
        run.extra[_VIEW_KEY] = None
        return State(flow, run.session_id)
    view = BranchView(group_id, replay(found.snapshot, found.earlier))
    run.extra[_VIEW_KEY] = view
    return State(flow, run.session_id, branch=view)


def finish_member(flow: Any, store: SessionStore, run: TaskRun) -> None:
    """Save a branch task's operations; the last step of the group merges them all.

    Raises the merge's error (a StateConflict, a missing or misbehaving reducer).
    """
    view: BranchView | None = run.extra.get(_VIEW_KEY)
    branch = _branch(run)
    if view is None or branch is None:
        return
    group_id, member, seq, _ = branch
    try:
        error = store.branch_done(group_id, member, seq, list(view.ops), merger(flow.reducers))
    except StoreRefused:
        if view is not _UNLOADED:
            raise
        error = None  # its group is gone (its session was pruned): nothing to save
    run.extra[_VIEW_KEY] = None  # saved: a failure after this point must not discard it
    if error is not None:
        raise error


def fail_member(flow: Any, store: SessionStore, run: TaskRun, state: str) -> None:
    """A branch task ended without saving: discard it and the later steps of its member."""
    view = run.extra.get(_VIEW_KEY)
    if state == states.RETRY or view is None:
        return
    branch = _branch(run)
    if branch is None:
        return
    group_id, member, seq, member_len = branch
    try:
        error = store.branch_failed(group_id, member, seq, member_len, merger(flow.reducers))
    except StoreRefused:
        if view is not _UNLOADED:
            raise
        return  # its group is gone (its session was pruned): nothing to discard
    if error is not None:
        logger.error("branches of group %s were not merged: %s", group_id, error)


class BranchMiddleware(Middleware):
    """Gives branch tasks their private state and merges branches when they end."""

    def __init__(self, flow: Any) -> None:
        self.flow = flow

    def before_body(self, run: TaskRun) -> None:
        start_member(run)

    def after_body(self, run: TaskRun, retval: Any) -> None:
        finish_member(self.flow, self.flow.store, run)

    def after_task(self, run: TaskRun, state: str) -> None:
        fail_member(self.flow, self.flow.store, run, state)
