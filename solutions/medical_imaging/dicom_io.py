"""Reading imaging inputs: DICOM files, folders and zips; NIfTI, NRRD and PNG key images.

Named input: a path (file, folder or ``.zip``) or raw bytes.
Named output: :class:`ParsedInstance` per readable DICOM file (header + rescaled pixels), grouped into
:class:`StudyGroup` / :class:`SeriesGroup` by StudyInstanceUID / SeriesInstanceUID with slices sorted
along the slice normal, plus one :class:`FileError` per file that could not be read. A bad file never
stops the others: the error names the file and says what to do.

Pixel decoding goes through pydicom's pixel backends (pylibjpeg for JPEG baseline/extended/lossless,
JPEG-LS and JPEG 2000; pylibjpeg-rle for RLE). Volumes with spacing and orientation come from MONAI
``LoadImage`` (PydicomReader / NibabelReader / NrrdReader) followed by ``Orientation`` and ``Spacing``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from core.errors import DataError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")
KEY_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_ZIP_MEMBERS = 20_000
MAX_ZIP_BYTES = 8 * 1024**3  # uncompressed; guards against zip bombs
MAX_FILE_BYTES = 2 * 1024**3

# CT presets as (center, width) in Hounsfield units (the usual reading-room defaults).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (32.0, 8.0),
    "soft tissue": (40.0, 400.0),
    "liver": (60.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (480.0, 2500.0),
}


@dataclass(frozen=True)
class FileError:
    """A file that could not be used, and why (shown to the user, stored on the upload)."""

    path: str
    reason: str
    study_uid: str = ""  # the source study, when the header could be read


class ParsedInstance:
    """One DICOM instance: its header (pixel data kept for storage) and rescaled frames.

    ``pixels`` (F, H, W) float32 in modality units (HU for CT, slope/intercept applied) is decoded on
    first access when not given: ingest only needs the header (the pixel element is validated by
    :func:`parse_instance`), so uncompressed slices are never decoded on the way into storage.
    """

    __slots__ = ("path", "dataset", "_pixels")

    def __init__(self, path: str, dataset: Dataset, pixels: np.ndarray | None = None) -> None:
        self.path, self.dataset, self._pixels = path, dataset, pixels

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = decode_pixels(self.dataset, self.path)
        return self._pixels

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, rows, columns) without decoding the pixels."""
        if self._pixels is not None:
            return tuple(int(v) for v in self._pixels.shape)  # type: ignore[return-value]
        ds = self.dataset
        return int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns)

    @property
    def study_uid(self) -> str:
        return str(self.dataset.get("StudyInstanceUID", "")) or "unknown-study"

    @property
    def series_uid(self) -> str:
        return str(self.dataset.get("SeriesInstanceUID", "")) or "unknown-series"

    @property
    def sop_uid(self) -> str:
        return str(self.dataset.get("SOPInstanceUID", ""))

    @property
    def modality(self) -> str:
        return str(self.dataset.get("Modality", "OT"))


