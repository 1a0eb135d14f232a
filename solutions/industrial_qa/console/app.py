"""Industrial QA console entry: routing only (each page is its own file)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent

st.set_page_config(page_title="Industrial QA", layout="wide")
st.navigation([
    st.Page(str(HERE / "live.py"), title="Live line view", default=True),
    st.Page(str(HERE / "trends.py"), title="Trends"),
    st.Page(str(HERE / "pareto.py"), title="Defect Pareto"),
    st.Page(str(HERE / "threshold.py"), title="Threshold tuning"),
    st.Page(str(HERE / "review.py"), title="Review queue"),
    st.Page(str(HERE / "models.py"), title="Model registry"),
]).run()
