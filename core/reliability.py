"""Delivery bookkeeping for fault tests and ``verticals chaos``.

The chaos job is a real platform task with the same delivery settings as every solution task
(late ack, reject on worker loss, retry with backoff on DB/broker errors). Each execution records an
*attempt* row; completion is an idempotent insert keyed by ``(run_id, key)``. So after a fault:

- ``completed`` = distinct keys with a result row; ``lost`` = submitted - completed;
- ``duplicated`` = result rows beyond one per key (what a user would see twice);
- ``redelivered`` = executions beyond one per key (at-least-once delivery at work).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String, UniqueConstraint, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, session_scope, utcnow


class ChaosAttempt(Base):
    __tablename__ = "chaos_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    key: Mapped[str] = mapped_column(String(64))
    worker: Mapped[str] = mapped_column(String(200), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ChaosResult(Base):
    __tablename__ = "chaos_results"
    __table_args__ = (UniqueConstraint("run_id", "key", name="uq_chaos_results_run_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    key: Mapped[str] = mapped_column(String(64))
    worker: Mapped[str] = mapped_column(String(200), default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def record_attempt(run_id: str, key: str, worker: str, pid: int) -> None:
    with session_scope() as s:
        s.add(ChaosAttempt(run_id=run_id, key=key, worker=worker, pid=pid))


def record_result(run_id: str, key: str, worker: str) -> bool:
    """Idempotent completion: True when this call created the row, False when it already existed."""
    try:
        with session_scope() as s:
            s.add(ChaosResult(run_id=run_id, key=key, worker=worker))
        return True
    except IntegrityError:
        return False


def count(run_id: str, submitted: int) -> dict[str, int]:
    with session_scope() as s:
        rows = s.scalar(select(func.count()).select_from(ChaosResult).where(ChaosResult.run_id == run_id)) or 0
        keys = s.scalar(select(func.count(func.distinct(ChaosResult.key))).where(ChaosResult.run_id == run_id)) or 0
        attempts = s.scalar(select(func.count()).select_from(ChaosAttempt).where(ChaosAttempt.run_id == run_id)) or 0
        attempted_keys = s.scalar(
            select(func.count(func.distinct(ChaosAttempt.key))).where(ChaosAttempt.run_id == run_id)) or 0
    return {
        "submitted": submitted,
        "completed": int(keys),
        "duplicated": int(rows - keys),
        "lost": int(submitted - keys),
        "redelivered": int(attempts - attempted_keys),
    }
