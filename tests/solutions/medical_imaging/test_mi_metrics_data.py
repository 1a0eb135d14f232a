"""Metrics and the MedPix loader on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import DataError
from solutions.medical_imaging import metrics
from solutions.medical_imaging.data import REGIONS, load_medpix


def test_text_metrics_rank_a_close_hypothesis_above_a_wrong_one() -> None:
    refs = ["Axial CT shows a large mass in the left upper lobe with collapse."] * 2
    good = ["Axial CT shows a large mass in the left upper lobe."] * 2
    bad = ["Sagittal MR of the knee is unremarkable."] * 2
    assert metrics.bleu4(refs, refs) == pytest.approx(1.0)
    for fn in (metrics.bleu4, metrics.rouge_l, metrics.chrf):
        assert fn(good, refs) > fn(bad, refs)


def test_recall_at_k_and_accuracy() -> None:
    sim = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    assert metrics.recall_at_k(sim, [{0}, {1}], k=1) == 0.5
    assert metrics.recall_at_k(sim, [{0}, {1}], k=2) == 1.0
    assert metrics.accuracy(["CT", "MR"], ["CT", "CT"]) == 0.5
    with pytest.raises(DataError):
        metrics.accuracy([], [])


def test_medpix_loader(medpix_subset: Path) -> None:
    train = load_medpix(medpix_subset, "train")
    assert len(train) == 48 and all(s.region in REGIONS and s.modality in ("CT", "MR") for s in train)
    assert all(s.image_path.exists() and s.caption for s in train)


def test_medpix_loader_errors(tmp_path: Path, medpix_subset: Path) -> None:
    with pytest.raises(DataError, match="no such data folder"):
        load_medpix(tmp_path / "nope", "dev")
    with pytest.raises(DataError, match="missing"):
        load_medpix(medpix_subset, "test")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "images_dev.jsonl").write_text("{not json\n")
    (bad / "cases_dev.jsonl").write_text(json.dumps({"U_id": "x"}) + "\n")
    with pytest.raises(DataError, match="malformed JSON"):
        load_medpix(bad, "dev")
