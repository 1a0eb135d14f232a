"""One settings object for the whole product, read from ``VERTICALS_*`` environment variables.

Every setting has an embedded default that works on a laptop with no services (SQLite under
``VERTICALS_HOME``, a filesystem Celery broker, a SQLite result backend). Pointing the same commands
at PostgreSQL and Redis is configuration only::

    VERTICALS_DATABASE_URL=postgresql+psycopg://user:pw@db:5432/verticals
    VERTICALS_BROKER_URL=redis://redis:6379/0
    VERTICALS_RESULT_BACKEND=redis://redis:6379/1

Outside ``local`` mode the settings refuse a default secret key.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SECRET = "local-dev-secret-change-me"
SOLUTION_NAMES: tuple[str, ...] = ("industrial_qa", "customer_service", "medical_imaging")


def _default_data_root() -> Path:
    # ../shared/data beside the checkout (CI and developers have it there).
    return (REPO_ROOT.parent / "shared" / "data").resolve()


class Settings(BaseSettings):
    """Product settings. Precedence: explicit kwargs > environment > ``.env`` file > defaults."""

    model_config = SettingsConfigDict(env_prefix="VERTICALS_", env_file=".env", extra="ignore")

    mode: Literal["local", "production"] = "local"
    home: Path = Field(default_factory=lambda: Path.home() / ".verticals")
    data_root: Path = Field(default_factory=_default_data_root)

    database_url: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None

    secret_key: str = DEFAULT_SECRET
    session_ttl_minutes: int = 8 * 60

    solutions: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(SOLUTION_NAMES))
    console_host: str = "127.0.0.1"
    console_base_port: int = 8501
    metrics_base_port: int = 9101
    flower_port: int = 5555  # Flower (queue monitor) beside `verticals up` on Redis/RabbitMQ; 0 = off
    flower_basic_auth: str | None = None  # "user:password" for Flower; required outside local mode

    worker_concurrency: int = 1
    worker_threads: int = 0  # torch/OpenMP threads per task slot; 0 = auto (all cores for training, else 1)
    quant_threads: int = 0  # threads of the quantized/fp32 C kernels; 0 = torch's thread count
    task_soft_time_limit: int = 3600
    task_time_limit: int = 3900
    visibility_timeout: int = 4 * 3600
    max_upload_mb: int = 200
    log_level: str = "INFO"
    auto_train: bool = True

    # Per-solution knobs
    # Reply model of customer service: "verticals" (the core LM via ChatVerticals), "template" (KB
    # templates only) or "package.module:ClassName" (any LangChain chat model).
    cs_chat_model: str = "verticals"
    medical_imaging_threads: int = 1  # torch intra-op threads for reporter training/evaluation
    medical_imaging_ingest_workers: int = Field(1, ge=1)  # processes for parse + de-id + write during ingest
    medical_imaging_pseudonym_map: Path | None = None  # keep original->pseudonym map here (0600); unset: none kept

    @field_validator("home", "data_root", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("medical_imaging_pseudonym_map", "database_url", "broker_url", "result_backend", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("solutions", mode="before")
    @classmethod
    def _split_solutions(cls, v: object) -> object:
        if isinstance(v, str):
            v = [s.strip() for s in v.replace(";", ",").split(",") if s.strip()]
        if isinstance(v, list):
            v = [str(s).replace("-", "_") for s in v]
            unknown = sorted(set(v) - set(SOLUTION_NAMES))
            if unknown:
                raise ValueError(f"unknown solution(s) {unknown}; choose from {list(SOLUTION_NAMES)}")
        return v

    @model_validator(mode="after")
    def _refuse_unsafe_secrets(self) -> Settings:
        if self.mode != "local" and (self.secret_key == DEFAULT_SECRET or len(self.secret_key) < 16):
            raise ValueError(
                "VERTICALS_SECRET_KEY must be set to a random value of 16+ characters outside local mode"
            )
        return self

    # Derived locations -------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def files_dir(self) -> Path:
        """Uploaded and produced files (heatmaps, DICOM, exports)."""
        return self.home / "files"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'verticals.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def effective_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return f"db+sqlite:///{self.home / 'results.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

    def console_port(self, solution: str) -> int:
        return self.console_base_port + SOLUTION_NAMES.index(solution)

    def model_dir(self, *parts: str) -> Path:
        """``VERTICALS_HOME/models/<parts...>``; created on demand."""
        p = self.models_dir.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def ensure_dirs(self) -> None:
        for d in (self.home, self.models_dir, self.files_dir, self.broker_dir):
            d.mkdir(parents=True, exist_ok=True)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached). Raises ConfigError with one readable line when invalid."""
    try:
        s = Settings()
    except Exception as e:  # pydantic ValidationError -> one line a user can act on
        errs = getattr(e, "errors", None)
        if callable(errs):
            msgs = []
            for err in errs():
                loc = ".".join(str(x) for x in err.get("loc", ())) or "settings"
                name = f"VERTICALS_{loc.upper()}" if loc != "settings" else "settings"
                msgs.append(f"{name}: {err.get('msg', '')}".replace("Value error, ", ""))
            raise ConfigError("invalid settings: " + "; ".join(msgs)) from None
        raise ConfigError(f"invalid settings: {e}") from None
    s.ensure_dirs()
    return s


def reset_settings() -> None:
    """Forget the cached settings (tests and ``verticals up`` after changing the environment)."""
    get_settings.cache_clear()