@dataclass
class SeriesGroup:
    uid: str
    modality: str
    instances: list[ParsedInstance] = field(default_factory=list)

    @property
    def plane(self) -> str:
        return plane_of(self.instances[0].dataset) if self.instances else "unknown"

    def volume(self) -> np.ndarray:
        """(Z, H, W) float32 stack of all frames in slice order (frames of different size are refused)."""
        frames = [f for inst in self.instances for f in inst.pixels]
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise DataError(f"series {self.uid}: slices have different sizes {sorted(shapes)}; cannot stack")
        return np.stack(frames).astype(np.float32)

    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) spacing in mm from positions along the normal, else SliceThickness, else 1."""
        ds = self.instances[0].dataset
        ps = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
        dz = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
        pos = [slice_position(i.dataset) for i in self.instances]
        if len(pos) > 1 and all(p is not None for p in pos):
            gaps = np.diff(np.asarray(pos, dtype=np.float64))
            if np.all(np.abs(gaps) > 1e-6):
                dz = float(np.median(np.abs(gaps)))
        return dz, ps[0], ps[1]


@dataclass
class StudyGroup:
    uid: str
    patient_id: str
    series: dict[str, SeriesGroup] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series.values()})

    @property
    def n_instances(self) -> int:
        return sum(len(s.instances) for s in self.series.values())


# ------------------------------------------------------------------------------------------------
# Single files
# ------------------------------------------------------------------------------------------------
def read_dicom(source: str | Path | bytes, name: str = "") -> Dataset:
    """Parse a DICOM file (header and pixel element). Raises DataError for non-DICOM or broken input."""
    label = name or str(source if not isinstance(source, bytes) else "<bytes>")
    try:
        return _read_dicom(source, label)
    except DataError:
        raise
    except Exception as e:  # lazily decoded elements (unknown VR, bad lengths) surface on first access
        raise DataError(f"{label}: corrupt DICOM element ({type(e).__name__}: {str(e)[:200]})") from None


def _read_dicom(source: str | Path | bytes, label: str) -> Dataset:
    fp: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        ds = pydicom.dcmread(fp, force=False)
    except InvalidDicomError:
        # Files without the 128-byte preamble + 'DICM' are still DICOM when the header parses.
        try:
            if isinstance(fp, io.BytesIO):
                fp.seek(0)
            ds = pydicom.dcmread(fp, force=True)
            if "SOPClassUID" not in ds and "StudyInstanceUID" not in ds:
                raise DataError(f"{label}: not a DICOM file (no DICOM header found)")
        except DataError:
            raise
        except Exception:
            raise DataError(f"{label}: not a DICOM file (no DICOM header found)") from None
    except DataError:
        raise
    except Exception as e:  # pydicom raises many types on corrupt headers (BytesLengthException, ...)
        raise DataError(f"{label}: the DICOM header is corrupt or truncated ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = str(ds.get("SOPClassUID", "?"))
        raise DataError(f"{label}: DICOM object without pixel data (SOP class {sop}; or the file is truncated); "
                        "only images can be ingested")
    return ds


def decode_pixels(ds: Dataset, label: str = "") -> np.ndarray:
    """Decode pixel data to (F, H, W) float32 in modality units (rescale slope/intercept applied).

    Colour images are converted to luminance. Raises DataError naming the transfer syntax when no
    installed decoder supports it, and for truncated pixel data.
    """
    from pydicom.pixels import apply_modality_lut

    label = label or str(getattr(ds, "filename", "") or "<dataset>")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    if tsyntax is not None and getattr(tsyntax, "is_compressed", False):
        from pydicom.pixels.decoders.base import get_decoder

        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise DataError(
                f"{label}: transfer syntax '{ts_name}' ({tsyntax}) is not supported; supported compressed "
                "syntaxes are RLE, JPEG baseline/lossless, JPEG-LS and JPEG 2000. Re-export the study "
                "uncompressed (e.g. dcmdjpeg/gdcmconv --raw) and upload it again"
            ) from None
        if not decoder.is_available:
            raise DataError(f"{label}: no decoder installed for '{ts_name}'; install pylibjpeg plugins")
    try:
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # decoders raise many types (Rust ones a BaseException on panic)
        msg = str(e).strip().splitlines()
        detail = " ".join(m.strip() for m in msg[:3])[:300]
        if "than expected" in str(e) or "truncated" in str(e).lower() or "length" in str(e).lower():
            raise DataError(f"{label}: pixel data is truncated or incomplete ({detail})") from None
        raise DataError(f"{label}: cannot decode pixel data with transfer syntax '{ts_name}' ({detail})") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp == 3:
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, str(ds.PhotometricInterpretation), "RGB")
        arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif "ModalityLUTSequence" in ds:
        arr = apply_modality_lut(arr, ds).astype(np.float32)
    else:  # the common case: linear rescale, done in float32 (half the memory traffic of float64)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        arr = arr.astype(np.float32)
        if slope != 1.0 or intercept != 0.0:
            arr = arr * np.float32(slope) + np.float32(intercept)
    if n_frames == 1 or arr.ndim == 2:
        arr = arr.reshape((1, *arr.shape[-2:]))
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr  # MONOCHROME1: high values are dark
    return arr


def _check_native_pixels(ds: Dataset, label: str) -> bool:
    """For uncompressed (native) pixel data: True when the header and the pixel element are consistent
    (the pixels can then be decoded later, on demand); raises DataError for truncated data. False when
    the data is compressed or unusual (float, colour, palette, odd bit depths) and must be decoded now.
    """
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or getattr(tsyntax, "is_compressed", True) or "PixelData" not in ds:
        return False
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits, spp = int(ds.BitsAllocated), int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        pixel_repr = int(ds.PixelRepresentation)
    except (AttributeError, KeyError, TypeError, ValueError):
        return False  # let the full decoder produce its specific error
    if (spp != 1 or bits not in (8, 16) or pixel_repr not in (0, 1) or rows < 1 or cols < 1 or frames < 1
            or photometric not in ("MONOCHROME1", "MONOCHROME2") or "ModalityLUTSequence" in ds):
        return False
    expected = rows * cols * frames * bits // 8
    got = len(ds.get_item("PixelData").value or b"")
    if got < expected:
        raise DataError(f"{label}: pixel data is truncated or incomplete (expected {expected} bytes for "
                        f"{frames} x {rows} x {cols} x {bits} bits, found {got})")
    return True


def parse_instance(source: str | Path | bytes, name: str = "", decode: bool = True) -> ParsedInstance:
    """Header + pixels of one DICOM file; DataError with the reason when it cannot be used.

    ``decode=False``: uncompressed monochrome pixel data is only validated (size against the header)
    and decoded on first access of ``pixels``; compressed data is always decoded here, since that is
    the only way to know it is readable.
    """
    label = name or str(source if not isinstance(source, bytes) else "<bytes>")
    ds = read_dicom(source, label)
    try:
        if not decode and _check_native_pixels(ds, label):
            return ParsedInstance(path=label, dataset=ds)
        pixels = decode_pixels(ds, label)
    except DataError as e:
        e.study_uid = str(ds.get("StudyInstanceUID", ""))  # type: ignore[attr-defined]
        raise
    except Exception as e:  # element values are decoded lazily: a corrupt one surfaces only here
        raise DataError(f"{label}: corrupt DICOM element ({type(e).__name__}: {str(e)[:200]})") from None
    return ParsedInstance(path=label, dataset=ds, pixels=pixels)


# ------------------------------------------------------------------------------------------------
# Geometry, grouping, sorting
# ------------------------------------------------------------------------------------------------
def _normal(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    r, c = np.asarray(iop[:3], dtype=np.float64), np.asarray(iop[3:], dtype=np.float64)
    return np.cross(r, c)


def slice_position(ds: Dataset) -> float | None:
    """Position of a slice along its normal (mm): the right sort key for axial, sagittal or oblique."""
    ipp, n = ds.get("ImagePositionPatient"), _normal(ds)
    if ipp is None or n is None or len(ipp) != 3:
        return None
    return float(np.dot(np.asarray(ipp, dtype=np.float64), n))


def plane_of(ds: Dataset) -> str:
    """'axial', 'coronal', 'sagittal' or 'oblique' from ImageOrientationPatient ('unknown' without it)."""
    n = _normal(ds)
    if n is None:
        return "unknown"
    axis = int(np.argmax(np.abs(n)))
    if abs(n[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _sort_key(inst: ParsedInstance) -> tuple[float, float]:
    pos = slice_position(inst.dataset)
    num = float(inst.dataset.get("InstanceNumber", 0) or 0)
    return (pos if pos is not None else num, num)


def group_instances(instances: list[ParsedInstance]) -> list[StudyGroup]:
    """Group by StudyInstanceUID then SeriesInstanceUID; sort each series along the slice normal.

    Duplicate SOPInstanceUIDs (the same file dropped twice) are kept once.
    """
    studies: dict[str, StudyGroup] = {}
    seen: set[str] = set()
    for inst in instances:
        if inst.sop_uid and inst.sop_uid in seen:
            continue
        seen.add(inst.sop_uid)
        st = studies.setdefault(inst.study_uid, StudyGroup(inst.study_uid, str(inst.dataset.get("PatientID", ""))))
        se = st.series.setdefault(inst.series_uid, SeriesGroup(inst.series_uid, inst.modality))
        se.instances.append(inst)
    for st in studies.values():
        for se in st.series.values():
            se.instances.sort(key=_sort_key)
    return list(studies.values())


# ------------------------------------------------------------------------------------------------
# Folders and zips
# ------------------------------------------------------------------------------------------------
def _is_volume(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def _is_key_image(name: str) -> bool:
    return name.lower().endswith(KEY_IMAGE_SUFFIXES)


def iter_sources(path: str | Path) -> Iterator[tuple[str, bytes | Path | FileError]]:
    """(name, bytes, path or FileError) for every file under ``path`` (a file, folder or zip).

    Zip members are read into memory one at a time with member-count and size limits; an unreadable
    zip or member comes out as a FileError so the other files still get ingested.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if f.name.startswith(".") or f.name == "DICOMDIR":
            continue
        if f.suffix.lower() == ".zip":
            yield from _iter_zip(f)
        else:
            yield str(f), f


