"""The reporter's heads: DICOM Modality header over the image model, mirror test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from solutions.medical_imaging.data import load_image_array, load_medpix


def test_dicom_modality_header_overrides_the_image_head(tiny_reporter: Path, medpix_subset: Path) -> None:
    from solutions.medical_imaging.pipeline import Reporter

    rep = Reporter(tiny_reporter)
    s = load_medpix(medpix_subset, "dev")[0]
    img = load_image_array(s.image_path, rep.cfg.image_size)
    images = np.stack([img, img, img])
    drafts = rep.draft_batch(images, [s.history] * 3, ["axial"] * 3, ["CT", "MR", None])
    assert [d.modality for d in drafts[:2]] == ["CT", "MR"]  # whatever the image head says
    assert [d.modality_source for d in drafts] == ["dicom", "dicom", "image"]
    assert drafts[0].modality_conf == 1.0 and "from the DICOM header" in drafts[0].impression
    assert drafts[2].modality in ("CT", "MR") and 0.5 <= drafts[2].modality_conf <= 1.0
    assert "from the DICOM header" not in drafts[2].impression


def test_mirror_tta_averages_head_logits(tiny_reporter: Path, medpix_subset: Path) -> None:
    from solutions.medical_imaging.pipeline import HEADS, Reporter, _encode_all

    rep = Reporter(tiny_reporter)
    samples = load_medpix(medpix_subset, "dev")[:4]
    images = np.stack([load_image_array(s.image_path, rep.cfg.image_size) for s in samples])
    hist = rep.embedder([s.history for s in samples])
    plain = _encode_all(rep.encoder, images, hist)
    mirrored = _encode_all(rep.encoder, images[:, :, ::-1].copy(), hist)
    tta = _encode_all(rep.encoder, images, hist, tta=True)
    for k in HEADS:
        np.testing.assert_allclose(tta[k], (plain[k] + mirrored[k]) / 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tta["embedding"], plain["embedding"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain["modality"], mirrored["modality"])  # the mirror really is another view
    assert rep.cfg.tta  # a newly trained reporter uses it


def test_train_encoder_learns_the_heads_on_its_arrays() -> None:
    """The encoder loop that ``train_reporter`` runs (and holdout comparisons reuse) fits a separable label."""
    import torch

    from solutions.medical_imaging.pipeline import Arrays, _encode_all, train_encoder
    from solutions.medical_imaging.reporter import ReporterConfig

    rng = np.random.default_rng(0)
    n, s = 48, 32
    modality = np.arange(n) % 2
    images = rng.uniform(0.0, 0.3, (n, s, s)).astype(np.float32)
    images[modality == 1, 8:24, 8:24] += 0.6  # "MR": a bright block in the middle
    A = Arrays(images=images, history=np.zeros((n, 384), np.float32),
               caption=rng.normal(size=(n, 384)).astype(np.float32), modality=modality,
               region=np.arange(n) % 5, plane=np.zeros(n, dtype=np.int64), category=np.zeros(n, dtype=np.int64),
               abnormal=np.ones(n, np.float32), caption_group=np.arange(n))
    cfg = ReporterConfig(image_size=s, channels=(8, 8, 16, 16), categories=("other",))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc, _ = train_encoder(cfg, A, epochs=12, gen=gen, lr=5e-3, bs=16)
    assert enc.feat_dim == 16
    out = _encode_all(enc, images, A.history)
    assert (out["modality"].argmax(1) == modality).mean() >= 0.9

