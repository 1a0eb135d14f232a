"""Platform tasks: health check (touches the DB and reports which worker ran it)."""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import func, select, text

from core.db import session_scope
from core.jobs import Job
from core.queue import app


@app.task(name="platform.health", bind=True)
def health(self: Any, note: str = "") -> dict[str, Any]:
    """Round-trip the database from inside a worker and report where it ran."""
    with session_scope() as s:
        one = s.execute(text("SELECT 1")).scalar_one()
        n_jobs = s.scalar(select(func.count()).select_from(Job))
        dialect = s.get_bind().dialect.name
    return {
        "ok": one == 1,
        "db": dialect,
        "jobs": int(n_jobs or 0),
        "worker": self.request.hostname,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "threads": int(os.environ.get("OMP_NUM_THREADS") or 0),
        "note": note,
    }


@app.task(name="platform.chaos_job", bind=True)
def chaos_job(self: Any, run_id: str, key: str, work_s: float = 0.0) -> bool:
    """A unit of work for fault tests: record the attempt, work, complete idempotently."""
    import time

    from core.reliability import record_attempt, record_result

    record_attempt(run_id, key, self.request.hostname or "", os.getpid())
    if work_s:
        time.sleep(work_s)
    return record_result(run_id, key, self.request.hostname or "")


@app.task(name="core.train_default_lm")
def train_default_lm(job_key: str) -> dict[str, Any]:
    """Train the shared default core LM in the background (solutions list it as a default model)."""
    from core.jobs import JobReporter
    from core.model.default import TrainConfig, ensure_default_lm

    total = TrainConfig().steps
    with JobReporter(job_key, kind="train", solution="core") as rep:
        path = ensure_default_lm(
            progress=True,
            step_callback=lambda step, loss: rep.update(step / max(total, 1), f"core LM step {step}/{total} loss {loss:.3f}"),
        )
    return {"path": str(path)}
