"""Customer service agent console entry: routing only (each page is its own file)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent

st.set_page_config(page_title="Customer service", layout="wide")
st.navigation([
    st.Page(str(HERE / "conversations.py"), title="Conversations", default=True),
    st.Page(str(HERE / "simulator.py"), title="Simulator"),
    st.Page(str(HERE / "kb.py"), title="Knowledge base"),
    st.Page(str(HERE / "kpis.py"), title="KPIs"),
]).run()
