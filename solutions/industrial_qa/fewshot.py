"""Few-shot refinement from a handful of labelled defect images (and their masks when given).

On top of the frozen unsupervised detector, three small scikit-learn heads:

* a patch head (logistic regression) on ``[patch feature (D), kNN z-score, pretext z-score]``,
  trained with mask-labelled defect patches against normal patches; its logit becomes the map;
* an image head (logistic regression) on a few statistics of the maps (max, top-1% mean, mean,
  per-map maxima), trained on the shots against held-out normal parts; its logit is the score;
* a defect-type classifier on anomaly-weighted pooled features when types are labelled.

Whether the heads replace the unsupervised map / score is decided by nested cross-validation inside
the labelled data (``FewShotHead.cross_validate``; the map candidates are the unsupervised map, the
patch head's logit, and ``"fused"``: their sum, the logit scaled to the map's spread on normal parts).
With 50 shots the supervised image head's CV gain was noise that did not carry over to new parts,
so it is used only when it wins in >= 95% of paired bootstrap resamples; otherwise the unsupervised score is kept and a few labels cannot make it worse.
The detector's own held-out normals are scored leave-one-out (``AnomalyDetector.holdout_outputs``).

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
from solutions.industrial_qa.calibration import Calibrator, balanced_threshold

if TYPE_CHECKING:
    from solutions.industrial_qa.detector import AnomalyDetector, MapOutput


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


def _take(out: MapOutput, idx: np.ndarray) -> MapOutput:
    """Rows ``idx`` of a batch of unsupervised outputs."""
    from solutions.industrial_qa.detector import MapOutput

    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return MapOutput(out.maps[idx], out.scores[idx], out.feats[t], out.knn[t], out.seg[t],
                     None if out.coarse is None else out.coarse[t])


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
        # chosen by nested CV in ``fit``: "head" = the supervised map / score, "unsup" = the detector's own,
        # "fused" (map only) = the unsupervised map + fuse_scale x the patch logit
        self.map_mode = "head"
        self.fuse_scale = 0.0   # patch logit -> unsupervised map units (std ratio on the normals' patches)
        self.image_mode = "head"
        self.cv: dict = {}                          # the CV figures the choice was made on
        self.cv_scores: dict[str, np.ndarray] = {}  # CV scores of the last fit (shots, then normals)

    # --- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, det: AnomalyDetector, shots: np.ndarray, masks: np.ndarray | None,
            types: Sequence[str], normals: np.ndarray, seed: int = 0, normals_are_holdout: bool = False,
            threshold: str = "far", min_confidence: float = 0.95) -> tuple[FewShotHead, Calibrator]:
        """Fit the heads; returns the head and a calibrator fitted on cross-validated scores.

        ``normals_are_holdout``: the normals are the detector's own held-out parts (the ones its map
        statistics were fitted on); they are then scored leave-one-out
        (:meth:`AnomalyDetector.holdout_outputs`), otherwise they would look more normal than new parts.

        Model choice by nested cross-validation inside the labelled data (folds over shots + normals,
        heads refitted per fold): the supervised image score is used only when its pooled CV image
        AUROC beats the unsupervised score's on the same images in at least ``min_confidence`` of
        paired bootstrap resamples (with 50 shots a 0.02 CV gain is within the noise, and on
        magnetic tile such gains did not carry over to the test parts: BENCHMARKS), and the patch
        head's map only when both its CV pixel AUROC and its CV AUPRO beat the unsupervised map's
        (it tends to trade small regions for large ones); otherwise the
        unsupervised one is kept (``image_mode`` / ``map_mode`` = ``"unsup"``). ``threshold``: ``"far"`` = the conformal ``(1 - target_far)``
        quantile of the CV normal scores (the line's false-alarm target); ``"balanced"`` = the CV
        score that maximises balanced accuracy (Youden), for lines that trade false alarms for recall.
        """
        if len(shots) < 2:
            raise DataError("few-shot refinement needs at least 2 labelled defect images")
        if len(normals) < 4:
            raise DataError("few-shot refinement needs at least 4 held-out normal images")
        if threshold not in ("far", "balanced"):
            raise DataError(f"threshold must be 'far' or 'balanced', got {threshold!r}")
        saved, det.fewshot = det.fewshot, None
        try:
            d_out = det.score_arrays(shots)
            n_out = det.holdout_outputs(normals) if normals_are_holdout else det.score_arrays(normals)
        finally:
            det.fewshot = saved
        size = shots.shape[-1]
        head = cls._fit_heads(det, d_out, n_out, masks, size, seed)
        cv = cls.cross_validate(det, d_out, n_out, masks, size, seed)
        head.cv = {k: v for k, v in cv.items() if not k.startswith("scores")}
        if cv["map_head_auroc"] is not None:
            # a supervised map only where it beats the unsupervised one on both pixel AUROC and AUPRO;
            # of those, the higher pixel AUROC
            wins = [(cv[f"map_{m}_auroc"], m) for m in ("head", "fused")
                    if cv.get(f"map_{m}_auroc") is not None and cv[f"map_{m}_auroc"] > cv["map_unsup_auroc"]
                    and cv[f"map_{m}_aupro"] > cv["map_unsup_aupro"]]
            head.map_mode = max(wins)[1] if wins else "unsup"
        if cv["image_gain_confidence"] < min_confidence:
            head.image_mode = "unsup"
        scores = cv["scores_head"] if head.image_mode == "head" else cv["scores_unsup"]
        head.cv_scores = {"head": cv["scores_head"], "unsup": cv["scores_unsup"]}  # not saved
        k = len(shots)
        calib = Calibrator.fit(scores[k:], scores[:k], target_far=det.config.target_far)
        if threshold == "balanced":
            # keep the Platt slope, move the curve so that p = 0.5 stays at the decision threshold
            # (heatmaps are shown in probability units with 0.5 = the threshold)
            t = balanced_threshold(scores[k:], scores[:k])
            calib = Calibrator(threshold=t, target_far=calib.target_far, a=calib.a, b=-calib.a * t,
                               n_normal=calib.n_normal, n_defect=calib.n_defect)
        # --- defect types ---
        labelled = sorted(set(types))
        if len(labelled) >= 2 and all(t for t in types):
            from sklearn.linear_model import LogisticRegression

            det.fewshot = head
            try:
                d_maps = det.upsample(head.patch_map(det, d_out.feats, d_out.knn, d_out.seg, d_out.coarse), size)
            finally:
                det.fewshot = saved
            pooled = head._pooled(d_out.feats, d_maps)
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

    @classmethod
    def _fit_heads(cls, det: AnomalyDetector, d_out: MapOutput, n_out: MapOutput, masks: np.ndarray | None,
                   size: int, seed: int) -> FewShotHead:
        """Patch head (when masks are given) and image head on unsupervised outputs of the shots
        (``d_out``) and of normal parts (``n_out``)."""
        from sklearn.linear_model import LogisticRegression

        head = cls()
        rng = np.random.default_rng(seed)
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
                # the fused map adds the logit in the unsupervised map's units: std ratio on normal parts
                pn = head._patch_logits(det, n_out.feats, n_out.knn, n_out.seg, n_out.coarse)
                un = det.fuse(n_out.knn, n_out.seg, n_out.coarse)
                head.fuse_scale = float(un.std() / pn.std().clamp_min(1e-6))
        xi = np.concatenate([head._stats(det, d_out, size), head._stats(det, n_out, size)])
        yi = np.concatenate([np.ones(len(d_out.scores)), np.zeros(len(n_out.scores))])
        head.img_mu, head.img_sd = xi.mean(0), xi.std(0) + 1e-6
        img_lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=500)
        img_lr.fit((xi - head.img_mu) / head.img_sd, yi)
        head.img_w, head.img_b = img_lr.coef_[0].copy(), float(img_lr.intercept_[0])
        return head

    def _stats(self, det: AnomalyDetector, out: MapOutput, size: int) -> np.ndarray:
        """Image-head inputs for unsupervised outputs ``out`` (the patch head's map when fitted)."""
        return self._score_parts(det, out, size)[0]

    def _score_parts(self, det: AnomalyDetector, out: MapOutput,
                     size: int) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor]:
        """(image-head inputs, stride-8 patch logits or None, upsampled map) for unsupervised outputs."""
        p = self._patch_logits(det, out.feats, out.knn, out.seg, out.coarse)
        maps = det.upsample(p if p is not None else det.fuse(out.knn, out.seg, out.coarse), size)
        return _image_stats(det, out.knn, out.seg, maps, p, out.coarse, self.unsup_col), p, maps

    def _image_logit(self, stats: np.ndarray) -> np.ndarray:
        """The image head's logit for image-head inputs ``stats`` (B, 6)."""
        return (stats - self.img_mu) / self.img_sd @ self.img_w + self.img_b

    @classmethod
    def cross_validate(cls, det: AnomalyDetector, d_out: MapOutput, n_out: MapOutput, masks: np.ndarray | None,
                       size: int, seed: int = 0, folds: int = 5, n_boot: int = 400) -> dict:
        """Nested CV of the heads against the unsupervised detector on the same labelled images.

        Folds over shots + normals (stratified); in each, both heads are refitted on the other folds
        and score the held-out ones. Returns pooled image AUROCs (``image_head_auroc``,
        ``image_unsup_auroc``), the fraction of ``n_boot`` paired bootstrap resamples of the CV scores
        in which the head's AUROC is higher (``image_gain_confidence``), pixel AUROCs and AUPROs of
        the two maps on the held-out shots and normals at 64 px (``map_*``; None without masks) and the CV scores
        (``scores_head``, ``scores_unsup``: shots first, then normals).
        """
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedKFold

        k, n = len(d_out.scores), len(n_out.scores)
        y = np.concatenate([np.ones(k), np.zeros(n)])
        folds = int(min(folds, k, n))
        cv_head = np.zeros(k + n)
        unsup = np.concatenate([d_out.scores, n_out.scores]).astype(np.float64)
        small = 64
        pix_y, pix_head, pix_unsup, pix_fused = [], [], [], []
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y):
            dtr, ntr = tr[tr < k], tr[tr >= k] - k
            dte, nte = te[te < k], te[te >= k] - k
            h = cls._fit_heads(det, _take(d_out, dtr), _take(n_out, ntr),
                               masks[dtr] if masks is not None else None, size, seed)
            for idx, out in ((dte, d_out), (nte, n_out)):
                sub = _take(out, idx)
                stats, p, maps = h._score_parts(det, sub, size)
                cv_head[idx + (0 if out is d_out else k)] = h._image_logit(stats)
                if masks is not None and p is not None:
                    mh = F.interpolate(maps[:, None], size=(small, small), mode="area")[:, 0]
                    fz = det.upsample(det.fuse(sub.knn, sub.seg, sub.coarse) + h.fuse_scale * p, size)
                    pix_fused.append(F.interpolate(fz[:, None], size=(small, small), mode="area")[:, 0].numpy())
                    mu = F.interpolate(torch.from_numpy(sub.maps)[:, None], size=(small, small), mode="area")[:, 0]
                    if out is d_out:
                        t = torch.from_numpy(masks[idx].astype(np.float32))[:, None]
                        my = (F.interpolate(t, size=(small, small), mode="area")[:, 0] >= 0.5).numpy()
                    else:
                        my = np.zeros(mh.shape, bool)
                    pix_y.append(my)
                    pix_head.append(mh.numpy())
                    pix_unsup.append(mu.numpy())
        rng = np.random.default_rng(seed)
        wins = 0
        for _ in range(n_boot):  # paired bootstrap (shots and normals resampled separately)
            i = np.concatenate([rng.choice(k, k), k + rng.choice(n, n)])
            wins += roc_auc_score(y[i], cv_head[i]) > roc_auc_score(y[i], unsup[i])
        out = {"folds": folds, "image_head_auroc": float(roc_auc_score(y, cv_head)),
               "image_unsup_auroc": float(roc_auc_score(y, unsup)), "image_gain_confidence": wins / n_boot,
               "map_head_auroc": None, "map_unsup_auroc": None, "map_head_aupro": None,
               "map_unsup_aupro": None, "map_fused_auroc": None, "map_fused_aupro": None,
               "scores_head": cv_head, "scores_unsup": unsup}
        if pix_y and np.concatenate(pix_y).any():
            from solutions.industrial_qa.metrics import aupro

            py = np.concatenate(pix_y)
            for name, maps in (("head", np.concatenate(pix_head)), ("unsup", np.concatenate(pix_unsup)),
                               ("fused", np.concatenate(pix_fused))):
                out[f"map_{name}_auroc"] = float(roc_auc_score(py.ravel(), maps.ravel()))
                out[f"map_{name}_aupro"] = float(aupro(maps, py))
        return out

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
        """Stride-8 map ``(B, h, w)``: the supervised patch logit, the unsupervised fusion (no patch
        head, or CV chose the unsupervised map), or their sum (``"fused"``, logit x ``fuse_scale``)."""
        p = self._patch_logits(det, feats, knn, seg, coarse) if self.map_mode in ("head", "fused") else None
        if p is None:
            return det.fuse(knn, seg, coarse)
        return det.fuse(knn, seg, coarse) + self.fuse_scale * p if self.map_mode == "fused" else p

    def image_score(self, det: AnomalyDetector, feats: torch.Tensor, knn: torch.Tensor, seg: torch.Tensor,
                    maps: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
        """Image scores ``(B,)``; ``maps`` are the upsampled :meth:`patch_map` of the batch."""
        size = maps.shape[-1]
        if self.image_mode == "unsup":
            if self.map_mode == "unsup" or self.patch_w is None:
                return maps.flatten(1).max(1).values
            return det.upsample(det.fuse(knn, seg, coarse), size).flatten(1).max(1).values
        p = self._patch_logits(det, feats, knn, seg, coarse)
        if self.map_mode != "head" and p is not None:  # the image head was fitted on the head's maps
            maps = det.upsample(p, size)
        stats = _image_stats(det, knn, seg, maps, p, coarse, self.unsup_col)
        return torch.from_numpy(self._image_logit(stats).astype(np.float32))

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
            out |= {"fewshot.type_w": torch.from_numpy(np.ascontiguousarray(self.type_w, dtype=np.float32)),
                    "fewshot.type_b": torch.from_numpy(np.ascontiguousarray(self.type_b, dtype=np.float32))}
        return out

    def meta(self) -> dict:
        return {"patch_b": self.patch_b, "img_w": self.img_w.tolist(), "img_b": self.img_b,
                "img_mu": self.img_mu.tolist(), "img_sd": self.img_sd.tolist(), "type_names": self.type_names,
                "unsup_col": self.unsup_col, "map_mode": self.map_mode, "image_mode": self.image_mode,
                "fuse_scale": self.fuse_scale,
                "cv": self.cv}

    @classmethod
    def from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> FewShotHead:
        head = cls()
        head.patch_b = float(meta["patch_b"])
        head.img_w, head.img_b = np.array(meta["img_w"]), float(meta["img_b"])
        head.img_mu, head.img_sd = np.array(meta["img_mu"]), np.array(meta["img_sd"])
        head.type_names = list(meta.get("type_names", []))
        head.unsup_col = bool(meta.get("unsup_col", False))  # heads saved before the column existed
        head.map_mode = meta.get("map_mode", "head")           # heads saved before the CV choice
        head.image_mode = meta.get("image_mode", "head")
        head.fuse_scale = float(meta.get("fuse_scale", 0.0))
        head.cv = dict(meta.get("cv", {}))
        if "fewshot.patch_w" in tensors:
            head.patch_w = tensors["fewshot.patch_w"]
            head.patch_mu = tensors["fewshot.patch_mu"]
            head.patch_sd = tensors["fewshot.patch_sd"]
        if "fewshot.type_w" in tensors:
            head.type_w = tensors["fewshot.type_w"].double().numpy()
            head.type_b = tensors["fewshot.type_b"].double().numpy()
        return head
