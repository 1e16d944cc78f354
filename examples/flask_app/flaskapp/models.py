from __future__ import annotations

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import db


class Report(db.Model):  # type: ignore[name-defined,misc]
    """A report built in a session: its steps run on one worker."""

    __tablename__ = "reports"

    QUEUED, RUNNING, DONE = "queued", "running", "done"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    session_id: Mapped[str] = mapped_column(String(64), default="")
    worker: Mapped[str] = mapped_column(String(255), default="")
    result: Mapped[str] = mapped_column(Text, default="")

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "result": self.result,
            "worker": self.worker,
        }
