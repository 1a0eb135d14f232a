"""Fixtures for customer_service tests: a tiny tracker trained on real SGD dialogues (one service,
a few dozen dialogues, cached for the session) and a helper that installs it into a tmp home."""

from __future__ import annotations

import functools
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "customer_service"
TINY_SERVICE = "Restaurants_1"


@functools.lru_cache(maxsize=1)
def _sgd_train() -> Any:
    from solutions.customer_service.data import load_sgd

    return load_sgd(SHARED, "train")


def sgd_train_split() -> Any:
    """SGD train (loaded once per test session, ~10 s). Skips when the shared SGD data is not on this
    machine: these tests train and track on real dialogues, not made-up ones."""
    if not SHARED.exists():
        pytest.skip(f"SGD data not found at {SHARED} (the shared customer_service datasets, see its README)")
    return _sgd_train()


def tiny_service_data(split: Any = None) -> tuple[list[dict], dict[str, dict]]:
    """The real SGD train dialogues of ``TINY_SERVICE`` alone and its schema (from ``split``, default
    :func:`sgd_train_split`)."""
    tr = split if split is not None else sgd_train_split()
    return [d for d in tr.dialogues if d["services"] == [TINY_SERVICE]], {TINY_SERVICE: tr.schemas[TINY_SERVICE]}


@pytest.fixture
def sgd_train() -> Any:
    return sgd_train_split()


@pytest.fixture(scope="session")
def tiny_tracker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tracker heads trained on 30 real SGD train dialogues of Restaurants_1 (about 40 s on 2 cores)."""
    pool, schemas = tiny_service_data()
    from solutions.customer_service.dst import TrackerConfig
    from solutions.customer_service.dst_train import train_tracker
    from solutions.customer_service.encoder import MiniLMEncoder

    out = tmp_path_factory.mktemp("cs_tracker")
    dialogues = random.Random(0).sample(pool, 30)
    enc = MiniLMEncoder(cache_dir=out / "cache")
    tracker = train_tracker(dialogues, schemas, enc, TrackerConfig(epochs=12))
    tracker.save(out / "dst-sgd")
    return out


@pytest.fixture
def tiny_home(tiny_tracker_dir: Path, tmp_home: Path) -> Path:
    """``tmp_home`` with the tiny tracker (and its embedding cache) installed as the default model."""
    dst = tmp_home / "models" / "customer_service"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_tracker_dir / "dst-sgd", dst / "dst-sgd", dirs_exist_ok=True)
    if (tiny_tracker_dir / "cache").is_dir():
        shutil.copytree(tiny_tracker_dir / "cache", dst / "cache", dirs_exist_ok=True)
    return tmp_home
