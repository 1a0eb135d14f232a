"""Score -> calibrated defect probability, and decision thresholds from a target false-alarm rate.

Unsupervised: only normal scores are known (held-out normal parts). The threshold is the conformal
``(1 - far)`` quantile of those scores, so at most ``far`` of future normal parts are rejected; the
probability is a logistic curve centred on that threshold with the normal spread as its scale
(monotone, 0.5 at the threshold). With labelled defects, Platt scaling (a 1-D logistic regression,
scikit-learn) fits the curve to both classes instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from core.errors import DataError


def threshold_for_false_alarm_rate(normal_scores: np.ndarray, far: float) -> float:
    """Smallest threshold such that at most ``far`` of the normal scores lie strictly above it.

    Uses the conformal rank ``ceil((n + 1) (1 - far))`` so the bound holds for new parts drawn from
    the same distribution; with too few normals for the requested rate it returns the maximum.
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise DataError("need at least one normal score to set a threshold")
    if not 0.0 < far < 1.0:
        raise DataError(f"target false-alarm rate must be in (0, 1), got {far}")
    k = min(int(math.ceil((s.size + 1) * (1.0 - far))), s.size)
    return float(s[k - 1])


def balanced_threshold(normal_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    """The threshold (reject when score > threshold) that maximises balanced accuracy
    ``(specificity + recall) / 2`` on labelled scores (Youden's J); ties go to the higher threshold
    (fewer false alarms). Candidates are the observed scores."""
    normal = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    defect = np.sort(np.asarray(defect_scores, dtype=np.float64).ravel())
    if normal.size == 0 or defect.size == 0:
        raise DataError("a balanced threshold needs both normal and defect scores")
    cand = np.unique(np.concatenate([normal, defect, [normal[0] - 1.0]]))
    spec = np.searchsorted(normal, cand, side="right") / normal.size      # normals at or below
    rec = 1.0 - np.searchsorted(defect, cand, side="right") / defect.size  # defects strictly above
    j = spec + rec
    return float(cand[np.flatnonzero(j >= j.max() - 1e-12)[-1]])


def false_alarm_rate(normal_scores: np.ndarray, threshold: float) -> float:
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    return float((s > threshold).mean()) if s.size else float("nan")


@dataclass
class Calibrator:
    """Monotone map score -> P(defect) plus the line's accept/reject threshold."""

    threshold: float
    target_far: float
    a: float  # slope of the logistic curve (> 0 keeps it increasing)
    b: float  # intercept
    n_normal: int = 0
    n_defect: int = 0

    @classmethod
    def fit(cls, normal_scores: np.ndarray, defect_scores: np.ndarray | None = None,
            target_far: float = 0.01) -> Calibrator:
        normal = np.asarray(normal_scores, dtype=np.float64).ravel()
        defect = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64).ravel()
        thr = threshold_for_false_alarm_rate(normal, target_far)
        spread = float(np.std(normal)) or 1.0
        a, b = 4.0 / spread, -4.0 * thr / spread  # p = 0.5 at the threshold, ~0.02 one spread below
        if defect.size >= 2:
            from sklearn.linear_model import LogisticRegression

            x = np.concatenate([normal, defect])[:, None]
            y = np.concatenate([np.zeros(normal.size), np.ones(defect.size)])
            lr = LogisticRegression(C=10.0, class_weight="balanced").fit((x - thr) / spread, y)
            slope = float(lr.coef_[0, 0]) / spread
            if slope > 0:  # Platt curve only when scores do rise with defects
                a, b = slope, float(lr.intercept_[0]) - slope * thr
        return cls(threshold=thr, target_far=target_far, a=a, b=b, n_normal=int(normal.size),
                   n_defect=int(defect.size))

    def probability(self, scores: np.ndarray | float) -> np.ndarray:
        z = self.a * np.asarray(scores, dtype=np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def decide(self, scores: np.ndarray | float) -> np.ndarray:
        """True = reject (defect) where the score exceeds the line threshold."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def with_threshold(self, threshold: float, target_far: float | None = None) -> Calibrator:
        return Calibrator(threshold=float(threshold), target_far=self.target_far if target_far is None
                          else target_far, a=self.a, b=self.b, n_normal=self.n_normal, n_defect=self.n_defect)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibrator:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
