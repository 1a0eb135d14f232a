"""Late fusion of the CNN heads with image statistics and the request text, and per-study pooling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MEDPIX

from solutions.medical_imaging.data import MODALITIES, REGIONS, load_image_array, load_medpix
from solutions.medical_imaging.fusion import Fusion, clinical_text, image_stats, pool_by_group


@pytest.fixture(scope="module")
def balanced_medpix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MedPix images, 30 CT + 30 MR from train and 15 + 15 from dev (the 48-image subset is all CT)."""
    if not MEDPIX.exists():
        pytest.skip("MedPix data not found beside the checkout")
    dst = tmp_path_factory.mktemp("medpix_balanced")
    (dst / "images").mkdir()
    for split, n in (("train", 30), ("dev", 15)):
        rows = [json.loads(line) for line in (MEDPIX / f"images_{split}.jsonl").open()]
        keep = [r for r in rows if r["Type"] == "CT"][:n] + [r for r in rows if r["Type"] == "MR"][:n]
        ids = {r["U_id"] for r in keep}
        cases = [line for line in (MEDPIX / f"cases_{split}.jsonl").open() if json.loads(line)["U_id"] in ids]
        (dst / f"images_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
        (dst / f"cases_{split}.jsonl").write_text("".join(cases))
        for r in keep:
            (dst / "images" / f"{r['image']}.png").symlink_to(MEDPIX / "images" / f"{r['image']}.png")
    return dst


def _fit(root: Path) -> tuple[Fusion, list, np.ndarray]:
    from solutions.medical_imaging.pipeline import request_text

    train = load_medpix(root, "train")
    imgs = np.stack([load_image_array(s.image_path, 128) for s in train])
    f = Fusion.fit(imgs, [request_text(s) for s in train], [s.plane for s in train],
                   np.array([MODALITIES.index(s.modality) for s in train]),
                   np.array([REGIONS.index(s.region) for s in train]), len(MODALITIES), len(REGIONS))
    dev = load_medpix(root, "dev")
    return f, dev, np.stack([load_image_array(s.image_path, 128) for s in dev])


def test_image_stats_shape_values_and_bad_input(balanced_medpix: Path) -> None:
    dev = load_medpix(balanced_medpix, "dev")
    ct = next(s for s in dev if s.modality == "CT")
    mr = next(s for s in dev if s.modality == "MR")
    a, b = (image_stats(load_image_array(s.image_path, 128)) for s in (ct, mr))
    assert a.shape == b.shape == (244,) and np.isfinite(a).all() and np.isfinite(b).all()
    assert np.abs(a[:32].sum() - 1) < 1e-4  # the 32-bin histogram is a distribution
    assert not np.allclose(a, b)
    black = image_stats(np.zeros((64, 64), dtype=np.float32))
    assert np.isfinite(black).all() and black[0] == pytest.approx(1.0)  # all pixels in the darkest bin
    with pytest.raises(ValueError, match="2-D"):
        image_stats(np.zeros((2, 64, 64), dtype=np.float32))


def test_clinical_text_reads_dicom_and_medpix_demographics_alike() -> None:
    assert clinical_text("headache", "F", "058Y", "axial") == clinical_text("headache", "female", "58", "axial")
    t = clinical_text("", "", "", "")
    assert "sex_x" in t and "age_x" in t and "plane_other" in t
    assert "age_0" in clinical_text("neonate", "M", "003M", "sagittal")


def test_pool_by_group_averages_within_a_study_only() -> None:
    s = np.array([[0.0, 1.0], [1.0, 0.0], [3.0, 3.0], [5.0, 1.0]])
    full = pool_by_group(s, ["a", "a", "b", None])
    np.testing.assert_allclose(full[:2], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(full[2:], s[2:])  # a study of one image, and an image with no study
    half = pool_by_group(s, ["a", "a", "b", ""], share=0.5)
    np.testing.assert_allclose(half[0], [0.25, 0.75])
    np.testing.assert_allclose(pool_by_group(s, None), s)


def test_fusion_side_models_learn_on_real_medpix_and_round_trip(balanced_medpix: Path, tmp_path: Path) -> None:
    from solutions.medical_imaging.pipeline import request_text

    f, dev, imgs = _fit(balanced_medpix)
    y = np.array([MODALITIES.index(s.modality) for s in dev])
    texts, planes = [request_text(s) for s in dev], [s.plane for s in dev]
    neutral = np.zeros((len(dev), len(MODALITIES)), dtype=np.float32)  # a CNN with no opinion
    fused = f.modality_scores(neutral, imgs, texts, planes)
    assert fused.shape == (len(dev), 2) and np.isfinite(fused).all()
    # the image statistics (with the request text) alone tell CT from MR on unseen cases
    assert (fused.argmax(1) == y).mean() >= 0.7
    # a confident CNN still decides when the side models are unsure: fusion adds, it does not replace
    strong = np.where(np.eye(2)[1 - y] > 0, 50.0, 0.0)
    assert (f.modality_scores(strong, imgs, texts, planes).argmax(1) == 1 - y).all()
    reg = f.region_scores(np.zeros((len(dev), len(REGIONS)), dtype=np.float32), texts)
    assert reg.shape == (len(dev), len(REGIONS)) and np.isfinite(reg).all()
    f.save(tmp_path)
    g = Fusion.load(tmp_path)
    assert g is not None
    np.testing.assert_allclose(g.modality_scores(neutral, imgs, texts, planes), fused)
    assert Fusion.load(tmp_path / "nothing") is None  # an older reporter: CNN heads alone
    with pytest.raises(ValueError, match="two modality"):
        Fusion.fit(imgs[:4], texts[:4], planes[:4], np.zeros(4, int), np.arange(4), 2, 5)


def test_draft_batch_gives_one_region_per_study(tiny_reporter: Path, balanced_medpix: Path) -> None:
    from solutions.medical_imaging.pipeline import Reporter, request_text

    rep = Reporter(tiny_reporter)
    f, dev, _ = _fit(balanced_medpix)
    rep.fusion = f  # the tiny reporter's train subset is all CT, so it was trained without fusion
    imgs = np.stack([load_image_array(s.image_path, rep.cfg.image_size) for s in dev[:6]])
    groups = ["s1", "s1", "s1", "s2", "s2", None]
    drafts = rep.draft_batch(imgs, [s.history for s in dev[:6]], [s.plane for s in dev[:6]],
                             requests=[request_text(s) for s in dev[:6]], groups=groups)
    assert len({d.region for d in drafts[:3]}) == 1 and len({d.region for d in drafts[3:5]}) == 1
    assert len({round(d.region_conf, 6) for d in drafts[:3]}) == 1
    with pytest.raises(ValueError, match="histories"):
        rep.draft_batch(imgs, ["x"], ["axial"] * 6)


def test_region_embedding_model_adds_to_the_scores_and_needs_its_embeddings(balanced_medpix: Path,
                                                                               tmp_path: Path) -> None:
    from solutions.medical_imaging.pipeline import CachedEmbedder, request_text

    emb = CachedEmbedder(None)  # MiniLM, the reporter's own text encoder
    train, dev = load_medpix(balanced_medpix, "train"), load_medpix(balanced_medpix, "dev")
    imgs = np.stack([load_image_array(s.image_path, 128) for s in train])
    texts = [request_text(s) for s in train]
    y_reg = np.array([REGIONS.index(s.region) for s in train])
    f = Fusion.fit(imgs, texts, [s.plane for s in train], np.array([MODALITIES.index(s.modality) for s in train]),
                   y_reg, len(MODALITIES), len(REGIONS), text_emb=emb(texts))
    assert f.emb_region is not None
    dev_texts = [request_text(s) for s in dev]
    dev_emb = emb(dev_texts)
    cnn = np.zeros((len(dev), len(REGIONS)), dtype=np.float32)
    f.weights["reg_emb"] = 0.0
    base = f.region_scores(cnn, dev_texts)  # weight 0: the embeddings are not needed
    f.weights["reg_emb"] = 1.0
    fused = f.region_scores(cnn, dev_texts, dev_emb)
    assert fused.shape == base.shape and np.isfinite(fused).all()
    p = np.zeros_like(base)
    p[:, f.emb_region.classes_] = f.emb_region.predict_proba(dev_emb)
    np.testing.assert_allclose(fused, base + np.log(p + 1e-6), rtol=1e-5, atol=1e-5)
    # the embedding model learnt the training regions (it reads what the request says about the body)
    assert (f.emb_region.predict(emb(texts)) == y_reg).mean() > np.bincount(y_reg).max() / len(y_reg)
    with pytest.raises(ValueError, match="MiniLM embedding"):
        f.region_scores(cnn, dev_texts)
    with pytest.raises(ValueError, match="embeddings differ"):
        Fusion.fit(imgs, texts, [s.plane for s in train], np.zeros(len(train), int), y_reg, 2, 5,
                   text_emb=emb(texts)[:3])
    f.save(tmp_path)
    g = Fusion.load(tmp_path)
    assert g is not None
    np.testing.assert_allclose(g.region_scores(cnn, dev_texts, dev_emb), fused)
    del g.__dict__["emb_region"]  # a fusion.pkl written before the embedding model existed
    np.testing.assert_allclose(g.region_scores(cnn, dev_texts), base)


def test_native_view_and_its_statistics(balanced_medpix: Path) -> None:
    from PIL import Image

    from solutions.medical_imaging.data import NATIVE_SIZE, load_native_array, to_model_input
    from solutions.medical_imaging.fusion import native_stats

    s = load_medpix(balanced_medpix, "dev")[0]
    with Image.open(s.image_path) as im:
        w, h = im.size
    full = load_native_array(s.image_path)
    assert max(full.shape) == NATIVE_SIZE and abs(full.shape[1] / full.shape[0] - w / h) < 0.02  # no padding
    assert full.dtype == np.float32 and 0 <= full.min() and full.max() <= 1
    f = native_stats(full)
    assert f.shape == (94,) and np.isfinite(f).all()
    assert f[2] == pytest.approx(full.shape[1] / full.shape[0])  # aspect ratio of the view itself
    wide = to_model_input(np.random.default_rng(0).normal(100, 20, (100, 300)), NATIVE_SIZE, canvas=False)
    assert wide.shape == (85, 256)
    assert native_stats(np.zeros((20, 30), np.float32))[3] == pytest.approx(1.0)  # all black
    with pytest.raises(ValueError, match="2-D"):
        native_stats(np.zeros((2, 8, 8), np.float32))


def test_modality_uses_the_native_model_only_with_the_full_views(balanced_medpix: Path, tmp_path: Path) -> None:
    from solutions.medical_imaging.data import load_native_array
    from solutions.medical_imaging.pipeline import request_text

    train, dev = load_medpix(balanced_medpix, "train"), load_medpix(balanced_medpix, "dev")
    imgs = np.stack([load_image_array(s.image_path, 128) for s in train])
    full = [load_native_array(s.image_path) for s in train]
    y = np.array([MODALITIES.index(s.modality) for s in train])
    f = Fusion.fit(imgs, [request_text(s) for s in train], [s.plane for s in train], y,
                   np.array([REGIONS.index(s.region) for s in train]), len(MODALITIES), len(REGIONS),
                   full_images=full)
    assert f.stats_native is not None
    d_imgs = np.stack([load_image_array(s.image_path, 128) for s in dev])
    d_full = [load_native_array(s.image_path) for s in dev]
    texts, planes = [request_text(s) for s in dev], [s.plane for s in dev]
    cnn = np.zeros((len(dev), len(MODALITIES)), dtype=np.float32)
    with_full, without = f.modality_scores(cnn, d_imgs, texts, planes, d_full), f.modality_scores(cnn, d_imgs, texts, planes)
    assert with_full.shape == without.shape and np.isfinite(with_full).all() and not np.allclose(with_full, without)
    y_dev = np.array([MODALITIES.index(s.modality) for s in dev])
    assert (with_full.argmax(1) == y_dev).mean() >= 0.7  # unseen cases, CNN with no opinion
    with pytest.raises(ValueError, match="full-resolution"):
        f.modality_scores(cnn, d_imgs, texts, planes, d_full[:2])
    f.save(tmp_path)
    g = Fusion.load(tmp_path)
    assert g is not None
    del g.__dict__["stats_native"]  # a fusion.pkl written before the native model existed: 128 px statistics
    np.testing.assert_allclose(g.modality_scores(cnn, d_imgs, texts, planes, d_full), without)


def test_anatomy_lexicon_counts_body_part_words_per_region() -> None:
    from solutions.medical_imaging.fusion import ANATOMY_LEXICON, anatomy_features

    f = anatomy_features(["Low back pain radiating to the leg", "headache and new seizures", "background noise",
                          "", "cough and hemoptysis", "RUQ pain, nausea", "painless hematuria"])
    assert f.shape == (7, len(REGIONS)) == (7, len(ANATOMY_LEXICON))
    assert f[0].argmax() == REGIONS.index("Spine and Muscles") and f[0, REGIONS.index("Head")] == 0
    assert f[1].argmax() == REGIONS.index("Head")
    assert not f[2].any() and not f[3].any()  # "background" is not "back"; an empty request has no words
    assert [int(r.argmax()) for r in f[4:]] == [REGIONS.index(r) for r in
                                                ("Thorax", "Abdomen", "Reproductive and Urinary System")]
    assert anatomy_features([]).shape == (0, len(REGIONS))


def test_region_lexicon_model_adds_to_the_scores_and_old_pickles_still_load(balanced_medpix: Path) -> None:
    from solutions.medical_imaging.fusion import anatomy_features
    from solutions.medical_imaging.pipeline import request_text

    f, dev, _ = _fit(balanced_medpix)
    assert f.lex_region is not None
    texts = [request_text(s) for s in dev]
    cnn = np.zeros((len(dev), len(REGIONS)), dtype=np.float32)
    f.weights["reg_lex"] = 0.0
    base = f.region_scores(cnn, texts)
    f.weights["reg_lex"] = 1.0
    fused = f.region_scores(cnn, texts)
    p = np.zeros_like(base)
    p[:, f.lex_region.classes_] = f.lex_region.predict_proba(anatomy_features(texts))
    np.testing.assert_allclose(fused, base + np.log(p + 1e-6), rtol=1e-5, atol=1e-5)
    del f.__dict__["lex_region"]  # a fusion.pkl written before the lexicon model existed
    np.testing.assert_allclose(f.region_scores(cnn, texts), base)
