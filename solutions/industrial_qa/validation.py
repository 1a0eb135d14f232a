"""Validation without the scored test images: held-out train normals + synthetic defects.

Settings are chosen here, never on ``DIR/test``: a seeded ``n_val`` of ``DIR/train/good`` is kept out
of fitting; the detector is fitted on the rest; each held-out normal is scored clean and with
``per_image`` synthetic defects drawn by a generator that is **not** the self-supervised pretext's
(``features.synthesize_defects``): a detector that only learned its own pretext generator gains
nothing here. Five generic kinds, each placed anywhere on the part (borders included):

* ``hole``: a small dark blob (radius 2-7 px at 256 px), soft edge;
* ``crack``: a thin (1-2 px) dark random-walk curve;
* ``finish``: a large region (20-55% of the part, from one side, ragged boundary) whose fine texture
  is replaced by another part's, amplified 1.8-3x, with a small brightness offset;
* ``edge``: an irregular chunk at the part's border replaced by dark background;
* ``stain``: a large smooth blob darkened by 20-40%.

The report has the image AUROC, pixel AUROC and AUPRO over the clean + defective images (same
metrics as ``evaluate``), the image AUROC per kind, fit seconds and scoring images per CPU-second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from core.errors import DataError
from solutions.industrial_qa import metrics
from solutions.industrial_qa.data import load_batch, normal_paths
from solutions.industrial_qa.detector import AnomalyDetector, DetectorConfig

KINDS: tuple[str, ...] = ("hole", "crack", "finish", "edge", "stain")


def _blob_mask(rng: np.random.Generator, size: int, r_lo: float, r_hi: float, border: bool = False) -> np.ndarray:
    """An irregular 12-gon ``(size, size)`` in {0, 1}; centred on a random border point if ``border``."""
    im = Image.new("L", (size, size), 0)
    r = rng.uniform(r_lo, r_hi)
    cy, cx = rng.uniform(0, size, 2)
    if border:
        side, t = int(rng.integers(4)), float(rng.uniform(0, size))
        cy, cx = [(0.0, t), (float(size), t), (t, 0.0), (t, float(size))][side]
    ang = np.sort(rng.uniform(0, 2 * np.pi, 12))
    rad = r * rng.uniform(0.5, 1.3, 12)
    asp = rng.uniform(0.4, 1.0)
    ImageDraw.Draw(im).polygon([(cx + rr * math.cos(a), cy + asp * rr * math.sin(a)) for a, rr in zip(ang, rad, strict=True)],
                               fill=255)
    return np.asarray(im, np.float32) / 255


def _crack_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    p = rng.uniform(0, size, 2)
    ang = rng.uniform(0, 2 * np.pi)
    pts = [tuple(p)]
    for _ in range(int(rng.integers(4, 10))):
        ang += rng.normal(0, 0.5)
        p = p + rng.uniform(6, 18) * np.array([math.cos(ang), math.sin(ang)])
        pts.append(tuple(p))
    ImageDraw.Draw(im).line(pts, fill=255, width=int(rng.integers(1, 3)))
    return np.asarray(im, np.float32) / 255


def _finish_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    side = int(rng.integers(4))
    edge = rng.uniform(0.2, 0.55) * size + np.cumsum(rng.normal(0, 1.5, size))   # ragged boundary
    m = (np.arange(size)[:, None] < edge[None, :]).astype(np.float32)
    return np.rot90(m, side).copy()


def synthetic_defect(image: np.ndarray, other: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, str]:
    """One validation defect on ``image (3, S, S)`` in [0, 1] (``other``: another normal part, the
    texture source of ``finish``). Returns (defective image ``(3, S, S)`` with the channel mean
    edited into every channel, mask ``(S, S)`` uint8, kind)."""
    g = image.mean(0)
    s = g.shape[-1]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "hole":
        m = _blob_mask(rng, s, 2, 7)
        g = g * (1 - rng.uniform(0.4, 0.8) * ndimage.gaussian_filter(m, 0.8))
    elif kind == "crack":
        m = _crack_mask(rng, s)
        soft = ndimage.gaussian_filter(m, 0.6)
        g = g * (1 - rng.uniform(0.35, 0.7) * soft / max(float(soft.max()), 1e-6))
    elif kind == "finish":
        m = _finish_mask(rng, s)
        soft = ndimage.gaussian_filter(m, 2)
        o = other.mean(0)
        tex = ndimage.gaussian_filter(g, 4) + rng.uniform(1.8, 3.0) * (o - ndimage.gaussian_filter(o, 4))
        g = g * (1 - soft) + soft * (tex + rng.uniform(-0.08, 0.12))
    elif kind == "edge":
        m = _blob_mask(rng, s, 8, 30, border=True)
        soft = ndimage.gaussian_filter(m, 1)
        g = g * (1 - soft) + soft * (rng.uniform(0.02, 0.1) + 0.02 * rng.standard_normal(g.shape))
    else:
        m = _blob_mask(rng, s, 10, 40)
        g = g * (1 - rng.uniform(0.2, 0.4) * ndimage.gaussian_filter(m, 4))
    g = np.clip(g, 0, 1).astype(np.float32)
    return np.repeat(g[None], image.shape[0], 0), (m > 0.5).astype(np.uint8), kind


def validation_set(normals: np.ndarray, per_image: int = 3, seed: int = 777
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_image`` synthetic defects on each normal ``(n, 3, S, S)`` (texture donors: other normals).
    Returns (images ``(m, 3, S, S)``, masks ``(m, S, S)``, kinds ``(m,)``); draws with < 3 mask pixels
    are dropped."""
    n = len(normals)
    if n < 2:
        raise DataError("the validation set needs at least 2 held-out normal images")
    rng = np.random.default_rng(seed)
    xs, ms, ks = [], [], []
    for rep in range(per_image):
        for i in range(n):
            x, m, k = synthetic_defect(normals[i], normals[(i + 1 + rep) % n], rng)
            if m.sum() >= 3:
                xs.append(x)
                ms.append(m)
                ks.append(k)
    return np.stack(xs), np.stack(ms), np.array(ks)


