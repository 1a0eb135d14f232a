"""Fixtures for medical_imaging tests: real DICOM from pydicom/pydicom-data, a small real MedPix subset
and a tiny reporter trained on it once per session."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from mi_helpers import dicom_testfile as dcm_file

MEDPIX = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "medical" / "medpix2"
warnings.filterwarnings("ignore", message=".*download failures.*")


def make_medpix_subset(dst: Path, n_train: int = 48, n_dev: int = 16) -> Path:
    """The first cases of each split, same layout, images symlinked (nothing copied into git)."""
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [json.loads(line) for line in (MEDPIX / f"images_{split}.jsonl").open()][:n]
        ids = {r["U_id"] for r in rows}
        cases = [line for line in (MEDPIX / f"cases_{split}.jsonl").open() if json.loads(line)["U_id"] in ids]
        (dst / f"images_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (dst / f"cases_{split}.jsonl").write_text("".join(cases))
        for r in rows:
            link = dst / "images" / f"{r['image']}.png"
            if not link.exists():
                link.symlink_to(MEDPIX / "images" / f"{r['image']}.png")
    return dst


@pytest.fixture(scope="session")
def medpix_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not MEDPIX.exists():
        pytest.skip("MedPix data not found beside the checkout")
    return make_medpix_subset(tmp_path_factory.mktemp("medpix"))


@pytest.fixture(scope="session")
def tiny_reporter(medpix_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reporter trained for one epoch on 48 real MedPix images (mechanics, not quality)."""
    from solutions.medical_imaging.pipeline import train_reporter

    out = tmp_path_factory.mktemp("reporter")
    train_reporter(medpix_subset, out, enc_epochs=1, dec_epochs=1)
    return out


@pytest.fixture
def installed_reporter(tmp_home: Path, tiny_reporter: Path) -> Path:
    """The tiny reporter placed where the product looks for the default model in ``tmp_home``."""
    from solutions.medical_imaging.pipeline import default_model_dir

    d = default_model_dir()
    for f in tiny_reporter.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture
def dicom_drop(tmp_path: Path) -> Path:
    """A drop folder: real CT, MR (RLE) and J2K files, a folder series, a non-DICOM and a corrupt file."""
    drop = tmp_path / "drop"
    drop.mkdir()
    for n in ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "emri_small.dcm"):
        shutil.copy(dcm_file(n), drop / n)
    raw = dcm_file("CT_small.dcm").read_bytes()
    (drop / "truncated.dcm").write_bytes(raw[: len(raw) - 3000])
    (drop / "notes.txt").write_text("not an image")
    return drop
