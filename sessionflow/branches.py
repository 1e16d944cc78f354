"""Parallel branches: isolated copies of the session state, merged in member order.

The members of a group or chord header sent through ``Session.apply_async`` are
branches. At dispatch every such group gets a row with its size and the task ids
of its members (a member that is a chain contributes its tasks in order). A group
sent right away snapshots the session's own keys at dispatch; a group that starts
later (after a chain step, or as a chord body) snapshots when its first task starts.

In a member task, plain keys read ``snapshot + operations of the earlier tasks of
the same member + its own`` and writes only append to its operation log. When the
body returns (before its result is stored) the task saves its log and bumps the
group's finished counter in one transaction; the task that brings it to the group
size merges every member's log in member order into the live state in that same
transaction. So the merged state is visible before the group result is ready and
before a chord body starts, and the outcome never depends on finishing order.

A member that fails (or a chain member's tasks that will not run after a failure)
counts as finished with its writes discarded, so the others still merge. When the
last task to finish is a failing one, its failure result is stored before the
merge runs (Celery stores failures before any hook sees them).
With ``merge="raise"`` a conflict fails the task that found it with
:class:`StateConflict` (listing every conflicting key) and nothing is merged; in a
chord the body then does not run.

Only the outermost group of a canvas forms branches: a group nested inside a
member is part of that member. ``user:`` and ``app:`` keys are shared beyond the
session and are written straight through from branches too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery import Signature, states
from celery.canvas import _chain, _chord, group
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from . import canvas
from .errors import SessionFlowError
from .merge import MISSING, Op, check_value, merge_branches, replay, resolve_reducers
from .models import branch_groups, branch_members, sessions
from .state import _EXTRA_KEY, SESSION, BranchView, State, lock_rows, read_scope, write_row
from .store import utcnow

if TYPE_CHECKING:
    from .flow import SessionFlow
    from .runtime import TaskRun

logger = logging.getLogger("sessionflow.state")

GROUP_OPEN, GROUP_MERGED, GROUP_CONFLICT = "open", "merged", "conflict"
MEMBER_PENDING, MEMBER_DONE, MEMBER_FAILED = "pending", "done", "failed"
_VIEW_KEY = "sessionflow.branch"


# -- dispatch -------------------------------------------------------------------------


def find_groups(sig: Signature, immediate: bool = True) -> Iterator[tuple[list[list[str]], bool]]:
    """Each outermost group/chord header of a frozen canvas: member task ids, sent at once?"""
    if isinstance(sig, _chain):
        frozen = getattr(sig, "_frozen", None)
        steps = list(reversed(frozen[0])) if frozen else list(sig.tasks)
        for index, step in enumerate(steps):
            yield from find_groups(step, immediate and index == 0)
    elif isinstance(sig, (_chord, group)):
        members = [[leaf.id for leaf in canvas.leaves(m)] for m in canvas._members(sig)]
        if members:
            yield members, immediate
        body = getattr(sig, "body", None)
        if body is not None:
            yield from find_groups(body, False)


def on_dispatch(flow: SessionFlow, session_id: str, sig: Signature) -> None:
    """Record the branch groups of a frozen canvas before it is sent."""
    found = list(find_groups(sig))
    if not found:
        return
    now = utcnow()
    with flow.store._write() as conn:
        snapshot: dict[str, Any] | None = None
        if any(immediate for _, immediate in found):
            snapshot = {k: v for k, (v, _) in read_scope(conn, SESSION, session_id).items()}
        for members, immediate in found:
            group_id = str(uuid.uuid4())
            conn.execute(
                insert(branch_groups).values(
                    id=group_id,
                    session_id=session_id,
                    size=sum(len(ids) for ids in members),
                    finished=0,
                    snapshot_taken=immediate,
                    snapshot=snapshot if immediate else {},
                    status=GROUP_OPEN,
                    created_at=now,
                )
            )
            rows = [
                {
                    "task_id": tid,
                    "group_id": group_id,
                    "member": index,
                    "seq": seq,
                    "status": MEMBER_PENDING,
                }
                for index, ids in enumerate(members)
                for seq, tid in enumerate(ids)
            ]
            conn.execute(insert(branch_members), rows)


# -- member tasks -----------------------------------------------------------------------


def start_member(flow: SessionFlow, run: TaskRun) -> None:
    """If ``run`` is a branch task, give it its private copy of the session state."""
    m, g = branch_members.c, branch_groups.c
    with flow.store._read() as conn:
        row = conn.execute(
            select(m.group_id, m.member, m.seq, g.snapshot_taken, g.snapshot)
            .select_from(branch_members.join(branch_groups, g.id == m.group_id))
            .where(m.task_id == run.task_id, g.status == GROUP_OPEN)
        ).first()
    if row is None:
        return
    snapshot = row.snapshot if row.snapshot_taken else _take_snapshot(flow, row.group_id)
    earlier: list[Op] = []
    if row.seq:
        with flow.store._read() as conn:
            for ops in conn.execute(
                select(m.ops)
                .where(
                    m.group_id == row.group_id,
                    m.member == row.member,
                    m.seq < row.seq,
                    m.status == MEMBER_DONE,
                )
                .order_by(m.seq)
            ).scalars():
                earlier.extend(tuple(op) for op in ops or ())
    view = BranchView(row.group_id, replay(snapshot or {}, earlier))
    run.extra[_VIEW_KEY] = view
    run.extra[_EXTRA_KEY] = State(flow, run.session_id, branch=view)


def _take_snapshot(flow: SessionFlow, group_id: str) -> dict[str, Any]:
    g = branch_groups.c
    with flow.store._write() as conn:
        row = conn.execute(
            select(g.session_id, g.snapshot_taken, g.snapshot)
            .where(g.id == group_id)
            .with_for_update()
        ).one()
        if row.snapshot_taken:
            return dict(row.snapshot or {})
        snapshot = {k: v for k, (v, _) in read_scope(conn, SESSION, row.session_id).items()}
        conn.execute(
            update(branch_groups)
            .where(g.id == group_id, g.snapshot_taken.is_(False))
            .values(snapshot=snapshot, snapshot_taken=True)
        )
        return snapshot


def finish_member(flow: SessionFlow, run: TaskRun) -> None:
    """Save a branch task's operations; the last task of the group merges them all.

    Raises StateConflict (after committing) when the merge found conflicts, or the
    ConfigurationError / StateValueError of a reducer that is missing or misbehaves.
    """
    view: BranchView | None = run.extra.get(_VIEW_KEY)
    if view is None:
        return
    m = branch_members.c
    conflict: SessionFlowError | None = None
    with flow.store._write() as conn:
        done = conn.execute(
            update(branch_members)
            .where(m.task_id == run.task_id, m.status == MEMBER_PENDING)
            .values(status=MEMBER_DONE, ops=[list(op) for op in view.ops])
        )
        if done.rowcount == 1:
            conflict = _count(flow, conn, view.group_id, 1)
    if conflict is not None:
        raise conflict


def fail_member(flow: SessionFlow, run: TaskRun, state: str) -> None:
    """A branch task ended without saving (failure): discard it and its later chain steps."""
    if state == states.RETRY or _VIEW_KEY not in run.extra:
        return
    m = branch_members.c
    with flow.store._write() as conn:
        me = conn.execute(
            select(m.group_id, m.member, m.seq).where(
                m.task_id == run.task_id, m.status == MEMBER_PENDING
            )
        ).first()
        if me is None:  # it saved its operations (or was counted) already
            return
        dropped = conn.execute(
            update(branch_members)
            .where(
                m.group_id == me.group_id,
                m.member == me.member,
                m.seq >= me.seq,
                m.status == MEMBER_PENDING,
            )
            .values(status=MEMBER_FAILED)
        ).rowcount
        if dropped:
            conflict = _count(flow, conn, me.group_id, dropped)
            if conflict is not None:
                logger.error("branches of group %s were not merged: %s", me.group_id, conflict)


def _count(flow: SessionFlow, conn: Connection, group_id: str, n: int) -> SessionFlowError | None:
    g = branch_groups.c
    row = conn.execute(
        update(branch_groups)
        .where(g.id == group_id, g.status == GROUP_OPEN)
        .values(finished=g.finished + n)
        .returning(g.finished, g.size)
    ).first()
    if row is None or row.finished < row.size:
        return None
    return _merge(flow, conn, group_id)


def _merge(flow: SessionFlow, conn: Connection, group_id: str) -> SessionFlowError | None:
    g, m = branch_groups.c, branch_members.c
    group_row = conn.execute(
        select(g.session_id, g.snapshot, sessions.c.merge_policy, sessions.c.reducers)
        .select_from(branch_groups.join(sessions, sessions.c.id == g.session_id))
        .where(g.id == group_id)
    ).one()
    logs: dict[int, list[Op]] = {}
    for member, ops in conn.execute(
        select(m.member, m.ops)
        .where(m.group_id == group_id, m.status == MEMBER_DONE)
        .order_by(m.member, m.seq)
    ):
        logs.setdefault(member, []).extend(tuple(op) for op in ops or ())
    ordered = [logs[k] for k in sorted(logs)]
    keys = {op[1] for log in ordered for op in log}
    session_id = group_row.session_id
    live = {k: v for k, v in lock_rows(conn, SESSION, session_id, keys).items() if v is not MISSING}
    try:
        merged = merge_branches(
            live,
            group_row.snapshot or {},
            ordered,
            policy=group_row.merge_policy,
            reducers=resolve_reducers(group_row.reducers, flow.reducers),
        )
        sizes = {k: 0 if v is MISSING else check_value(k, v)[1] for k, v in merged.items()}
    except SessionFlowError as exc:  # conflict, unknown reducer, reducer returned non-JSON
        conn.execute(
            update(branch_groups)
            .where(g.id == group_id)
            .values(
                status=GROUP_CONFLICT,
                conflict=getattr(exc, "keys", None) or sorted(keys),
                merged_at=utcnow(),
            )
        )
        return exc
    for key, value in merged.items():
        write_row(conn, SESSION, session_id, key, value, sizes[key])
    conn.execute(
        update(branch_groups)
        .where(g.id == group_id)
        .values(status=GROUP_MERGED, merged_at=utcnow())
    )
    return None
