"""De-identification (basic profile) and DICOM SR round trip on real pydicom test files."""

from __future__ import annotations

import io
import json

import pydicom
import pytest
from mi_helpers import dicom_testfile as dcm_file

from core.errors import DataError
from solutions.medical_imaging.deid import Deidentifier, phi_values
from solutions.medical_imaging.sr import ReportContent, build_sr, read_sr, report_text, write_pdf

KEY = b"k" * 32


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "693_J2KR.dcm"])
def test_no_phi_or_source_uids_left(name: str) -> None:
    ds = pydicom.dcmread(dcm_file(name))
    equipment = f"{ds.get('Manufacturer', '')} {ds.get('ManufacturerModelName', '')}"  # not PHI, kept
    phi = [v for v in phi_values(ds) if v not in equipment and v.strip("-")]
    uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    assert phi, "the source file should carry identifying values"
    raw = _bytes(Deidentifier(KEY)(ds))
    for v in phi + uids:
        assert v.encode() not in raw, f"{v!r} survived de-identification"
    out = pydicom.dcmread(io.BytesIO(raw))
    assert out.PatientIdentityRemoved == "YES"
    assert out.PatientID.startswith("ANON-") and str(out.PatientName) == out.PatientID
    assert not any(e.tag.is_private for e in out)
    assert out.pixel_array.size > 0  # pixels still decode (compressed syntaxes untouched)


def test_dates_shift_consistently_per_patient_and_uids_are_stable() -> None:
    d = Deidentifier(KEY)
    a = pydicom.dcmread(dcm_file("CT_small.dcm"))
    b = pydicom.dcmread(dcm_file("CT_small.dcm"))
    b.StudyDate = "20040301"  # a later study of the same patient
    orig_gap = 42  # 20040119 -> 20040301
    da, db = d(a), d(b)
    import datetime as dt

    gap = (dt.datetime.strptime(db.StudyDate, "%Y%m%d") - dt.datetime.strptime(da.StudyDate, "%Y%m%d")).days
    assert gap == orig_gap and da.StudyDate != "20040119"
    assert da.StudyInstanceUID == db.StudyInstanceUID and da.PatientID == db.PatientID
    other = d(pydicom.dcmread(dcm_file("MR_small.dcm")))
    assert other.PatientID != da.PatientID
    assert Deidentifier(b"another key" * 3)(pydicom.dcmread(dcm_file("CT_small.dcm"))).PatientID != da.PatientID


def test_pseudonym_map_only_when_configured() -> None:
    off, on = Deidentifier(KEY), Deidentifier(KEY, keep_map=True)
    off(pydicom.dcmread(dcm_file("CT_small.dcm")))
    ds = on(pydicom.dcmread(dcm_file("CT_small.dcm")))
    assert off.pseudonym_map == {}
    assert on.pseudonym_map == {"1CT1": ds.PatientID}


def test_pseudonym_map_setting_writes_a_private_file(tmp_path, monkeypatch) -> None:
    from core.settings import reset_settings
    from solutions.medical_imaging.workflow import _save_pseudonym_map, deidentifier

    monkeypatch.setenv("VERTICALS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VERTICALS_MEDICAL_IMAGING_PSEUDONYM_MAP", "")  # empty (as in .env.example): no map
    reset_settings()
    assert deidentifier().keep_map is False
    target = tmp_path / "map.json"
    monkeypatch.setenv("VERTICALS_MEDICAL_IMAGING_PSEUDONYM_MAP", str(target))
    reset_settings()
    try:
        d = deidentifier()
        ds = d(pydicom.dcmread(dcm_file("CT_small.dcm")))
        _save_pseudonym_map(d)
        assert json.loads(target.read_text()) == {"1CT1": ds.PatientID}
        assert target.stat().st_mode & 0o777 == 0o600
    finally:
        reset_settings()


def test_sr_round_trip_references_the_study(tmp_path) -> None:
    d = Deidentifier(KEY)
    src = d(pydicom.dcmread(dcm_file("CT_small.dcm"), stop_before_pixels=True))
    content = ReportContent("A 2 cm mass in the left upper lobe.", "Suspicious for neoplasm.", signed_by="Dr^Reader")
    sr = build_sr(content, [src])
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    back = read_sr(path)
    assert back["findings"] == content.findings and back["impression"] == content.impression
    assert back["study_uid"] == src.StudyInstanceUID
    assert back["referenced_series"] == src.SeriesInstanceUID
    assert back["verification"] == "VERIFIED" and back["verifier"] == "Dr^Reader"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.PatientID == src.PatientID
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    unsigned = read_sr(build_sr(ReportContent("x", "y"), [src]))
    assert unsigned["verification"] == "UNVERIFIED"
    assert "FINDINGS:" in report_text(content)
    assert write_pdf(content, tmp_path / "r.pdf").read_bytes()[:4] == b"%PDF"


def test_sr_refuses_empty_report_or_no_evidence() -> None:
    src = pydicom.dcmread(dcm_file("CT_small.dcm"), stop_before_pixels=True)
    with pytest.raises(DataError):
        build_sr(ReportContent("", ""), [src])
    with pytest.raises(DataError):
        build_sr(ReportContent("x", "y"), [])


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm"])  # explicit and implicit VR
def test_nested_private_tags_dates_names_and_uids_are_handled(name: str) -> None:
    ds = pydicom.dcmread(dcm_file(name))
    item = pydicom.Dataset()
    item.add_new(0x00091010, "LO", "private secret")
    item.add_new(0x00091001, "LO", "PRIVATE CREATOR")
    item.ContentDate, item.VerifyingObserverName = "20200105", "Doe^Jane"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ds.add_new(0x0040A073, "SQ", [item])  # VerifyingObserverSequence
    out = pydicom.dcmread(io.BytesIO(_bytes(Deidentifier(KEY)(ds))))

    def walk(d: pydicom.Dataset) -> list[pydicom.DataElement]:
        return [e for e in d] + [x for e in d if e.VR == "SQ" for it in e.value for x in walk(it)]

    assert not any(e.tag.is_private for e in walk(out))
    got = out.VerifyingObserverSequence[0]
    assert got.ContentDate != "20200105" and len(got.ContentDate) == 8  # shifted, still a date
    assert str(got.VerifyingObserverName) == "" and got.ReferencedSOPInstanceUID.startswith("2.25.")
