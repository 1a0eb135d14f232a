"""Threshold tuning: ROC / PR from held-out normals plus operator-reviewed parts, and the false-alarm
rate a threshold implies. Saving sets the line's active model threshold (used by new inspections)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from core.console import audit, model_status_panel, require_user
from solutions.industrial_qa.console.common import SOLUTION, inspections_df, pick_line

require_user("operator")
st.title("Threshold tuning")
model_status_panel(SOLUTION)
line = pick_line()


@st.cache_resource(show_spinner=False)
def _detector(path: str, mtime: float):  # noqa: ANN202
    from pathlib import Path

    from solutions.industrial_qa.detector import AnomalyDetector

    return AnomalyDetector.load(Path(path))


if line:
    from sklearn.metrics import precision_recall_curve, roc_curve

    from solutions.industrial_qa import store
    from solutions.industrial_qa.calibration import false_alarm_rate, threshold_for_false_alarm_rate
    from solutions.industrial_qa.service import set_line_threshold

    if not store.is_ready(line):
        st.info("This line has no trained model yet.")
        st.stop()
    path = store.active_path(line)
    det = _detector(str(path), (path / "detector.json").stat().st_mtime)
    normal = np.array(det.info.get("holdout_scores", []), dtype=float)
    df = inspections_df(line)
    reviewed = df[df.review_label.notna() & df.score.notna()]
    normal_all = np.concatenate([normal, reviewed[reviewed.review_label == "good"].score.to_numpy(float)])
    defect = reviewed[reviewed.review_label == "defect"].score.to_numpy(float)
    st.caption(f"{len(normal)} held-out normal parts from training, {len(reviewed)} operator-reviewed parts "
               f"({len(defect)} confirmed defects).")
    target = st.slider("Target false-alarm rate", 0.001, 0.2, float(det.calibrator.target_far), step=0.001,
                       format="%.3f")
    suggested = threshold_for_false_alarm_rate(normal_all, target)
    lo, hi = float(np.min(normal_all)), float(max(np.max(normal_all), defect.max() if defect.size else 0))
    thr = st.slider("Threshold", lo, hi if hi > lo else lo + 1, float(min(max(suggested, lo), hi)))
    far = false_alarm_rate(normal_all, thr)
    c1, c2, c3 = st.columns(3)
    c1.metric("False-alarm rate at threshold", f"{far:.2%}")
    c2.metric("Recall on confirmed defects", f"{(defect > thr).mean():.1%}" if defect.size else "n/a")
    c3.metric("Threshold for target", f"{suggested:.3f}")
    if defect.size and normal_all.size:
        y = np.concatenate([np.zeros(normal_all.size), np.ones(defect.size)])
        s = np.concatenate([normal_all, defect])
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        a, b = st.columns(2)
        a.subheader("ROC")
        a.line_chart(pd.DataFrame({"recall (TPR)": tpr}, index=pd.Index(fpr, name="false-alarm rate")))
        b.subheader("Precision / recall")
        b.line_chart(pd.DataFrame({"precision": prec}, index=pd.Index(rec, name="recall")))
    else:
        st.info("ROC/PR curves appear once operators have confirmed some defects in the review queue; "
                "until then the threshold is set from the normal-score distribution alone.")
        st.bar_chart(pd.Series(np.histogram(normal_all, bins=30)[0], name="normal parts"))
    if st.button("Save threshold for this line"):
        set_line_threshold(line, thr, target)
        audit("set_threshold", target=line, detail={"threshold": thr, "target_far": target}, solution=SOLUTION)
        st.success(f"threshold {thr:.4f} saved (implied false-alarm rate {far:.2%})")
