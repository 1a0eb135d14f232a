"""Few-shot refinement: unbiased held-out normals, CV choice against the unsupervised detector,
balanced threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DataError
from solutions.industrial_qa.calibration import balanced_threshold
from solutions.industrial_qa.data import load_batch, load_mask, load_mvtec


def test_holdout_outputs_score_the_held_out_normals_leave_one_out(tiny_detector) -> None:
    """The held-out normals come back with the calibrator's leave-one-out scores, which are higher
    than what plain scoring gives them (their own maps are in the statistics there)."""
    det = tiny_detector
    hold = load_batch([Path(p) for p in det.info["holdout_paths"]], det.config.features.image_size)
    loo = det.holdout_outputs(hold)
    np.testing.assert_allclose(loo.scores, det.info["holdout_scores"], rtol=1e-4, atol=1e-4)
    plain = det.score_arrays(hold)
    assert loo.maps.shape == plain.maps.shape and loo.feats.shape == plain.feats.shape
    assert loo.scores.mean() > plain.scores.mean()


def test_few_shot_falls_back_to_the_unsupervised_detector_when_cv_says_so(tiny_detector, tiny_mvtec: Path,
                                                                          tmp_path: Path) -> None:
    from solutions.industrial_qa.detector import AnomalyDetector
    from solutions.industrial_qa.fewshot import FewShotHead

    det = tiny_detector
    size = det.config.features.image_size
    ds = load_mvtec(tiny_mvtec)
    shots = [s for s in ds.test if s.label == 1]
    x = load_batch([s.path for s in shots], size)
    m = np.stack([load_mask(s, size) for s in shots])
    hold = load_batch([Path(p) for p in det.info["holdout_paths"]], size)
    head, calib = FewShotHead.fit(det, x, m, [s.defect_type for s in shots], hold, normals_are_holdout=True,
                                  threshold="balanced")
    cv = head.cv
    assert calib.probability(calib.threshold) == pytest.approx(0.5)      # balanced threshold keeps p = 0.5 there
    assert {"image_head_auroc", "image_unsup_auroc", "map_head_auroc", "map_unsup_auroc"} <= set(cv)
    assert 0.0 <= cv["image_gain_confidence"] <= 1.0
    assert head.image_mode == ("head" if cv["image_gain_confidence"] >= 0.95 else "unsup")
    if cv["map_head_auroc"] is not None:
        # a supervised map (the head's, or the fused one) only where it beats the unsupervised map on
        # both CV pixel AUROC and AUPRO; of those the higher pixel AUROC
        wins = [(cv[f"map_{m}_auroc"], m) for m in ("head", "fused")
                if cv[f"map_{m}_auroc"] > cv["map_unsup_auroc"] and cv[f"map_{m}_aupro"] > cv["map_unsup_aupro"]]
        assert head.map_mode == (max(wins)[1] if wins else "unsup")
        assert head.fuse_scale > 0
    # forced to the unsupervised image score, the refined detector ranks parts exactly as before
    plain = det.score_arrays(x)
    det.fewshot = head
    try:
        head.image_mode, head.map_mode = "unsup", "unsup"
        out = det.score_arrays(x)
        np.testing.assert_allclose(out.scores, plain.scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.maps, plain.maps, rtol=1e-5, atol=1e-5)
        head.map_mode = "head"          # supervised map, unsupervised image score
        np.testing.assert_allclose(det.score_arrays(x).scores, plain.scores, rtol=1e-5, atol=1e-5)
        head.map_mode = "fused"         # unsupervised map + the scaled patch logit; image score unchanged
        fused = det.score_arrays(x)
        np.testing.assert_allclose(fused.scores, plain.scores, rtol=1e-5, atol=1e-5)
        p = head._patch_logits(det, plain.feats, plain.knn, plain.seg, plain.coarse)
        want = det.upsample(det.fuse(plain.knn, plain.seg, plain.coarse) + head.fuse_scale * p, size)
        np.testing.assert_allclose(fused.maps, want.numpy(), rtol=1e-4, atol=1e-4)
        det.calibrator = calib
        back = AnomalyDetector.load(det.save(tmp_path / "f"))
        assert back.fewshot.map_mode == "fused" and back.fewshot.fuse_scale == pytest.approx(head.fuse_scale)
        np.testing.assert_allclose(back.score_arrays(x).maps, fused.maps, rtol=1e-4, atol=1e-4)
        head.image_mode, head.map_mode = "head", "head"
        det.save(tmp_path / "m")
        back = AnomalyDetector.load(tmp_path / "m")
        assert (back.fewshot.image_mode, back.fewshot.map_mode) == ("head", "head")
        assert back.fewshot.cv == head.cv
        np.testing.assert_allclose(back.score_arrays(x).scores, det.score_arrays(x).scores, rtol=1e-4, atol=1e-4)
    finally:
        det.fewshot = None
    with pytest.raises(DataError):
        FewShotHead.fit(det, x, m, [s.defect_type for s in shots], hold, threshold="youden-ish")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=30), st.lists(st.floats(-5, 5), min_size=2, max_size=30))
def test_balanced_threshold_maximises_balanced_accuracy(normal: list[float], defect: list[float]) -> None:
    n, d = np.array(normal), np.array(defect)
    t = balanced_threshold(n, d)

    def bal(thr: float) -> float:
        return ((n <= thr).mean() + (d > thr).mean()) / 2

    best = max(bal(c) for c in np.concatenate([n, d, [n.min() - 1]]))
    assert bal(t) == pytest.approx(best)


def test_balanced_threshold_separates_separable_scores_and_rejects_empty_input() -> None:
    t = balanced_threshold(np.array([0.1, 0.2, 0.3]), np.array([0.8, 0.9]))
    assert 0.3 <= t < 0.8
    with pytest.raises(DataError):
        balanced_threshold(np.array([]), np.array([1.0]))
