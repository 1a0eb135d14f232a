"""Worklist: every study with its status, modality and priority; open one to read it."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.console import model_status_panel, require_user
from solutions.medical_imaging.console.common import SOLUTION, STUDY_KEY, list_studies

user = require_user("radiologist")
st.title("Worklist")
model_status_panel(SOLUTION)

rows = list_studies()
if not rows:
    st.info("No studies yet. Upload DICOM on the Upload page or run `verticals medical-imaging ingest PATH`.")
    st.stop()
status = st.multiselect("Status", sorted({r["status"] for r in rows}), default=[])
shown = [r for r in rows if not status or r["status"] in status]
order = {"stat": 0, "urgent": 1, "routine": 2}
shown.sort(key=lambda r: (order.get(r["priority"], 3), r["status"] in ("signed", "amended")))
st.dataframe(pd.DataFrame(shown), hide_index=True, use_container_width=True)
choice = st.selectbox("Open study", [r["study_uid"] for r in shown], key="worklist_pick",
                      format_func=lambda u: next(f"{r['patient']} {r['modality']} {r['status']} ({u[-12:]})"
                                                 for r in shown if r["study_uid"] == u))
if st.button("Read this study", type="primary"):
    st.session_state[STUDY_KEY] = choice
    st.switch_page("study.py")
