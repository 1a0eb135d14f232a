from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from core.db import get_engine, load_all_models, session_scope
from core.errors import ServiceUnavailable
from core.jobs import Job, JobReporter, claim_job, get_job, progress


def test_sqlite_runs_in_wal_mode(tmp_home: Path) -> None:
    with get_engine().connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar_one().lower() == "wal"


def test_job_round_trip_and_dedupe(tmp_home: Path) -> None:
    assert claim_job("train:x", kind="train", solution="industrial_qa")
    assert not claim_job("train:x", kind="train")  # already queued: no duplicate
    with JobReporter("train:x", min_interval=0.0) as rep:
        for _ in progress(range(4), desc="epochs", reporter=rep, disable=True):
            pass
        assert get_job("train:x").status == "running"
        assert get_job("train:x").progress == pytest.approx(1.0)
    assert get_job("train:x").status == "succeeded"
    assert claim_job("train:x", kind="train")  # finished jobs can be re-armed
    with session_scope() as s:
        assert len(list(s.scalars(select(Job)))) == 1


def test_failed_job_records_reason(tmp_home: Path) -> None:
    with pytest.raises(ValueError), JobReporter("train:bad"):
        raise ValueError("no images in train/good")
    job = get_job("train:bad")
    assert job.status == "failed" and "no images in train/good" in job.error


def test_migrations_match_the_orm(tmp_home: Path) -> None:
    """Alembic heads create exactly the tables and columns the ORM declares."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    metadata = load_all_models()
    with get_engine().connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        tables = set(inspect(conn).get_table_names())
    assert {"jobs", "users", "audit_events", "worker_heartbeats"} <= tables
    structural = [d for d in diffs if d[0] in ("add_table", "remove_table", "add_column", "remove_column")]
    assert structural == [], structural


def test_unreachable_database_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from core.db import check_database

    with pytest.raises(ServiceUnavailable, match=r"database unreachable at postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x"):
        check_database("postgresql+psycopg://u:secret@127.0.0.1:1/x")
