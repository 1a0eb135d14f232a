"""Few-shot refinement from a handful of labelled defect images (and their masks when given).

On top of the frozen unsupervised detector, three small scikit-learn heads:

* a patch head (logistic regression) on ``[patch feature (D), kNN z-score, pretext z-score]``,
  trained with mask-labelled defect patches against normal patches; its logit becomes the map;
* an image head (logistic regression) on a few statistics of the maps (max, top-1% mean, mean,
  per-map maxima), trained on the shots against held-out normal parts; its logit is the score;
* a defect-type classifier on anomaly-weighted pooled features when types are labelled.

Data contract: ``shots (K, 3, S, S)`` float32, ``masks (K, S, S)`` uint8 or None, ``types`` (K,),
``normals (N, 3, S, S)`` held-out normal parts (never the memory bank's own images).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import DataError
from solutions.industrial_qa.calibration import Calibrator

if TYPE_CHECKING:
    from solutions.industrial_qa.detector import AnomalyDetector


def _patch_inputs(det: AnomalyDetector, feats: torch.Tensor, knn: torch.Tensor, seg: torch.Tensor,
                  coarse: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D, h, w)`` + two ``(B, h, w)`` maps (+ the coarse map when the detector has one) ->
    patch rows ``(B*h*w, D + 2 [+ 1])``."""
    kz, sz = det.standardise(knn, seg)
    x = torch.cat([feats, kz[:, None], sz[:, None]] + ([coarse[:, None]] if coarse is not None else []), dim=1)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _image_stats(det: AnomalyDetector, knn: torch.Tensor, seg: torch.Tensor, maps: torch.Tensor,
                 patch: torch.Tensor | None, coarse: torch.Tensor | None = None,
                 unsup: bool = True) -> np.ndarray:
    """Per-image descriptors ``(B, 6 [+ 1] [+ 1])`` from the maps (all monotone in 'more anomalous');
    the coarse map's maximum is the seventh when the detector has the coarse branch, and with
    ``unsup`` the unsupervised detector's own image score comes last (heads saved before it
    existed were fitted without it)."""
    kz, sz = det.standardise(knn, seg)
    flat = maps.flatten(1)
    k = max(1, flat.shape[1] // 100)
    cols = [flat.max(1).values, flat.topk(k, dim=1).values.mean(1), flat.mean(1),
            kz.flatten(1).max(1).values, sz.flatten(1).max(1).values,
            patch.flatten(1).max(1).values if patch is not None else flat.max(1).values]
    if coarse is not None:
        cols.append(coarse.flatten(1).max(1).values)
    if unsup:
        # the unsupervised detector's own image score (max of its fused, smoothed map)
        cols.append(det.upsample(det.fuse(knn, seg, coarse), maps.shape[-1]).flatten(1).max(1).values)
    return torch.stack(cols, 1).double().numpy()


class FewShotHead:
    """Supervised heads fitted on few labelled defects; plugged into ``AnomalyDetector.fewshot``."""

    def __init__(self) -> None:
        self.patch_w: torch.Tensor | None = None   # (D + 2,) patch logistic weights
        self.patch_b: float = 0.0
        self.patch_mu: torch.Tensor | None = None  # (D + 2,) input standardisation
        self.patch_sd: torch.Tensor | None = None
        self.img_w = np.zeros(6)   # 7 with the detector's coarse branch
        self.img_b = 0.0
        self.img_mu = np.zeros(6)
        self.img_sd = np.ones(6)
        self.type_names: list[str] = []
        self.unsup_col = True   # the image head sees the unsupervised score (False: older heads)
        self.type_w: np.ndarray | None = None       # (T, D)
        self.type_b: np.ndarray | None = None       # (T,)

    # --- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, det: AnomalyDetector, shots: np.ndarray, masks: np.ndarray | None,
            types: Sequence[str], normals: np.ndarray, seed: int = 0) -> tuple[FewShotHead, Calibrator]:
        """Fit the heads; returns the head and a calibrator refitted on cross-validated scores."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        if len(shots) < 2:
            raise DataError("few-shot refinement needs at least 2 labelled defect images")
        if len(normals) < 4:
            raise DataError("few-shot refinement needs at least 4 held-out normal images")
        head = cls()
        saved, det.fewshot = det.fewshot, None
        try:
            d_out = det.score_arrays(shots)
            n_out = det.score_arrays(normals)
        finally:
            det.fewshot = saved
        rng = np.random.default_rng(seed)
        # --- patch head (needs masks) ---
        if masks is not None and masks.any():
            h, w = d_out.knn.shape[-2:]
            frac = F.adaptive_avg_pool2d(torch.from_numpy(masks.astype(np.float32))[:, None], (h, w))
            frac = frac.reshape(-1).numpy()
            xd = _patch_inputs(det, d_out.feats, d_out.knn, d_out.seg, d_out.coarse).numpy()
            xn = _patch_inputs(det, n_out.feats, n_out.knn, n_out.seg, n_out.coarse).numpy()
            pos = xd[frac >= 0.3]
            neg_d = xd[frac == 0.0]
            neg_n = xn[rng.choice(len(xn), min(len(xn), 20 * max(len(pos), 50)), replace=False)]
            if len(pos) >= 5:
                x = np.concatenate([pos, neg_d[rng.choice(len(neg_d), min(len(neg_d), 10 * len(pos)),
                                                          replace=False)], neg_n])
                y = np.concatenate([np.ones(len(pos)), np.zeros(len(x) - len(pos))])
                mu, sd = x.mean(0), x.std(0) + 1e-6
                lr = LogisticRegression(C=0.05, class_weight="balanced", max_iter=500)
                lr.fit((x - mu) / sd, y)
                head.patch_w = torch.from_numpy(lr.coef_[0].astype(np.float32))
                head.patch_b = float(lr.intercept_[0])
                head.patch_mu = torch.from_numpy(mu.astype(np.float32))
                head.patch_sd = torch.from_numpy(sd.astype(np.float32))
        # --- image head ---
        det.fewshot = head
        try:
            d_maps = det.upsample(head.patch_map(det, d_out.feats, d_out.knn, d_out.seg, d_out.coarse),
                                  shots.shape[-1])
            n_maps = det.upsample(head.patch_map(det, n_out.feats, n_out.knn, n_out.seg, n_out.coarse),
                                  normals.shape[-1])
        finally:
            det.fewshot = saved
        pd_ = head._patch_logits(det, d_out.feats, d_out.knn, d_out.seg, d_out.coarse)
        pn_ = head._patch_logits(det, n_out.feats, n_out.knn, n_out.seg, n_out.coarse)
        xi = np.concatenate([_image_stats(det, d_out.knn, d_out.seg, d_maps, pd_, d_out.coarse, head.unsup_col),
                             _image_stats(det, n_out.knn, n_out.seg, n_maps, pn_, n_out.coarse, head.unsup_col)])
        yi = np.concatenate([np.ones(len(shots)), np.zeros(len(normals))])
        head.img_mu, head.img_sd = xi.mean(0), xi.std(0) + 1e-6
        xs = (xi - head.img_mu) / head.img_sd
        img_lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=500)
        img_lr.fit(xs, yi)
        head.img_w, head.img_b = img_lr.coef_[0].copy(), float(img_lr.intercept_[0])
        folds = int(min(5, len(shots), len(normals)))
        cv = cross_val_predict(LogisticRegression(C=1.0, class_weight="balanced", max_iter=500), xs, yi,
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                               method="decision_function")
        calib = Calibrator.fit(cv[yi == 0], cv[yi == 1], target_far=det.config.target_far)
        # --- defect types ---
        labelled = sorted(set(types))
        if len(labelled) >= 2 and all(t for t in types):
            pooled = head._pooled(d_out.feats, d_maps)
            counts = {t: list(types).count(t) for t in labelled}
            if min(counts.values()) >= 1:
                tl = LogisticRegression(C=0.5, max_iter=1000)
                mu, sd = pooled.mean(0), pooled.std(0) + 1e-6
                tl.fit((pooled - mu) / sd, list(types))
                head.type_names = [str(c) for c in tl.classes_]
                # fold the standardisation into the weights so inference is one matmul
                w = tl.coef_ / sd[None]
                b = tl.intercept_ - (tl.coef_ * (mu / sd)[None]).sum(1)
                if len(head.type_names) == 2:  # sklearn binary: one row for the second class
                    w, b = np.concatenate([-w, w]), np.concatenate([-b, b])
                head.type_w, head.type_b = w, b
        return head, calib

    # --- inference -------------------------------------------------------------------------------
    def _patch_logits(self, det: AnomalyDetector, feats: torch.Tensor, knn: torch.Tensor,
                      seg: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.patch_w is None:
            return None
        b, _, h, w = feats.shape
        x = (_patch_inputs(det, feats, knn, seg, coarse) - self.patch_mu) / self.patch_sd
        return (x @ self.patch_w + self.patch_b).view(b, h, w)

    def patch_map(self, det: AnomalyDetector, feats: torch.Tensor, knn: torch.Tensor,
                  seg: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        """Stride-8 map ``(B, h, w)``: the supervised patch logit, or the unsupervised fusion."""
        p = self._patch_logits(det, feats, knn, seg, coarse)
        return p if p is not None else det.fuse(knn, seg, coarse)

    def image_score(self, det: AnomalyDetector, feats: torch.Tensor, knn: torch.Tensor, seg: torch.Tensor,
                    maps: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        stats = _image_stats(det, knn, seg, maps, self._patch_logits(det, feats, knn, seg, coarse), coarse,
                             self.unsup_col)
        x = (stats - self.img_mu) / self.img_sd
        return torch.from_numpy((x @ self.img_w + self.img_b).astype(np.float32))

    @staticmethod
    def _pooled(feats: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
        """Anomaly-weighted average of patch features ``(B, D)`` (where the defect is)."""
        h, w = feats.shape[-2:]
        wts = torch.softmax(F.adaptive_avg_pool2d(torch.as_tensor(maps)[:, None], (h, w)).flatten(1) * 2, 1)
        return (feats.flatten(2) * wts[:, None]).sum(-1).double().numpy()

    def defect_types(self, feats: torch.Tensor, maps: np.ndarray | torch.Tensor) -> list[str | None]:
        if self.type_w is None:
            return [None] * feats.shape[0]
        logits = self._pooled(feats, torch.as_tensor(maps)) @ self.type_w.T + self.type_b
        return [self.type_names[i] for i in logits.argmax(1)]

    # --- persistence -----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.patch_w is not None:
            out |= {"fewshot.patch_w": self.patch_w, "fewshot.patch_mu": self.patch_mu,
                    "fewshot.patch_sd": self.patch_sd}
        if self.type_w is not None:
            out |= {"fewshot.type_w": torch.from_numpy(self.type_w.astype(np.float32)),
                    "fewshot.type_b": torch.from_numpy(self.type_b.astype(np.float32))}
        return out

    def meta(self) -> dict:
        return {"patch_b": self.patch_b, "img_w": self.img_w.tolist(), "img_b": self.img_b,
                "img_mu": self.img_mu.tolist(), "img_sd": self.img_sd.tolist(), "type_names": self.type_names,
                "unsup_col": self.unsup_col}

    @classmethod
    def from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> FewShotHead:
        head = cls()
        head.patch_b = float(meta["patch_b"])
        head.img_w, head.img_b = np.array(meta["img_w"]), float(meta["img_b"])
        head.img_mu, head.img_sd = np.array(meta["img_mu"]), np.array(meta["img_sd"])
        head.type_names = list(meta.get("type_names", []))
        head.unsup_col = bool(meta.get("unsup_col", False))  # heads saved before the column existed
        if "fewshot.patch_w" in tensors:
            head.patch_w = tensors["fewshot.patch_w"]
            head.patch_mu = tensors["fewshot.patch_mu"]
            head.patch_sd = tensors["fewshot.patch_sd"]
        if "fewshot.type_w" in tensors:
            head.type_w = tensors["fewshot.type_w"].double().numpy()
            head.type_b = tensors["fewshot.type_b"].double().numpy()
        return head
