"""Loaders and CLI: real small samples, clear one-line errors for missing or malformed data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import DataError
from solutions.customer_service import data as D

REPO = Path(__file__).resolve().parents[3]


def test_loaders_read_real_data(shared_data: Path) -> None:
    root = shared_data / "customer_service"
    dev = D.load_sgd(root, "dev", limit=3)
    assert len(dev.dialogues) == 3 and dev.dialogues[0]["turns"][0]["speaker"] == "USER"
    assert "Alarm_1" in dev.schemas and "Alarm_1" not in D.sgd_train_services(root)  # unseen service
    b_dev, b_tr = D.load_banking77(root, "dev"), D.load_banking77(root, "train")
    assert not set(b_dev.texts) & set(b_tr.texts) - {""} or len(set(b_dev.texts) & set(b_tr.texts)) < 5
    assert 900 < len(b_dev.texts) < 1100 and len(b_dev.label_names) == 77
    c = D.load_clinc150(root, "dev")
    assert c.labels.count(D.OOS) == 100 and len(c.texts) == 3100


def test_missing_and_malformed_data_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="SGD test folder not found"):
        D.load_sgd(tmp_path, "test")
    (tmp_path / "sgd" / "dev").mkdir(parents=True)
    (tmp_path / "sgd" / "dev" / "schema.json").write_text("[]")
    (tmp_path / "sgd" / "dev" / "dialogues.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        D.load_sgd(tmp_path, "dev")
    (tmp_path / "banking77").mkdir()
    (tmp_path / "banking77" / "test.csv").write_text("query,label\nhi,x\n")
    with pytest.raises(DataError, match="header 'text,category'"):
        D.load_banking77(tmp_path, "test")


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "VERTICALS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "core.cli", "customer-service", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_missing_data_is_one_line_exit_2(tmp_path: Path) -> None:
    r = _cli("evaluate", "--task", "intents", "--dataset", "banking77", "--data-root", str(tmp_path),
             "--split", "test", "--json", home=tmp_path / "home")
    assert r.returncode == 2, r.stderr
    assert "Banking77 folder not found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("evaluate", "--task", "dst", "--dataset", "banking77", "--data-root", str(tmp_path), "--json",
             home=tmp_path / "home")
    assert r.returncode == 2 and "takes --dataset sgd or multiwoz21" in r.stderr


def test_cli_discovery_on_a_real_sample(tmp_path: Path, shared_data: Path) -> None:
    """Discovery on 100 real DSTC11 insurance turns: last stdout line is the JSON with acc/nmi."""
    src = shared_data / "customer_service" / "dstc11" / "development" / "test-utterances.jsonl"
    lines = src.read_text().splitlines()[::9][:100]
    dst = tmp_path / "root" / "dstc11" / "development"
    dst.mkdir(parents=True)
    (dst / "test-utterances.jsonl").write_text("\n".join(lines) + "\n")
    r = _cli("evaluate", "--task", "discovery", "--dataset", "dstc11", "--data-root", str(tmp_path / "root"),
             "--split", "dev", "--json", home=tmp_path / "home")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.2 < out["acc"] <= 1.0 and 0.2 < out["nmi"] <= 1.0
    assert len(out["per_set"]["development"]["cluster_labels"]) >= 3
