"""DICOM/volume reading on real files: transfer syntaxes, rescale, errors, grouping, orientation/spacing."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
from mi_helpers import dicom_testfile as dcm_file

from core.errors import DataError
from solutions.medical_imaging import dicom_io

PYRADIOMICS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "medical" / "pyradiomics"


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_compressed_syntaxes_decode_to_the_uncompressed_pixels(name: str) -> None:
    ref = dicom_io.parse_instance(dcm_file("MR_small.dcm")).pixels
    got = dicom_io.parse_instance(dcm_file(name)).pixels
    np.testing.assert_array_equal(got, ref)


def test_baseline_jpeg_decodes() -> None:
    inst = dicom_io.parse_instance(dcm_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert inst.pixels.shape == (1, 100, 100) and inst.pixels.max() > inst.pixels.min()


def test_rescale_slope_intercept_applied_to_ct() -> None:
    ds = pydicom.dcmread(dcm_file("CT_small.dcm"))
    inst = dicom_io.parse_instance(dcm_file("CT_small.dcm"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(inst.pixels[0], expected)


def test_unsupported_transfer_syntax_is_a_clear_error() -> None:
    ds = pydicom.dcmread(dcm_file("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DataError, match="not supported.*Re-export"):
        dicom_io.parse_instance(buf.getvalue(), "mpeg.dcm")


def test_non_dicom_and_truncated_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a DICOM file"):
        dicom_io.parse_instance(b"hello world" * 20, "notes.txt")
    raw = dcm_file("CT_small.dcm").read_bytes()
    with pytest.raises(DataError, match="truncated"):
        dicom_io.parse_instance(raw[: len(raw) - 3000], "cut.dcm")


def test_scan_keeps_good_files_and_reports_bad_ones(dicom_drop: Path) -> None:
    res = dicom_io.scan(dicom_drop)
    assert {Path(e.path).name for e in res.errors} == {"truncated.dcm", "notes.txt"}
    assert len(res.instances) == 4
    assert [e.study_uid for e in res.errors if e.path.endswith("truncated.dcm")][0]  # header was readable


def test_zip_with_a_damaged_member(tmp_path: Path) -> None:
    z = tmp_path / "study.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(dcm_file("CT_small.dcm"), "a/CT_small.dcm")
        zf.writestr("a/garbage.dcm", b"\x00" * 500)
    res = dicom_io.scan(z)
    assert len(res.instances) == 1 and len(res.errors) == 1 and "garbage.dcm" in res.errors[0].path
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04broken")
    res = dicom_io.scan(tmp_path / "bad.zip")
    assert not res.instances and "zip" in res.errors[0].reason


def test_series_grouping_and_slice_order() -> None:
    root = dcm_file("CT_small.dcm").parent / "dicomdirtests" / "77654033"
    res = dicom_io.scan(root)
    studies = {s.uid: s for s in res.studies}
    ct = [se for st in studies.values() for se in st.series.values() if se.modality == "CT" and len(se.instances) > 2]
    assert ct, "expected a multi-slice CT series"
    for se in ct:
        pos = [dicom_io.slice_position(i.dataset) for i in se.instances]
        assert pos == sorted(pos)
        assert se.volume().shape[0] == sum(i.pixels.shape[0] for i in se.instances)
    # every instance ends up in exactly one series of its own study
    assert sum(st.n_instances for st in studies.values()) == len(res.instances)
    for st in studies.values():
        for se in st.series.values():
            assert {i.series_uid for i in se.instances} == {se.uid}
            assert {i.study_uid for i in se.instances} == {st.uid}


def test_plane_from_orientation() -> None:
    ds = pydicom.Dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert dicom_io.plane_of(ds) == "axial"
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert dicom_io.plane_of(ds) == "sagittal"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert dicom_io.plane_of(ds) == "coronal"


@pytest.mark.parametrize("name", ["brain1_image.nrrd", "breast1_image.nrrd"])
def test_nrrd_orientation_and_spacing(name: str) -> None:
    path = PYRADIOMICS / name
    if not path.exists():
        pytest.skip("pyradiomics volumes not found")
    header = nrrd.read_header(str(path))
    spacing = sorted(np.linalg.norm(np.asarray(header["space directions"], dtype=float), axis=1).round(4))
    vol = dicom_io.load_volume(path, axcodes="RAS")
    assert dicom_io.volume_axcodes(vol) == "RAS"
    assert sorted(np.round(dicom_io.volume_spacing(vol), 4)) == spacing
    assert sorted(vol.shape[1:]) == sorted(header["sizes"].tolist())
    iso = dicom_io.load_volume(path, axcodes="RAS", pixdim=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(dicom_io.volume_spacing(iso), (2.0, 2.0, 2.0), atol=1e-4)
    assert np.prod(iso.shape) < np.prod(vol.shape) or min(spacing) >= 2.0


def test_windowing() -> None:
    img = np.array([[-1000.0, 40.0, 1000.0]])
    out = dicom_io.apply_window(img, *dicom_io.CT_WINDOWS["brain"])
    assert out.tolist() == [[0, 128, 255]]
    c, w = dicom_io.auto_window(np.arange(1000, dtype=float))
    assert 400 < c < 600 and 900 < w < 1000


def test_deferred_decoding_validates_native_pixels_and_decodes_on_demand() -> None:
    raw = dcm_file("CT_small.dcm").read_bytes()
    with pytest.raises(DataError, match="truncated"):  # still caught without decoding
        dicom_io.parse_instance(raw[: len(raw) - 3000], "cut.dcm", decode=False)
    lazy = dicom_io.parse_instance(dcm_file("CT_small.dcm"), decode=False)
    eager = dicom_io.parse_instance(dcm_file("CT_small.dcm"))
    assert lazy._pixels is None and lazy.shape == eager.shape == (1, 128, 128)
    np.testing.assert_array_equal(lazy.pixels, eager.pixels)  # same rescaled values, decoded on access
    # compressed data is decoded up front (the only way to know it is readable)
    assert dicom_io.parse_instance(dcm_file("MR_small_RLE.dcm"), decode=False)._pixels is not None
