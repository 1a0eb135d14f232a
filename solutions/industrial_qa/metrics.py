"""Anomaly-detection metrics: image/pixel AUROC, AUPRO, F1 at a threshold, false alarms at 95% recall.

Inputs: image ``scores (N,)`` with ``labels (N,)`` in {0, 1}; pixel ``maps (N, H, W)`` with binary
``masks (N, H, W)``. AUPRO follows Bergmann et al. (MVTec AD): mean per-region overlap of each
connected defect region, integrated over false-positive rates up to 0.3 and normalised by 0.3.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score, roc_curve


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, max_pixels: int = 20_000_000, seed: int = 0) -> float:
    """Pixel AUROC over all pixels (a seeded uniform subsample above ``max_pixels``)."""
    y = masks.reshape(-1).astype(np.uint8)
    s = maps.reshape(-1).astype(np.float32)
    if y.size > max_pixels:
        idx = np.random.default_rng(seed).choice(y.size, max_pixels, replace=False)
        y, s = y[idx], s[idx]
    return float(roc_auc_score(y, s))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, n_thresholds: int = 200) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` (normalised to [0, 1])."""
    maps = maps.astype(np.float32)
    masks = masks.astype(bool)
    regions: list[np.ndarray] = []  # flat indices of each connected defect region
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i])
        if n:
            flat = lab.ravel()
            order = np.argsort(flat, kind="stable")
            bounds = np.searchsorted(flat[order], np.arange(1, n + 2))
            for r in range(n):
                regions.append(order[bounds[r]:bounds[r + 1]] + i * lab.size)
    if not regions:
        return float("nan")
    flat_maps = maps.ravel()
    normal_vals = flat_maps[~masks.ravel()]
    # thresholds spaced by the normal-pixel FPR they imply, from FPR=fpr_limit down to 0
    qs = np.linspace(1.0 - fpr_limit, 1.0, n_thresholds)
    thresholds = np.quantile(normal_vals, qs)
    sorted_normal = np.sort(normal_vals)
    fprs, pros = [], []
    region_vals = [np.sort(flat_maps[r]) for r in regions]
    for t in thresholds:
        fpr = 1.0 - np.searchsorted(sorted_normal, t, side="right") / sorted_normal.size
        pro = np.mean([1.0 - np.searchsorted(v, t, side="right") / v.size for v in region_vals])
        fprs.append(fpr)
        pros.append(pro)
    fprs_a, pros_a = np.array(fprs[::-1]), np.array(pros[::-1])  # increasing FPR
    keep = fprs_a <= fpr_limit
    fprs_a, pros_a = fprs_a[keep], pros_a[keep]
    if fprs_a.size < 2:
        return float("nan")
    # extend to exactly fpr_limit by linear interpolation with the last point
    if fprs_a[-1] < fpr_limit:
        fprs_a = np.append(fprs_a, fpr_limit)
        pros_a = np.append(pros_a, pros_a[-1])
    return float(np.trapezoid(pros_a, fprs_a) / fpr_limit)


def f1_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(f1_score(labels, (scores > threshold).astype(int), zero_division=0))


def accuracy_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(((scores > threshold).astype(int) == labels).mean())


def false_alarm_rate_at_recall(scores: np.ndarray, labels: np.ndarray, recall: float = 0.95) -> float:
    """Fraction of good parts rejected at the highest threshold that still catches ``recall`` defects."""
    fpr, tpr, _ = roc_curve(labels, scores)
    ok = tpr >= recall
    return float(fpr[ok].min()) if ok.any() else 1.0


def summary(scores: np.ndarray, labels: np.ndarray, threshold: float,
            maps: np.ndarray | None = None, masks: np.ndarray | None = None) -> dict[str, float | None]:
    """The evaluate report's quality fields (pixel fields None without masks)."""
    out: dict[str, float | None] = {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": None,
        "pixel_aupro": None,
        "f1_at_threshold": f1_at_threshold(scores, labels, threshold),
        "accuracy_at_threshold": accuracy_at_threshold(scores, labels, threshold),
        "false_alarm_rate_at_threshold": float((scores[labels == 0] > threshold).mean()),
        "false_alarm_rate_at_95_recall": false_alarm_rate_at_recall(scores, labels, 0.95),
    }
    if maps is not None and masks is not None and masks.any():
        out["pixel_auroc"] = pixel_auroc(maps, masks)
        out["pixel_aupro"] = aupro(maps, masks)
    return out
