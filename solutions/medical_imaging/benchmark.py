"""Speed benchmark: ingest throughput and draft latency, measured in one run in a scratch VERTICALS_HOME.

Input series are copies of a real 512x512 CT slice from pydicom-data (``693_UNCR.dcm``, uncompressed,
and ``693_J2KR.dcm``, JPEG 2000 lossless) given fresh UIDs and slice positions, so every slice is a
distinct instance that goes through parse, decode, de-identification, storage and the database.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from core.errors import DataError


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    if p is None:
        raise DataError(f"pydicom test file {name} not available (install pydicom-data)")
    return str(p)


def write_series(source: str, folder: Path, n: int, patient: str = "BENCH^PATIENT") -> Path:
    """``n`` slices of one new study/series made from ``source`` (new UIDs, positions 1 mm apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = patient, patient.split("^")[-1]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"slice_{i:04d}.dcm")
    return folder


def run_bench(n_slices: int = 200, n_studies: int = 10, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    from core.db import reset_engines
    from core.settings import reset_settings
    from infra.migrate import upgrade
    from solutions.medical_imaging import dicom_io
    from solutions.medical_imaging.pipeline import default_model_dir

    model_dir = default_model_dir()
    old_home = os.environ.get("VERTICALS_HOME")
    out: dict[str, Any] = {"slices": n_slices}
    with tempfile.TemporaryDirectory(prefix="mi-bench-") as tmp:
        root = Path(tmp)
        try:
            os.environ["VERTICALS_HOME"] = str(root / "home")
            reset_settings()
            reset_engines()
            upgrade("heads")
            (root / "home" / "models" / "medical_imaging").mkdir(parents=True, exist_ok=True)
            (root / "home" / "models" / "medical_imaging" / "reporter").symlink_to(model_dir)
            from solutions.medical_imaging.tasks import cached_reporter
            from solutions.medical_imaging.workflow import draft_study, ingest_path

            for label, name in (("uncompressed", "693_UNCR.dcm"), ("jpeg2000", "693_J2KR.dcm")):
                src = write_series(_testdata(name), root / f"in_{label}", n_slices)
                t0 = time.perf_counter()
                scan = dicom_io.scan(src)
                t_parse = time.perf_counter() - t0
                t0 = time.perf_counter()
                summary = ingest_path(src)
                t_ingest = time.perf_counter() - t0
                if summary.errors or summary.n_instances != n_slices:
                    raise DataError(f"benchmark ingest lost slices: {summary.errors[:1]}")
                out[f"parse_slices_per_s_{label}"] = round(len(scan.instances) / t_parse, 1)
                out[f"ingest_slices_per_s_{label}"] = round(n_slices / t_ingest, 1)
                log(f"{label}: parse {out[f'parse_slices_per_s_{label}']}/s, full ingest "
                    f"{out[f'ingest_slices_per_s_{label}']}/s")
            uids = []
            for k in range(n_studies):
                src = write_series(_testdata("693_UNCR.dcm"), root / f"study_{k}", 20, patient=f"BENCH^P{k}")
                uids += ingest_path(src).study_uids
            rep = cached_reporter()
            t0 = time.perf_counter()
            draft_study(uids[0], rep)  # first call includes lazy MiniLM/model warm-up
            first = time.perf_counter() - t0
            times = []
            for uid in uids[1:]:
                t0 = time.perf_counter()
                draft_study(uid, rep)
                times.append(time.perf_counter() - t0)
            out |= {"draft_studies": len(uids), "draft_first_s": round(first, 3),
                    "draft_s_per_study_median": round(statistics.median(times), 3) if times else None,
                    "draft_s_per_study_max": round(max(times), 3) if times else None}
        finally:
            if old_home is None:
                os.environ.pop("VERTICALS_HOME", None)
            else:
                os.environ["VERTICALS_HOME"] = old_home
            reset_settings()
            reset_engines()
    return out
