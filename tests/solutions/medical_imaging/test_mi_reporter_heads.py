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