def _iter_zip(path: Path) -> Iterator[tuple[str, bytes | Path | FileError]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        yield str(path), FileError(str(path), f"{path.name}: not a readable zip archive ({e})")
        return
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise DataError(f"{path.name}: {len(members)} files in the zip; at most {MAX_ZIP_MEMBERS} per upload")
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise DataError(f"{path.name}: uncompressed size exceeds {MAX_ZIP_BYTES // 1024**3} GB; split the upload")
        for m in members:
            base = m.filename.rsplit("/", 1)[-1]
            if base.startswith(".") or base == "DICOMDIR" or m.filename.startswith("__MACOSX"):
                continue
            try:
                yield f"{path.name}:{m.filename}", zf.read(m)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                label = f"{path.name}:{m.filename}"
                yield label, FileError(label, f"{label}: damaged zip member ({e})")


@dataclass
class ScanResult:
    """Everything found under an input path."""

    instances: list[ParsedInstance] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)  # NIfTI/NRRD paths
    key_images: list[str] = field(default_factory=list)  # PNG/JPEG paths
    errors: list[FileError] = field(default_factory=list)

    @property
    def studies(self) -> list[StudyGroup]:
        return group_instances(self.instances)


def scan(path: str | Path, decode: bool = True) -> ScanResult:
    """Read every file under ``path``; unreadable files become :class:`FileError` rows, not exceptions.

    ``decode=False`` defers decoding of valid uncompressed pixel data (see :func:`parse_instance`)."""
    out = ScanResult()
    for name, src in iter_sources(path):
        kind = source_kind(name, src)
        if isinstance(kind, FileError):
            out.errors.append(kind)
        elif kind == "volume":
            out.volumes.append(name)
        elif kind == "key_image":
            out.key_images.append(name)
        else:
            try:
                out.instances.append(parse_instance(src, name, decode))  # type: ignore[arg-type]
            except DataError as e:
                out.errors.append(FileError(name, str(e), getattr(e, "study_uid", "")))
    return out


