"""Parallel branches in SQL: snapshots, finished steps, and the merge in member order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from ...merge import MISSING, check_value
from ...records import BranchStart, Merger, utcnow
from .engine import Engines
from .models import branch_groups, branch_members, sessions
from .state import lock_rows, read_scope, write_row

G, M = branch_groups.c, branch_members.c
GROUP_OPEN, GROUP_MERGED, GROUP_CONFLICT = "open", "merged", "conflict"
STEP_DONE, STEP_FAILED = "done", "failed"
Op = tuple[str, str, Any]


def _insert_steps(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert the step rows that are not there yet (SQLite); returns how many were new."""
    inserted = 0
    for row in rows:
        stmt = sqlite_insert(branch_members).values(**row).on_conflict_do_nothing()
        inserted += len(conn.execute(stmt.returning(M.seq)).all())
    return inserted


def _finish_steps(
    conn: Connection, group_id: str, rows: list[dict[str, Any]], merger: Merger
) -> Exception | None:
    """Insert the step rows not there yet and count them finished; the step that
    completes the group merges it. On PostgreSQL one statement does both (the insert
    as a data-modifying CTE of the count's UPDATE): a group member ends in one round
    trip, not two."""
    if conn.dialect.name != "postgresql":
        new = _insert_steps(conn, rows)
        return _count(conn, group_id, new, merger) if new else None
    inserted = (
        pg_insert(branch_members).values(rows).on_conflict_do_nothing().returning(M.seq).cte("new")
    )
    added = select(func.count()).select_from(inserted).scalar_subquery()
    return _count(conn, group_id, added, merger, added > 0)


class BranchesSQL:
    """Branch groups and their steps: a part of :class:`~sessionflow.store.sql.SQLStore`."""

    engines: Engines

    def branch_view(self, group_id: str, member: int, seq: int) -> BranchStart | None:
        with self.engines.read() as conn:
            row = conn.execute(
                select(G.snapshot_taken, G.snapshot, G.status).where(G.id == group_id)
            ).first()
            if row is None or row.status != GROUP_OPEN:
                return None
            earlier: list[Op] = []
            if seq:
                for ops in conn.execute(
                    select(M.ops)
                    .where(
                        M.group_id == group_id,
                        M.member == member,
                        M.seq < seq,
                        M.status == STEP_DONE,
                    )
                    .order_by(M.seq)
                ).scalars():
                    earlier.extend(tuple(op) for op in ops or ())
        snapshot = row.snapshot if row.snapshot_taken else self._take_snapshot(group_id)
        return BranchStart(dict(snapshot or {}), earlier)

    def _take_snapshot(self, group_id: str) -> dict[str, Any]:
        with self.engines.write() as conn:
            row = conn.execute(
                select(G.session_id, G.snapshot_taken, G.snapshot)
                .where(G.id == group_id)
                .with_for_update()
            ).one()
            if row.snapshot_taken:
                return dict(row.snapshot or {})
            snapshot = {k: v for k, (v, _) in read_scope(conn, "session", row.session_id).items()}
            conn.execute(
                update(branch_groups)
                .where(G.id == group_id, G.snapshot_taken.is_(False))
                .values(snapshot=snapshot, snapshot_taken=True)
            )
            return snapshot

    def branch_done(
        self, group_id: str, member: int, seq: int, ops: list[Op], merger: Merger
    ) -> Exception | None:
        row = {
            "group_id": group_id,
            "member": member,
            "seq": seq,
            "status": STEP_DONE,
            "ops": [list(op) for op in ops],
        }
        with self.engines.write() as conn:
            return _finish_steps(conn, group_id, [row], merger)

    def branch_failed(
        self, group_id: str, member: int, seq: int, member_len: int, merger: Merger
    ) -> Exception | None:
        rows = [
            {"group_id": group_id, "member": member, "seq": s, "status": STEP_FAILED, "ops": None}
            for s in range(seq, max(member_len, seq + 1))
        ]
        with self.engines.write() as conn:
            return _finish_steps(conn, group_id, rows, merger)


def _count(
    conn: Connection, group_id: str, n: Any, merger: Merger, *where: Any
) -> Exception | None:
    """Count ``n`` more steps of an open group finished (a number, or on PostgreSQL the
    count of the CTE that inserted them); the step that completes it merges it."""
    row = conn.execute(
        update(branch_groups)
        .where(G.id == group_id, G.status == GROUP_OPEN, *where)
        .values(finished=G.finished + n)
        .returning(G.finished, G.size)
    ).first()
    if row is None or row.finished < row.size:
        return None
    return _merge(conn, group_id, merger)


def _merge(conn: Connection, group_id: str, merger: Merger) -> Exception | None:
    group = conn.execute(
        select(G.session_id, G.snapshot, sessions.c.merge_policy, sessions.c.reducers)
        .select_from(branch_groups.join(sessions, sessions.c.id == G.session_id))
        .where(G.id == group_id)
    ).one()
    logs: dict[int, list[Op]] = {}
    for member, ops in conn.execute(
        select(M.member, M.ops)
        .where(M.group_id == group_id, M.status == STEP_DONE)
        .order_by(M.member, M.seq)
    ):
        logs.setdefault(member, []).extend(tuple(op) for op in ops or ())
    ordered = [logs[k] for k in sorted(logs)]
    keys = {op[1] for log in ordered for op in log}
    live = {
        k: v
        for k, v in lock_rows(conn, "session", group.session_id, keys).items()
        if v is not MISSING
    }
    try:
        merged = merger(live, group.snapshot or {}, ordered, group.merge_policy, group.reducers)
        sizes = {k: 0 if v is MISSING else check_value(k, v)[1] for k, v in merged.items()}
    except Exception as exc:  # conflict, unknown reducer, a reducer returned non-JSON
        conn.execute(
            update(branch_groups)
            .where(G.id == group_id)
            .values(
                status=GROUP_CONFLICT,
                conflict=getattr(exc, "keys", None) or sorted(keys),
                merged_at=utcnow(),
            )
        )
        return exc
    for key, value in merged.items():
        write_row(conn, "session", group.session_id, key, value, sizes[key])
    conn.execute(
        update(branch_groups)
        .where(G.id == group_id)
        .values(status=GROUP_MERGED, merged_at=utcnow())
    )
    return None