def validate(data_dir: Path, config: DetectorConfig | None = None, n_val: int = 80, split_seed: int = 12345,
             defect_seed: int = 777, per_image: int = 3,
             on_progress: Callable[[str, float], None] | None = None) -> dict:
    """Fit on ``DIR/train/good`` minus ``n_val`` seeded held-out normals and score those normals clean
    and with synthetic defects (module docstring). ``DIR/test`` is never read."""
    data_dir = Path(data_dir).expanduser()
    paths = normal_paths(data_dir)
    config = config or DetectorConfig()
    if n_val < 2 or len(paths) - n_val < 2 * config.min_holdout:
        raise DataError(f"{len(paths)} normal images: too few to hold {n_val} out for validation and still fit "
                        f"(at least {2 * config.min_holdout} must remain)")
    order = np.random.default_rng(split_seed).permutation(len(paths))
    val_p = [paths[i] for i in sorted(order[:n_val])]
    fit_p = [paths[i] for i in sorted(order[n_val:])]
    t0 = time.perf_counter()
    det = AnomalyDetector(config).fit(fit_p, on_progress)
    fit_s = time.perf_counter() - t0
    size = config.features.image_size
    normals = load_batch(val_p, size)
    x, masks, kinds = validation_set(normals, per_image, defect_seed)
    c0 = time.process_time()
    clean, bad = det.score_arrays(normals), det.score_arrays(x)
    cpu = time.process_time() - c0
    scores = np.concatenate([clean.scores, bad.scores])
    labels = np.r_[np.zeros(len(normals), int), np.ones(len(x), int)]
    maps = np.concatenate([clean.maps, bad.maps])
    all_masks = np.concatenate([np.zeros((len(normals), size, size), np.uint8), masks])
    report = {"dataset": str(data_dir), "n_fit": len(fit_p), "n_val_normals": len(val_p), "n_val_defects": len(x),
              "image_auroc": metrics.image_auroc(scores, labels),
              "pixel_auroc": metrics.pixel_auroc(maps, all_masks), "pixel_aupro": metrics.aupro(maps, all_masks),
              "image_auroc_by_kind": {}, "fit_seconds": fit_s,
              "images_per_cpu_s": (len(normals) + len(x)) / max(cpu, 1e-9)}
    for k in KINDS:
        sel = kinds == k
        if sel.any():
            report["image_auroc_by_kind"][k] = metrics.image_auroc(
                np.concatenate([clean.scores, bad.scores[sel]]), np.r_[np.zeros(len(normals), int), np.ones(sel.sum(), int)])
    return report