def source_kind(name: str, src: bytes | Path | FileError) -> str | FileError:
    """What :func:`iter_sources` yielded: "volume" (NIfTI/NRRD), "key_image" (PNG/JPEG), "dicom" (to
    parse), or a FileError (unreadable zip member, file over the size limit)."""
    if isinstance(src, FileError):
        return src
    if isinstance(src, Path):
        if _is_volume(name):
            return "volume"
        if _is_key_image(name):
            return "key_image"
        if src.stat().st_size > MAX_FILE_BYTES:
            return FileError(name, f"{name}: file larger than {MAX_FILE_BYTES // 1024**3} GB")
    return "dicom"


# ------------------------------------------------------------------------------------------------
# Display: windowing
# ------------------------------------------------------------------------------------------------
def apply_window(img: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window/level to uint8 (DICOM PS3.3 C.11.2.1.2 without the 0.5 offsets)."""
    width = max(float(width), 1.0)
    lo = center - width / 2.0
    out = (img.astype(np.float32) - lo) / width
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def auto_window(img: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> tuple[float, float]:
    """(center, width) from intensity percentiles: the usual MR auto-window (MR has no absolute units)."""
    lo, hi = np.percentile(img, [lo_pct, hi_pct])
    if hi <= lo:
        hi = lo + 1.0
    return float((lo + hi) / 2.0), float(hi - lo)


def default_window(ds: Dataset | None, img: np.ndarray) -> tuple[float, float]:
    """The window stored in the header, else a CT soft-tissue preset, else the auto window."""
    if ds is not None and "WindowCenter" in ds and "WindowWidth" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        wc = wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc
        ww = ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww
        if float(ww) > 1:
            return float(wc), float(ww)
    if ds is not None and str(ds.get("Modality", "")) == "CT":
        return CT_WINDOWS["soft tissue"]
    return auto_window(img)


# ------------------------------------------------------------------------------------------------
# Volumes through MONAI (spacing + orientation)
# ------------------------------------------------------------------------------------------------
def load_volume(path: str | Path, axcodes: str = "RAS", pixdim: tuple[float, float, float] | None = None) -> Any:
    """A 3-D volume as a MONAI MetaTensor (1, X, Y, Z) reoriented to ``axcodes`` and optionally resampled.

    ``path`` is a NIfTI/NRRD file or a folder holding one DICOM series. The affine (hence spacing and
    orientation) travels in ``.affine``; ``.meta['pixdim']`` gives the spacing.
    """
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    name = p.name.lower()
    if p.is_dir():
        reader: Any = "PydicomReader"
    elif name.endswith((".nrrd", ".nhdr")):
        reader = "NrrdReader"
    elif name.endswith((".nii", ".nii.gz")):
        reader = "NibabelReader"
    else:
        raise DataError(f"{p}: not a volume (expected a NIfTI/NRRD file or a folder with one DICOM series)")
    steps: list[Any] = [LoadImage(reader=reader, image_only=True), EnsureChannelFirst(), Orientation(axcodes=axcodes)]
    if pixdim is not None:
        steps.append(Spacing(pixdim=pixdim, mode="bilinear"))
    try:
        return Compose(steps)(str(p))
    except DataError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise DataError(f"{p}: cannot read the volume ({msg[-1][:300] if msg else type(e).__name__})") from None


def volume_spacing(vol: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm) along the array axes of a MetaTensor, from its affine."""
    aff = np.asarray(vol.affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((aff**2).sum(axis=0)))  # type: ignore[return-value]


def volume_axcodes(vol: Any) -> str:
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(np.asarray(vol.affine, dtype=np.float64)))


def load_key_image(path: str | Path) -> np.ndarray:
    """A PNG/JPEG key image as (H, W) float32 in [0, 255] (colour converted to luminance)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
