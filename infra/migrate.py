"""Alembic, driven from Python: ``verticals db upgrade`` and the tests call these.

Every area owns its revisions under ``infra/migrations/versions``: the core baseline is
``core_0001``; each solution's first revision has ``down_revision = "core_0001"`` and its own
``branch_labels``, so the tree has one head per area and ``upgrade("heads")`` applies them all.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from core.settings import get_settings

HERE = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().effective_database_url).replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(revision: str = "heads", url: str | None = None) -> None:
    from core.db import check_database

    check_database(url)
    command.upgrade(alembic_config(url), revision)


def current(url: str | None = None) -> list[str]:
    from alembic.runtime.migration import MigrationContext

    from core.db import get_engine

    with get_engine(url).connect() as conn:
        return sorted(MigrationContext.configure(conn).get_current_heads())
