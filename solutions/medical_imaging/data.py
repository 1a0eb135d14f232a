"""MedPix 2.0 loader (the layout of ``../shared/data/medical/medpix2``) and label vocabularies.

Named input: a folder with ``images_<split>.jsonl`` (one image per line: Type, U_id, image,
Description{Caption, Modality, Plane, Age, Sex}, Location, Location Category), ``cases_<split>.jsonl``
(U_id, Case{History, Findings, Case Diagnosis, ...}, Topic{Category}) and ``images/<image>.png``.
Named output: a list of :class:`MedPixSample` (one per image, case fields joined in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DataError

MODALITIES: tuple[str, ...] = ("CT", "MR")
REGIONS: tuple[str, ...] = ("Head", "Thorax", "Abdomen", "Spine and Muscles", "Reproductive and Urinary System")
REGION_WORDS: dict[str, str] = {
    "Head": "head", "Thorax": "chest", "Abdomen": "abdomen", "Spine and Muscles": "spine",
    "Reproductive and Urinary System": "pelvis",
}
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal", "other")
NORMAL_WORDS = ("normal", "unremarkable", "no evidence", "no abnormal", "negative")


@dataclass(frozen=True)
class MedPixSample:
    image_id: str
    case_id: str
    image_path: Path
    modality: str  # "CT" | "MR"
    modality_detail: str  # e.g. "MR - T2 weighted"
    plane: str  # one of PLANES
    region: str  # one of REGIONS
    location: str
    age: str
    sex: str
    caption: str
    history: str
    findings: str
    category: str  # MedPix topic category, e.g. "Neoplasm, benign"
    diagnosis: str
    exam: str = ""  # the case's physical exam text (part of the clinical request, not of the report)

    @property
    def abnormal(self) -> int:
        """Weak label: 0 when the caption says the image is normal, else 1 (teaching cases are mostly abnormal)."""
        c = self.caption.lower()
        return 0 if any(w in c for w in NORMAL_WORDS) and "abnormal" not in c else 1


def normalize_plane(plane: str | None) -> str:
    p = (plane or "").strip().lower()
    if p in ("axial", "transverse"):
        return "axial"
    if p in ("coronal", "sagittal"):
        return p
    return "other"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"{path}: missing (a MedPix-layout folder needs images_<split>.jsonl and cases_<split>.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def load_medpix(root: str | Path, split: str) -> list[MedPixSample]:
    """All images of ``split`` with their case text. Raises DataError on a missing or malformed layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder (expected the medpix2 layout)")
    images = _read_jsonl(root / f"images_{split}.jsonl")
    cases = {c.get("U_id"): c for c in _read_jsonl(root / f"cases_{split}.jsonl")}
    out: list[MedPixSample] = []
    for i, r in enumerate(images, 1):
        try:
            desc = r.get("Description") or {}
            case = cases.get(r["U_id"], {})
            c, topic = case.get("Case") or {}, case.get("Topic") or {}
            modality = str(r["Type"]).upper()[:2]
            region = str(r.get("Location Category") or "")
            if modality not in MODALITIES:
                raise KeyError(f"Type {r['Type']!r} is not CT or MR")
            if region not in REGIONS:
                raise KeyError(f"Location Category {region!r} is not one of {REGIONS}")
            out.append(MedPixSample(
                image_id=str(r["image"]), case_id=str(r["U_id"]), image_path=root / "images" / f"{r['image']}.png",
                modality=modality, modality_detail=str(desc.get("Modality") or ""),
                plane=normalize_plane(desc.get("Plane")), region=region, location=str(r.get("Location") or ""),
                age=str(desc.get("Age") or ""), sex=str(desc.get("Sex") or ""),
                caption=" ".join(str(desc.get("Caption") or "").split()),
                history=" ".join(str(c.get("History") or "").split()),
                findings=" ".join(str(c.get("Findings") or "").split()),
                category=str(topic.get("Category") or "unknown"),
                diagnosis=str(c.get("Case Diagnosis") or c.get("Title") or ""),
                exam=" ".join(str(c.get("Exam") or "").split()),
            ))
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{root / f'images_{split}.jsonl'}:{i}: bad record ({e})") from None
    missing = [s.image_path for s in out if not s.image_path.exists()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) missing, e.g. {missing[0]}")
    return out


NATIVE_SIZE = 256  # longest side of the full-resolution view read by the fusion's image statistics


def _resize(im: Any, size: int, canvas: bool) -> np.ndarray:
    """8-bit PIL image -> float32 in [0, 1], longest side ``size``; ``canvas``: centred on a black square."""
    from PIL import Image

    w, h = im.size
    scale = size / max(w, h)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    if canvas:
        c = Image.new("L", (size, size))
        c.paste(im, ((size - im.size[0]) // 2, (size - im.size[1]) // 2))
        im = c
    return np.asarray(im, dtype=np.float32) / 255.0


def load_image_array(path: str | Path, size: int = 128, canvas: bool = True) -> np.ndarray:
    """(size, size) float32 in [0, 1]: longest side resized to ``size``, centred on a black square
    (``canvas=False``: the resized image alone, its own aspect ratio)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _resize(im.convert("L"), size, canvas)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def load_native_array(path: str | Path) -> np.ndarray:
    """The full-resolution view for the fusion statistics: longest side NATIVE_SIZE, no padding."""
    return load_image_array(path, NATIVE_SIZE, canvas=False)


def to_model_input(img: np.ndarray, size: int = 128, canvas: bool = True) -> np.ndarray:
    """Any 2-D slice (modality units or 8-bit) -> (size, size) float32 in [0, 1] like the training images
    (``canvas=False``: longest side ``size``, no padding, like :func:`load_native_array` with size NATIVE_SIZE)."""
    from PIL import Image

    a = img.astype(np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    return _resize(Image.fromarray((a * 255).astype(np.uint8)), size, canvas)
