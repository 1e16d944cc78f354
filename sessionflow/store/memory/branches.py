"""Parallel branches in memory: snapshots, finished steps, and the merge in member order."""

from __future__ import annotations

from ...errors import StoreRefused
from ...merge import MISSING, check_value, copy_value
from ...records import BranchStart, Merger
from ._data import Group, MemoryBase, Op, copy_ops, make_entry


class BranchesMemory(MemoryBase):
    """Branch groups: a part of :class:`~sessionflow.store.memory.MemoryStore`."""

    def branch_view(self, group_id: str, member: int, seq: int) -> BranchStart | None:
        with self._lock:
            group = self._groups.get(group_id)
            if group is None or group.status != "open":
                return None
            earlier: list[Op] = []
            if seq:
                for (m, s), (status, ops) in sorted(group.steps.items()):
                    if m == member and s < seq and status == "done":
                        earlier.extend(copy_ops(ops or ()))
            if not group.snapshot_taken:
                group.snapshot, group.snapshot_taken = self._session_values(group.session_id), True
            return BranchStart(copy_value(group.snapshot), earlier)

    def branch_done(
        self, group_id: str, member: int, seq: int, ops: list[Op], merger: Merger
    ) -> Exception | None:
        with self._lock:
            group = self._group(group_id)
            if (member, seq) in group.steps:
                return None
            group.steps[(member, seq)] = ("done", copy_ops(ops))
            return self._count(group_id, group, 1, merger)

    def branch_failed(
        self, group_id: str, member: int, seq: int, member_len: int, merger: Merger
    ) -> Exception | None:
        with self._lock:
            group = self._group(group_id)
            dropped = 0
            for s in range(seq, max(member_len, seq + 1)):
                if (member, s) not in group.steps:
                    group.steps[(member, s)] = ("failed", None)
                    dropped += 1
            return self._count(group_id, group, dropped, merger) if dropped else None

    def _group(self, group_id: str) -> Group:
        group = self._groups.get(group_id)
        if group is None:
            raise StoreRefused(f"session store write refused: no branch group {group_id!r}")
        return group

    def _count(self, group_id: str, group: Group, n: int, merger: Merger) -> Exception | None:
        if group.status != "open":
            return None
        group.finished += n
        if group.finished < group.size:
            return None
        return self._merge(group, merger)

    def _merge(self, group: Group, merger: Merger) -> Exception | None:
        session = self._sessions[group.session_id]
        logs: dict[int, list[Op]] = {}
        for (member, _), (status, ops) in sorted(group.steps.items()):
            if status == "done":
                logs.setdefault(member, []).extend(copy_ops(ops or ()))
        ordered = [logs[k] for k in sorted(logs)]
        keys = {op[1] for log in ordered for op in log}
        rows = self._state.setdefault(("session", group.session_id), {})
        live = {}
        for key in sorted(keys):
            row = rows.get(key)
            if row is None:  # locked as a tombstone of version 0, as the SQL store does
                row = rows[key] = make_entry(MISSING, 0, 0)
            if not row.deleted:
                live[key] = copy_value(row.value)
        new = session.new
        try:
            merged = merger(
                live, copy_value(group.snapshot), ordered, new.merge_policy, new.reducers
            )
            sizes = {k: 0 if v is MISSING else check_value(k, v)[1] for k, v in merged.items()}
        except Exception as exc:  # conflict, unknown reducer, a reducer returned non-JSON
            group.status = "conflict"
            group.conflict = getattr(exc, "keys", None) or sorted(keys)
            group.merged_at = self._now()
            return exc
        for key, value in merged.items():
            self._put("session", group.session_id, key, value, sizes[key])
        group.status, group.merged_at = "merged", self._now()
        return None
