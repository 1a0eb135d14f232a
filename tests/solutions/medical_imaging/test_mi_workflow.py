"""Ingest -> store -> report workflow on the real database schema (tmp_home, migrated)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from mi_helpers import dicom_testfile as dcm_file
from sqlalchemy import func, select

from core.auth import AuthError, create_user
from core.db import session_scope
from core.errors import VerticalsError
from solutions.medical_imaging import workflow
from solutions.medical_imaging.deid import phi_values
from solutions.medical_imaging.orm import (
    Instance,
    Patient,
    ReportVersion,
    SignedReportImmutable,
    Study,
    Upload,
)
from solutions.medical_imaging.sr import read_sr


def _counts() -> tuple[int, int, int]:
    with session_scope() as s:
        return (s.scalar(select(func.count(Study.id))), s.scalar(select(func.count(Instance.id))),
                s.scalar(select(func.count(Patient.id))))


def test_ingest_stores_deidentified_files_and_isolates_bad_ones(tmp_home: Path, dicom_drop: Path) -> None:
    summary = workflow.ingest_path(dicom_drop)
    bad = {Path(e["file"]).name for e in summary.errors}
    assert bad == {"truncated.dcm", "notes.txt"}
    assert summary.n_instances == 3  # MR_small RLE + J2K are one SOP instance in two encodings: kept once
    with session_scope() as s:
        studies = list(s.scalars(select(Study)))
        up = s.scalar(select(Upload))
        assert up.status == "partial" and up.n_ok == 4 and len(up.errors) == 2
        # The truncated CT shares its study with the good CT_small: the error is shown on that study.
        ct = [st for st in studies if st.modality == "CT"]
        assert len(ct) == 1 and "truncated" in (ct[0].error or "") and ct[0].n_instances == 1
        paths = [Path(i.path) for i in s.scalars(select(Instance))]
    phi = []
    for n in ("CT_small.dcm", "MR_small_RLE.dcm", "emri_small.dcm"):
        src = pydicom.dcmread(dcm_file(n))
        phi += [v for v in phi_values(src) if v not in f"{src.get('Manufacturer', '')} {src.get('ManufacturerModelName', '')}"]
        phi += [str(src.StudyInstanceUID), str(src.SOPInstanceUID)]
    assert phi and len(paths) == 3
    for p in paths:
        raw = p.read_bytes()
        assert not [v for v in phi if v.encode() in raw], f"PHI left in {p}"
        assert pydicom.dcmread(p).PatientIdentityRemoved == "YES"


def test_reingest_is_idempotent(tmp_home: Path, dicom_drop: Path) -> None:
    first = workflow.ingest_path(dicom_drop)
    before = _counts()
    second = workflow.ingest_path(dicom_drop)
    assert first.study_uids == second.study_uids and _counts() == before


def test_non_dicom_inputs_become_secondary_capture_studies(tmp_home: Path, tmp_path: Path, shared_data: Path) -> None:
    import shutil

    drop = tmp_path / "imports"
    drop.mkdir()
    shutil.copy(shared_data / "medical" / "pyradiomics" / "prostate_phantom_subvolume.nrrd", drop / "vol.nrrd")
    png = next((shared_data / "medical" / "medpix2" / "images").glob("*.png"))
    shutil.copy(png, drop / "key.png")
    summary = workflow.ingest_path(drop)
    assert not summary.errors and len(summary.study_uids) == 2
    with session_scope() as s:
        kinds = sorted(st.source for st in s.scalars(select(Study)))
        vol = s.scalar(select(Study).where(Study.source == "volume"))
        assert kinds == ["key_image", "volume"] and vol.n_instances > 1
        spacing = vol.series[0].spacing
    assert spacing[1] > 0 and spacing[0] > 0


def _signed_study(tmp_home: Path) -> tuple[str, object]:
    create_user("rad1", "correct horse battery", "radiologist")
    from core.auth import User

    summary = workflow.ingest_path(dcm_file("CT_small.dcm"))
    uid = summary.study_uids[0]
    with session_scope() as s:
        rad = s.scalar(select(User).where(User.username == "rad1"))
    return uid, rad


def test_sign_is_role_checked_and_signed_reports_are_immutable(tmp_home: Path) -> None:
    uid, rad = _signed_study(tmp_home)
    create_user("op1", "correct horse battery", "operator")
    from core.auth import User

    with session_scope() as s:
        op = s.scalar(select(User).where(User.username == "op1"))
    with pytest.raises(AuthError):
        workflow.sign_report(uid, op, "findings", "impression")
    workflow.save_edit(uid, rad, "Draft findings.", "Draft impression.")
    v = workflow.sign_report(uid, rad, "Final findings.", "Final impression.")
    assert v.signed and v.kind == "signed"
    with pytest.raises(VerticalsError, match="addendum"):
        workflow.save_edit(uid, rad, "changed", "changed")
    with pytest.raises(VerticalsError):
        workflow.sign_report(uid, rad, "again", "again")
    # Even direct ORM writes cannot change or delete a signed version.
    with pytest.raises(SignedReportImmutable), session_scope() as s:
        row = s.scalar(select(ReportVersion).where(ReportVersion.signed.is_(True)))
        row.findings = "tampered"
    with pytest.raises(SignedReportImmutable), session_scope() as s:
        s.delete(s.scalar(select(ReportVersion).where(ReportVersion.signed.is_(True))))
    add = workflow.add_addendum(uid, rad, "Comparison with prior shows stability.")
    hist = workflow.report_history(uid)
    assert [h.kind for h in hist] == ["edit", "signed", "addendum"]
    assert hist[1].findings == "Final findings." and "ADDENDUM" in add.findings
    with session_scope() as s:
        assert s.scalar(select(Study).where(Study.study_uid == uid)).status == "amended"


def test_export_sr_text_pdf_round_trip(tmp_home: Path, tmp_path: Path) -> None:
    uid, rad = _signed_study(tmp_home)
    with pytest.raises(VerticalsError, match="no signed report"):
        workflow.export_report(uid)
    workflow.sign_report(uid, rad, "Normal appearance of the imaged structures.", "No acute abnormality.")
    paths = workflow.export_report(uid, tmp_path / "out")
    back = read_sr(paths["sr"])
    assert back["findings"] == "Normal appearance of the imaged structures."
    assert back["study_uid"] == uid and back["verifier"] == "rad1"
    assert "No acute abnormality." in Path(paths["text"]).read_text()
    assert Path(paths["pdf"]).read_bytes()[:4] == b"%PDF"
    workflow.add_addendum(uid, rad, "Addendum text.")
    paths2 = workflow.export_report(uid, tmp_path / "out")
    sr2 = pydicom.dcmread(paths2["sr"])
    assert "PredecessorDocumentsSequence" in sr2 and "Addendum text." in read_sr(sr2)["findings"]


def test_parallel_ingest_matches_in_process_ingest(tmp_home: Path, tmp_path: Path) -> None:
    """Worker processes (parse + de-identify + write) store byte-identical files and the same rows."""
    from solutions.medical_imaging.benchmark import write_series

    drop = write_series(str(dcm_file("CT_small.dcm")), tmp_path / "drop", workflow.PARALLEL_MIN_FILES + 4,
                        patient="DOE^JANE")
    raw = (drop / "slice_0000.dcm").read_bytes()
    (drop / "cut.dcm").write_bytes(raw[: len(raw) // 2])  # truncated pixel data
    (drop / "readme.txt").write_text("not an image")
    serial = workflow.ingest_path(drop, workers=1)
    stored = {p.name: p.read_bytes() for p in workflow.storage_root().rglob("*.dcm")}
    counts = _counts()
    for p in workflow.storage_root().rglob("*.dcm"):
        p.unlink()
    parallel = workflow.ingest_path(drop, workers=2)
    assert parallel.n_instances == serial.n_instances == workflow.PARALLEL_MIN_FILES + 4
    assert parallel.study_uids == serial.study_uids
    assert sorted(e["file"] for e in parallel.errors) == sorted(e["file"] for e in serial.errors)
    assert {Path(e["file"]).name for e in parallel.errors} == {"cut.dcm", "readme.txt"}
    again = {p.name: p.read_bytes() for p in workflow.storage_root().rglob("*.dcm")}
    assert again == stored and len(stored) == parallel.n_instances
    assert _counts() == counts
    for blob in list(again.values())[:3]:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(blob))
        assert "DOE" not in str(ds.PatientName) and ds.PatientIdentityRemoved == "YES"
        assert ds.pixel_array.shape == (128, 128)  # pixel data written, not lost with the worker's copy


def test_ingest_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import reset_settings

    monkeypatch.setenv("VERTICALS_MEDICAL_IMAGING_INGEST_WORKERS", "3")
    reset_settings()
    assert workflow.ingest_workers() == 3
    from core.errors import ConfigError

    for bad in ("many", "0"):  # one readable line naming the variable, not a traceback
        monkeypatch.setenv("VERTICALS_MEDICAL_IMAGING_INGEST_WORKERS", bad)
        reset_settings()
        with pytest.raises(ConfigError, match="VERTICALS_MEDICAL_IMAGING_INGEST_WORKERS"):
            workflow.ingest_workers()
    monkeypatch.delenv("VERTICALS_MEDICAL_IMAGING_INGEST_WORKERS")
    reset_settings()
    assert workflow.ingest_workers() == 1
