"""Worker liveness: every Celery worker writes a heartbeat row every few seconds.

This works the same on every broker (the embedded filesystem broker has no remote control channel),
so ``verticals status`` can say which workers are alive from the database alone.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading

from sqlalchemy import Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, session_scope, utcnow

HEARTBEAT_SECONDS = 5.0
ALIVE_AFTER_SECONDS = 30.0


class WorkerHeartbeat(Base):
    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[str] = mapped_column(String(500), default="")
    host: Mapped[str] = mapped_column(String(200), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    metrics_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)


def beat(name: str, queues: str, metrics_port: int | None = None) -> None:
    with session_scope() as s:
        row = s.get(WorkerHeartbeat, name)
        if row is None:
            s.add(WorkerHeartbeat(name=name, queues=queues, host=socket.gethostname(), pid=os.getpid(),
                                  metrics_port=metrics_port))
        else:
            row.last_seen, row.queues, row.pid, row.metrics_port = utcnow(), queues, os.getpid(), metrics_port


def start_heartbeat(name: str, queues: str, metrics_port: int | None = None) -> threading.Event:
    """Start a daemon thread that beats until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                beat(name, queues, metrics_port)
            except Exception:  # a DB hiccup must never take the worker down
                pass
            stop.wait(HEARTBEAT_SECONDS)

    threading.Thread(target=loop, name="verticals-heartbeat", daemon=True).start()
    return stop


def alive_workers() -> list[WorkerHeartbeat]:
    cutoff = utcnow() - dt.timedelta(seconds=ALIVE_AFTER_SECONDS)
    with session_scope() as s:
        rows = list(s.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.name)))
    out = []
    for r in rows:
        seen = r.last_seen if r.last_seen.tzinfo else r.last_seen.replace(tzinfo=dt.UTC)
        if seen >= cutoff:
            out.append(r)
    return out


def mark_stopped(name: str) -> None:
    with session_scope() as s:
        row = s.get(WorkerHeartbeat, name)
        if row is not None:
            s.delete(row)
