"""Background jobs (model training, batch re-tracking, ...) and their progress, stored in the DB.

A long task reports progress through :class:`JobReporter` (or the ``tqdm`` wrapper
:func:`progress`), which writes at most once a second, so any console or ``verticals status`` can show
a progress bar for work running in another process. Jobs are keyed: submitting the same key while a
job with that key is queued or running does nothing (no duplicate training runs).

Data contract: ``jobs`` rows: key (unique), kind, solution, status, progress in [0, 1], message, error.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

from sqlalchemy import Float, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, session_scope, utcnow

JobStatus = Literal["queued", "running", "succeeded", "failed"]
ACTIVE: tuple[str, ...] = ("queued", "running")
T = TypeVar("T")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(64))
    solution: Mapped[str] = mapped_column(String(64), index=True, default="core")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    celery_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def claim_job(key: str, kind: str, solution: str = "core") -> bool:
    """Create (or re-arm a finished) job row for ``key``. False when one is already queued/running."""
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.key == key))
        if job is not None and job.status in ACTIVE:
            return False
        if job is None:
            s.add(Job(key=key, kind=kind, solution=solution, status="queued", message="queued"))
        else:
            job.status, job.progress, job.message, job.error = "queued", 0.0, "queued", None
    return True


def get_job(key: str) -> Job | None:
    with session_scope() as s:
        return s.scalar(select(Job).where(Job.key == key))


def list_jobs(solution: str | None = None, limit: int = 50) -> list[Job]:
    with session_scope() as s:
        q = select(Job).order_by(Job.updated_at.desc()).limit(limit)
        if solution:
            q = q.where(Job.solution == solution)
        return list(s.scalars(q))


class JobReporter:
    """Writes a job's progress to the DB, throttled to one write per ``min_interval`` seconds.

    Use as a context manager: status becomes ``running`` on enter, ``succeeded`` on a clean exit and
    ``failed`` (with the error text) on an exception, which is re-raised.
    """

    def __init__(self, key: str, kind: str = "job", solution: str = "core", min_interval: float = 1.0):
        self.key, self.kind, self.solution, self.min_interval = key, kind, solution, min_interval
        self._last = 0.0

    def _write(self, **fields: Any) -> None:
        with session_scope() as s:
            job = s.scalar(select(Job).where(Job.key == self.key))
            if job is None:
                job = Job(key=self.key, kind=self.kind, solution=self.solution)
                s.add(job)
            for k, v in fields.items():
                setattr(job, k, v)

    def __enter__(self) -> JobReporter:
        self._write(status="running", progress=0.0, message="starting", error=None)
        return self

    def update(self, progress: float, message: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        self._write(status="running", progress=float(min(max(progress, 0.0), 1.0)), message=message)

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        if exc is None:
            self._write(status="succeeded", progress=1.0, message="done")
        else:
            self._write(status="failed", error=f"{type(exc).__name__}: {exc}"[:4000], message="failed")


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    reporter: JobReporter | None = None,
    **tqdm_kwargs: Any,
) -> Iterator[T]:
    """``tqdm`` on stderr, mirrored into a job's DB progress when ``reporter`` is given."""
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = tqdm(iterable, total=total, desc=desc, **tqdm_kwargs)
    for i, item in enumerate(bar, 1):
        yield item
        if reporter is not None and total:
            postfix = getattr(bar, "postfix", None) or ""
            reporter.update(i / total, f"{desc} {i}/{total} {postfix}".strip())
