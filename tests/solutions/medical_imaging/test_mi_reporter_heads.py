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


def test_two_view_encoder_reads_the_centre_crop_and_old_configs_stay_single_view() -> None:
    import torch

    from solutions.medical_imaging.reporter import ImageEncoder, ReporterConfig, centre_crop

    x = torch.zeros(2, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0  # a bright centre square of a quarter of the side
    c = centre_crop(x, 2.0)
    assert c.shape == x.shape
    assert c[:, :, 10:22, 10:22].mean() > 0.9 and c[:, :, :2].max() == 0  # zoomed 2x: it fills the middle half
    cfg = ReporterConfig(image_size=32, channels=(8, 8, 16, 16), categories=("other",), centre_zoom=2.0)
    enc = ImageEncoder(cfg).eval()
    assert enc.mix is not None
    out = enc(x, torch.zeros(2, 384))
    assert out["feature"].shape == (2, 16) and out["region"].shape == (2, 5)
    # the feature is the mix of both views: the same trunk on the whole image and on its centre crop
    with torch.no_grad():
        t = x * 2.0 - 1.0
        expect = enc.mix(torch.cat([enc.trunk(t), enc.trunk(centre_crop(t, 2.0))], dim=-1))
        np.testing.assert_allclose(enc.features(x).numpy(), expect.numpy(), rtol=1e-5, atol=1e-6)
    d = cfg.to_dict()
    assert ReporterConfig.from_dict(d).centre_zoom == 2.0
    d.pop("centre_zoom")  # a config.json written before the two-view encoder existed
    old = ReporterConfig.from_dict(d)
    assert old.centre_zoom == 0.0 and ImageEncoder(old).mix is None
