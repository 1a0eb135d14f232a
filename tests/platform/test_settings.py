from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import DEFAULT_SECRET, Settings, get_settings, reset_settings


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for k in ("VERTICALS_HOME", "VERTICALS_DATABASE_URL", "VERTICALS_BROKER_URL", "VERTICALS_MODE",
              "VERTICALS_SECRET_KEY", "VERTICALS_SOLUTIONS", "VERTICALS_RESULT_BACKEND"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    reset_settings()
    yield
    reset_settings()


def test_embedded_defaults_live_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path / "h"))
    s = get_settings()
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'h' / 'verticals.db'}"
    assert s.effective_broker_url == "filesystem://" and s.embedded_broker
    assert s.effective_result_backend.startswith("db+sqlite:///")
    assert (tmp_path / "h" / "models").is_dir()


def test_precedence_kwargs_over_env_over_dotenv_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("VERTICALS_LOG_LEVEL=DEBUG\nVERTICALS_CONSOLE_BASE_PORT=9000\n")
    monkeypatch.setenv("VERTICALS_CONSOLE_BASE_PORT", "9100")
    s = Settings()
    assert s.log_level == "DEBUG"            # .env beats the default
    assert s.console_base_port == 9100       # env beats .env
    assert Settings(console_base_port=9200).console_base_port == 9200  # kwargs beat env
    assert Settings().task_time_limit == 3900  # default


def test_redis_broker_implies_redis_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_BROKER_URL", "redis://127.0.0.1:6379/3")
    s = Settings()
    assert not s.embedded_broker and s.effective_result_backend == "redis://127.0.0.1:6379/3"


def test_solutions_list_from_env_accepts_dashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_SOLUTIONS", "industrial-qa, medical_imaging")
    assert Settings().solutions == ["industrial_qa", "medical_imaging"]


def test_unknown_solution_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_SOLUTIONS", "crm")
    with pytest.raises(ConfigError, match=r"VERTICALS_SOLUTIONS: unknown solution\(s\) \['crm'\]"):
        get_settings()


def test_production_refuses_default_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTICALS_MODE", "production")
    with pytest.raises(ConfigError, match="VERTICALS_SECRET_KEY"):
        get_settings()
    monkeypatch.setenv("VERTICALS_SECRET_KEY", "x" * 32)
    assert get_settings().mode == "production"
    assert DEFAULT_SECRET != get_settings().secret_key


def test_env_example_lists_every_setting() -> None:
    example = (Path(__file__).resolve().parents[2] / "infra" / ".env.example").read_text()
    keys = {line.split("=", 1)[0] for line in example.splitlines() if line.startswith("VERTICALS_")}
    assert keys == {f"VERTICALS_{name.upper()}" for name in Settings.model_fields}
