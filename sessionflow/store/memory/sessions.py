"""Sessions in memory: creation, admission, ends and moves."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from ...enums import SessionStatus
from ...records import NewSession, SessionRecord, check_utc
from ._data import ENDED, MemoryBase, SessionRow, is_moving, session_record, stored_copy


class SessionsMemory(MemoryBase):
    """Session rows: a part of :class:`~sessionflow.store.memory.MemoryStore`."""

    def create_pending(self, new: NewSession) -> bool:
        check_utc(new.created_at)
        with self._lock:
            if new.id in self._sessions:
                return False
            stored = stored_copy(new)
            self._sessions[new.id] = SessionRow(stored)
            return True

    def _still_new(self, session_id: str) -> bool:
        """No row, or a pending row that is not moving: a new session may take it."""
        row = self._sessions.get(session_id)
        return row is None or (row.status is SessionStatus.PENDING and not is_moving(row))

    def stale_pending(self) -> list[NewSession]:
        with self._lock:
            now = self._now()
            return [
                row.new
                for row in self._sessions.values()
                if row.status is SessionStatus.PENDING
                and not is_moving(row)
                and row.new.created_at + timedelta(seconds=row.new.creation_timeout) <= now
            ]

    def get_session(self, session_id: str, *, with_heartbeat: bool = False) -> SessionRecord | None:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None:
                return None
            beat = None
            if with_heartbeat and row.hostname is not None:
                worker = self._workers.get(row.hostname)
                beat = None if worker is None else worker.last_heartbeat_at
            return session_record(row, beat)

    def list_sessions(
        self,
        *,
        status: SessionStatus | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        hostname: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[SessionRecord]:
        for bound in (created_after, created_before):
            if bound is not None:
                check_utc(bound)
        with self._lock:
            found = []
            for row in self._sessions.values():
                moving = is_moving(row)
                if row.status is SessionStatus.PENDING and not moving:
                    continue
                if status is SessionStatus.OPEN:
                    if row.status is not SessionStatus.OPEN and not moving:
                        continue
                elif status is not None and row.status is not status:
                    continue
                new = row.new
                if any(
                    wanted is not None and have != wanted
                    for have, wanted in (
                        (new.user_id, user_id),
                        (new.agent_id, agent_id),
                        (row.hostname, hostname),
                    )
                ):
                    continue
                if created_after is not None and new.created_at < created_after:
                    continue
                if created_before is not None and new.created_at >= created_before:
                    continue
                found.append(row)
            found.sort(key=lambda r: (r.new.created_at, r.id), reverse=newest_first)
            if limit is not None:
                found = found[:limit]
            return [session_record(row) for row in found]

    def statuses(self, session_ids: Collection[str]) -> dict[str, tuple[SessionStatus, str | None]]:
        with self._lock:
            return {
                sid: (row.status, row.reason)
                for sid in sorted(set(session_ids))
                if (row := self._sessions.get(sid)) is not None
            }

    def open_new(self, new: NewSession, nodename: str, queue: str) -> SessionRecord | None:
        check_utc(new.created_at)
        with self._lock:
            if not self._still_new(new.id):
                return None
            stored = stored_copy(new)
            row = self._sessions[new.id] = SessionRow(stored)
            now = self._now()
            row.opened_at = now
            row.deadline_at = now + timedelta(seconds=new.execution_timeout)
            ttl = new.ttl
            row.expires_at = None if ttl is None else new.created_at + timedelta(seconds=ttl)
            row.status, row.reason = SessionStatus.OPEN, None
            row.hostname, row.queue, row.last_activity_at = nodename, queue, now
            return session_record(row)

    def abandon_new(self, new: NewSession, reason: str) -> bool:
        check_utc(new.created_at)
        with self._lock:
            if not self._still_new(new.id):
                return False
            stored = stored_copy(new)
            row = self._sessions[new.id] = SessionRow(stored)
            row.status, row.reason = SessionStatus.FAILED, reason
            row.closed_at = row.settled_at = self._now()
            return True

    def abandon_pending(
        self, session_id: str, reason: str, *, status: SessionStatus = SessionStatus.FAILED
    ) -> bool:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status is not SessionStatus.PENDING or is_moving(row):
                return False
            row.status, row.reason = SessionStatus(status), reason
            row.closed_at = row.settled_at = self._now()  # nothing of it ever ran
            return True

    def admit(self, session_id: str, nodename: str, queue: str) -> SessionRecord | None:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status is not SessionStatus.PENDING:
                return None
            if row.new.target_worker not in (None, nodename):
                return None
            now = self._now()
            if not is_moving(row):  # a moved session keeps its clocks
                new = row.new
                row.opened_at = now
                row.deadline_at = now + timedelta(seconds=new.execution_timeout)
                row.expires_at = (
                    None if new.ttl is None else new.created_at + timedelta(seconds=new.ttl)
                )
            row.status, row.reason = SessionStatus.OPEN, None
            row.hostname, row.queue, row.last_activity_at = nodename, queue, now
            return session_record(row)

    def end_session(
        self,
        session_id: str,
        status: SessionStatus,
        reason: str,
        *,
        from_states: Collection[SessionStatus] = (SessionStatus.OPEN,),
        hostname: str | None = None,
    ) -> bool:
        with self._lock:
            row = self._sessions.get(session_id)
            if row is None or row.status not in from_states:
                return False
            if hostname is not None and row.hostname != hostname:
                return False
            row.status, row.reason = SessionStatus(status), reason
            row.closed_at, row.settled_at = self._now(), None
            return True

    def unsettled(self, hostname: str | None = None) -> list[tuple[str, str | None]]:
        with self._lock:
            return [
                (row.id, row.hostname)
                for row in self._sessions.values()
                if row.status in ENDED
                and row.settled_at is None
                and (hostname is None or row.hostname == hostname)
            ]

    def stalled_moves(self) -> list[str]:
        with self._lock:
            now = self._now()
            return [
                row.id
                for row in self._sessions.values()
                if is_moving(row)
                and row.last_activity_at is not None
                and row.last_activity_at + timedelta(seconds=row.new.creation_timeout) <= now
            ]

    def moving(self) -> list[SessionRecord]:
        with self._lock:
            return [session_record(row) for row in self._sessions.values() if is_moving(row)]

    def open_sessions(self, nodename: str) -> list[SessionRecord]:
        with self._lock:
            return [
                session_record(row)
                for row in self._sessions.values()
                if row.hostname == nodename and row.status is SessionStatus.OPEN
            ]

    def open_ids(self, nodename: str) -> set[str]:
        return {record.id for record in self.open_sessions(nodename)}

    def session_user(self, session_id: str) -> str | None:
        with self._lock:
            row = self._sessions.get(session_id)
            return None if row is None else row.new.user_id
