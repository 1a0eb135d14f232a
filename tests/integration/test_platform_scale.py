"""The same platform against real PostgreSQL and Redis: configuration only."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import inspect, select

pytestmark = pytest.mark.integration


def test_postgres_round_trip_and_schema(scale_env: dict[str, str]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from core.db import get_engine, load_all_models, session_scope
    from core.jobs import Job, JobReporter, claim_job, get_job

    assert get_engine().dialect.name == "postgresql"
    assert claim_job("train:pg", kind="train") and not claim_job("train:pg", kind="train")
    with JobReporter("train:pg", min_interval=0) as rep:
        rep.update(0.5, "half")
        assert get_job("train:pg").progress == 0.5
    with session_scope() as s:
        assert [j.status for j in s.scalars(select(Job))] == ["succeeded"]
    with get_engine().connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), load_all_models())
        assert "jobs" in inspect(conn).get_table_names()
    assert [d for d in diffs if d[0] in ("add_table", "remove_table", "add_column", "remove_column")] == []


def test_worker_on_redis_runs_platform_task_against_postgres(scale_env: dict[str, str], tmp_path) -> None:
    from helpers import start_worker, stop_worker, wait_for_worker

    from core.queue import app

    p = start_worker(["platform"], scale_env, name="it-platform", log_path=tmp_path / "w.log")
    try:
        wait_for_worker("it-platform")
        out = app.send_task("platform.health", kwargs={"note": "redis"}).get(timeout=60, interval=0.05)
    finally:
        stop_worker(p)
    assert out["ok"] and out["db"] == "postgresql" and out["note"] == "redis" and out["pid"] != os.getpid()
