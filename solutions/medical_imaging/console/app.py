"""Medical Imaging radiologist console entry: routing only (each page is its own file)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent

st.set_page_config(page_title="Medical Imaging", layout="wide")
st.navigation([
    st.Page(str(HERE / "worklist.py"), title="Worklist", default=True),
    st.Page(str(HERE / "study.py"), title="Read study"),
    st.Page(str(HERE / "upload.py"), title="Upload"),
]).run()
