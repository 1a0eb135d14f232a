"""Defect rate and score trends over time for a line."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.console import model_status_panel, require_user
from solutions.industrial_qa.console.common import SOLUTION, inspections_df, pick_line

require_user("operator")
st.title("Trends")
model_status_panel(SOLUTION)
line = pick_line()
if line:
    df = inspections_df(line)
    df = df[df.status == "done"]
    if df.empty:
        st.info("No finished inspections on this line yet.")
    else:
        freq = st.sidebar.selectbox("Bucket", ["1min", "15min", "1h", "1D"], index=2)
        df = df.assign(created_at=pd.to_datetime(df.created_at, utc=True),
                       rejected=(df.decision == "reject").astype(float)).set_index("created_at").sort_index()
        g = df.resample(freq)
        agg = pd.DataFrame({"defect rate": g.rejected.mean(), "parts": g.rejected.count(),
                            "mean score": g.score.mean(), "p95 score": g.score.quantile(0.95)}).dropna()
        st.subheader("Defect rate")
        st.line_chart(agg[["defect rate"]])
        st.subheader("Parts inspected")
        st.bar_chart(agg[["parts"]])
        st.subheader("Anomaly score")
        st.line_chart(agg[["mean score", "p95 score"]])
