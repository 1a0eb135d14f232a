"""Integration fixtures: a fresh PostgreSQL database per session and an isolated Redis DB.

``VERTICALS_TEST_PG_URL`` (an admin URL) and ``VERTICALS_TEST_REDIS_URL`` point at the services
(`.ci/run` starts them). When they are set but unreachable the tests fail; when unset and the local
defaults do not answer, the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN = os.environ.get("VERTICALS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("VERTICALS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REQUIRED = "VERTICALS_TEST_PG_URL" in os.environ


def _unavailable(msg: str) -> None:
    if REQUIRED:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"verticals_it_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        _unavailable(f"PostgreSQL not reachable at {PG_ADMIN}: {str(e).splitlines()[0]}")
    url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    yield url
    from core.db import reset_engines

    reset_engines()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_base() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_connect_timeout=3).ping()
    except Exception as e:
        _unavailable(f"Redis not reachable at {REDIS}: {e}")
    return REDIS.rstrip("/")


@pytest.fixture
def scale_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_url: str, redis_base: str) -> Iterator[dict[str, str]]:
    """Settings pointing at PostgreSQL + Redis (broker db 14, results db 13), schema migrated."""
    import redis

    broker, results = f"{redis_base}/14", f"{redis_base}/13"
    for url in (broker, results):
        redis.Redis.from_url(url).flushdb()
    env = {
        "VERTICALS_HOME": str(tmp_path / "home"),
        "VERTICALS_DATABASE_URL": pg_url,
        "VERTICALS_BROKER_URL": broker,
        "VERTICALS_RESULT_BACKEND": results,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from core.db import reset_engines
    from core.settings import reset_settings

    reset_settings()
    reset_engines()
    from infra.migrate import upgrade

    upgrade("heads")
    from core.queue import app, configure

    configure(app)
    yield dict(os.environ)
    reset_settings()
    reset_engines()
