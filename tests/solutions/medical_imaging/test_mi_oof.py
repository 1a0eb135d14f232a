"""The case-disjoint out-of-fold harness on TRAIN (solutions/medical_imaging/oof.py)."""

from __future__ import annotations

import numpy as np
import pytest
from test_mi_fusion import balanced_medpix  # noqa: F401 - module fixture reused

from solutions.medical_imaging import oof
from solutions.medical_imaging.data import (
    MODALITIES,
    REGIONS,
    load_image_array,
    load_medpix,
    load_native_array,
)
from solutions.medical_imaging.fusion import Fusion, pool_by_group


def test_case_folds_keep_every_case_in_one_fold() -> None:
    cases = [f"c{i // 3}" for i in range(60)] + ["solo"]  # 20 cases of 3 images and one of 1
    f = oof.case_folds(cases, 5, seed=0)
    assert f.shape == (61,) and set(f.tolist()) == set(range(5))
    for c in set(cases):
        assert len({int(x) for x, cc in zip(f, cases, strict=True) if cc == c}) == 1
    per_fold = [len({c for x, c in zip(f, cases, strict=True) if x == k}) for k in range(5)]
    assert max(per_fold) - min(per_fold) <= 1  # cases dealt round-robin
    np.testing.assert_array_equal(f, oof.case_folds(cases, 5, seed=0))
    assert not np.array_equal(f, oof.case_folds(cases, 5, seed=1))
    with pytest.raises(ValueError, match="k must"):
        oof.case_folds(cases, 1)
    with pytest.raises(ValueError, match="cannot fill"):
        oof.case_folds(["a", "b"], 3)


def _emb(texts: list[str]) -> np.ndarray:
    """A fixed pseudo-embedding per text (the formula check needs no MiniLM): 384-d, one seed per text."""
    import zlib

    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=384) for t in texts]).astype(np.float32)


def test_harness_scores_are_the_shipped_fusion_formula(balanced_medpix) -> None:  # noqa: F811
    from solutions.medical_imaging.pipeline import request_text

    emb = _emb
    train, dev = load_medpix(balanced_medpix, "train"), load_medpix(balanced_medpix, "dev")
    req = [request_text(s) for s in train]
    f = Fusion.fit(np.stack([load_image_array(s.image_path, 128) for s in train]), req, [s.plane for s in train],
                   np.array([MODALITIES.index(s.modality) for s in train]),
                   np.array([REGIONS.index(s.region) for s in train]), len(MODALITIES), len(REGIONS),
                   text_emb=emb(req), full_images=[load_native_array(s.image_path) for s in train])
    imgs = np.stack([load_image_array(s.image_path, 128) for s in dev])
    full = [load_native_array(s.image_path) for s in dev]
    dreq, planes = [request_text(s) for s in dev], [s.plane for s in dev]
    rng = np.random.default_rng(0)
    d = {"cnn_modality": rng.normal(size=(len(dev), 2)), "cnn_region": rng.normal(size=(len(dev), 5)),
         "case_id": np.array([s.case_id for s in dev]), "modality": np.array([MODALITIES.index(s.modality) for s in dev]),
         "region": np.array([REGIONS.index(s.region) for s in dev])}
    d |= {f"p_{k}": v for k, v in oof.member_probs(f, imgs, dreq, planes, emb(dreq), full).items()}
    mod, reg = oof.fused_scores(d, pool=False)
    np.testing.assert_allclose(mod, f.modality_scores(d["cnn_modality"], imgs, dreq, planes, full), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reg, f.region_scores(d["cnn_region"], dreq, emb(dreq)), rtol=1e-6, atol=1e-6)
    pm, pr = oof.fused_scores(d)
    np.testing.assert_allclose(pr, pool_by_group(reg, d["case_id"]))
    s = oof.score(d)
    assert s["n_images"] == len(dev) and s["region"] == pytest.approx(float((pr.argmax(1) == d["region"]).mean()))
    # a member weight of 0 removes it; a CNN weight of 0 leaves the side models alone
    no_text, _ = oof.fused_scores(d, weights={"mod_text": 0.0}, pool=False)
    np.testing.assert_allclose(no_text, mod - np.log(d["p_mod_text"] + 1e-6), rtol=1e-6, atol=1e-6)
    _, side = oof.fused_scores(d, cnn_weight=0.0, pool=False)
    assert not np.allclose(side, reg)
    assert oof.confusion(np.array([0, 1, 1]), np.array([0, 0, 1]), 2) == [[1, 1], [0, 1]]
