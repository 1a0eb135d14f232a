"""Database plumbing: one typed SQLAlchemy 2.0 declarative base, engine and session factory.

SQLite (default, under ``VERTICALS_HOME``) runs in WAL mode with a busy timeout so several Celery
worker processes and the consoles can write concurrently; PostgreSQL is used at scale by setting
``VERTICALS_DATABASE_URL``. Schema changes go through Alembic (``verticals db upgrade``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
from collections.abc import Iterator
from typing import Any

from sqlalchemy import DateTime, MetaData, create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from core.errors import ServiceUnavailable
from core.settings import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of every table in the product (core and all solutions)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: DateTime(timezone=True)}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL + busy timeout, PostgreSQL a pre-pinged pool."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                               connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {})
    return engine


@functools.lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    return make_engine(url or get_settings().effective_database_url)


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A transactional scope: commit on success, roll back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


def check_database(url: str | None = None) -> None:
    """Raise ServiceUnavailable with one clear line when the database cannot be reached."""
    url = url or get_settings().effective_database_url
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise ServiceUnavailable(f"database unreachable at {_redact(url)}: {reason}") from None


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid url>"


def load_all_models() -> MetaData:
    """Import every ORM module (core and each solution present) so ``Base.metadata`` is complete."""
    import importlib
    import importlib.util

    from core.settings import SOLUTION_NAMES

    importlib.import_module("core.jobs")
    importlib.import_module("core.auth")
    importlib.import_module("core.workers")
    importlib.import_module("core.reliability")
    for name in SOLUTION_NAMES:
        mod = f"solutions.{name}.orm"
        if importlib.util.find_spec(f"solutions.{name}") and importlib.util.find_spec(mod):
            importlib.import_module(mod)
    return Base.metadata


def reset_engines() -> None:
    get_engine.cache_clear()
