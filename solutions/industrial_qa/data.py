"""Loading part images and MVTec-AD-layout datasets, with errors a user can act on.

Data contract (MVTec AD layout)::

    DIR/train/good/*.{png,jpg,...}                 normal parts only (training)
    DIR/test/good/*                                normal parts (evaluation)
    DIR/test/<defect_type>/*                       defective parts (evaluation)
    DIR/ground_truth/<defect_type>/<stem>_mask.png pixel masks, non-zero = defect (optional)

Images may have any size, grayscale or colour; every image is returned as float32 RGB ``(3, S, S)``
in [0, 1] at the model's square size ``S`` together with its original ``(H, W)``, so heatmaps can
be resized back to input resolution.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import DataError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 40_000_000  # an image larger than this is refused (decompression bombs, wrong files)
MAX_FILE_BYTES = 64 * 1024 * 1024
MIN_SIDE = 16


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its path, label (0 good / 1 defect), defect type and mask path."""

    path: Path
    label: int
    defect_type: str = "good"
    mask_path: Path | None = None


@dataclass
class MVTecDataset:
    """A dataset folder in MVTec AD layout: ``train`` normals and labelled ``test`` samples."""

    root: Path
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})

    @property
    def has_masks(self) -> bool:
        return any(s.mask_path is not None for s in self.test if s.label == 1)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted); DataError when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = _images_in(folder)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def normal_paths(data_dir: str | Path) -> list[Path]:
    """The normal training images of ``data_dir``: ``train/good`` of an MVTec-layout folder, else the
    images directly inside it (a plain folder of good parts)."""
    data_dir = Path(data_dir).expanduser()
    if (data_dir / "train" / "good").is_dir():
        return [s.path for s in load_mvtec(data_dir, require_test=False).train]
    return list_images(data_dir)


def load_mvtec(root: str | Path, require_test: bool = True) -> MVTecDataset:
    """Index an MVTec-layout folder. Raises DataError naming what is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    good = root / "train" / "good"
    if not good.is_dir():
        raise DataError(f"{root} is not in MVTec layout: missing {good} (normal training images)")
    train = [Sample(p, 0) for p in list_images(good)]
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for sub in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            label = 0 if sub.name == "good" else 1
            for p in _images_in(sub):
                mask = None
                if label:
                    cand = [root / "ground_truth" / sub.name / f"{p.stem}_mask{ext}" for ext in (".png", p.suffix)]
                    cand.append(root / "ground_truth" / sub.name / f"{p.stem}{p.suffix}")
                    mask = next((c for c in cand if c.is_file()), None)
                test.append(Sample(p, label, sub.name, mask))
    if require_test:
        if not test:
            raise DataError(f"no test images under {test_dir} (expected test/good and test/<defect_type>)")
        if not any(s.label == 0 for s in test) or not any(s.label == 1 for s in test):
            raise DataError(f"{test_dir} needs both test/good and at least one test/<defect_type> folder")
    return MVTecDataset(root=root, train=train, test=test)


def read_image(source: str | Path | bytes, name: str = "") -> Image.Image:
    """Decode one image file (path or bytes) as RGB, refusing corrupt, oversized or non-image input."""
    label = name or (str(source) if not isinstance(source, bytes) else "upload")
    if isinstance(source, bytes):
        if len(source) > MAX_FILE_BYTES:
            raise DataError(f"{label}: file is {len(source) / 1e6:.0f} MB, larger than {MAX_FILE_BYTES // 2**20} MiB")
        fh: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"image not found: {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{label}: file is larger than {MAX_FILE_BYTES // 2**20} MiB")
        if path.stat().st_size == 0:
            raise DataError(f"{label}: empty file")
        fh = path
    try:
        with Image.open(fh) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{label}: image is {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed")
            if min(w, h) < MIN_SIDE:
                raise DataError(f"{label}: image is {w}x{h}; each side must be at least {MIN_SIDE} px")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo + 1e-8) * 255.0
                im2 = Image.fromarray(arr.astype(np.uint8))
                return im2.convert("RGB")
            return im.convert("RGB")
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{label}: image is too large to decode safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{label}: not a readable image ({type(e).__name__}: {e}); "
                        f"use PNG/JPEG/BMP/TIFF") from None


def to_tensor_array(im: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> float32 array ``(3, size, size)`` in [0, 1] (bilinear resize)."""
    im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


def load_array(source: str | Path | bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Read and resize an image. Returns (array (3, size, size), original (H, W))."""
    im = read_image(source)
    return to_tensor_array(im, size), (im.size[1], im.size[0])


def load_mask(sample: Sample, size: int) -> np.ndarray:
    """Binary mask ``(size, size)`` uint8 for a sample (zeros for good parts or missing masks)."""
    if sample.label == 0 or sample.mask_path is None:
        return np.zeros((size, size), dtype=np.uint8)
    try:
        with Image.open(sample.mask_path) as m:
            m = m.convert("L").resize((size, size), Image.NEAREST)
            return (np.asarray(m) > 127).astype(np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"mask {sample.mask_path}: not a readable image ({e})") from None


def load_batch(paths: Sequence[Path], size: int) -> np.ndarray:
    """Stack images into ``(N, 3, size, size)`` float32; raises DataError on the first bad file."""
    return np.stack([load_array(p, size)[0] for p in paths]) if paths else np.zeros((0, 3, size, size), np.float32)


def few_shot_split(test: list[Sample], n: int, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Pick ``n`` labelled defects (stratified by type, seeded) for refinement; return (shots, rest).

    Good test images are never used as shots, so the rest keeps every good image for scoring.
    """
    defects = [s for s in test if s.label == 1]
    if n <= 0:
        return [], list(test)
    if n >= len(defects):
        raise DataError(f"--few-shot {n} leaves no defect to score: the test split has {len(defects)} defects")
    rng = random.Random(seed)
    by_type: dict[str, list[Sample]] = {}
    for s in defects:
        by_type.setdefault(s.defect_type, []).append(s)
    for v in by_type.values():
        rng.shuffle(v)
    shots: list[Sample] = []
    types = sorted(by_type)
    i = 0
    while len(shots) < n:  # round-robin over types: every type gets examples when n allows
        t = types[i % len(types)]
        if by_type[t]:
            shots.append(by_type[t].pop())
        i += 1
    chosen = {s.path for s in shots}
    return shots, [s for s in test if s.path not in chosen]
