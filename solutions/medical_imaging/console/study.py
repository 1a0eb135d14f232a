"""Read a study: slice viewer with window/level, the AI draft beside the editor, similar prior cases,
sign-off (role radiologist), addenda, report history and SR/text/PDF export."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
from sqlalchemy import select

from core.console import audit, model_status_panel, require_user
from core.db import session_scope
from core.errors import VerticalsError
from solutions.medical_imaging import dicom_io, workflow
from solutions.medical_imaging.console.common import (
    SOLUTION,
    STUDY_KEY,
    get_reporter,
    list_studies,
    load_series,
)
from solutions.medical_imaging.orm import Series, Study

user = require_user("radiologist")
rows = list_studies()
if not rows:
    st.info("No studies yet: upload one first.")
    st.stop()
uids = [r["study_uid"] for r in rows]
current = st.session_state.get(STUDY_KEY)
uid = st.selectbox("Study", uids, index=uids.index(current) if current in uids else 0,
                   format_func=lambda u: next(f"{r['patient']} {r['modality']} {r['status']} ({u[-12:]})"
                                              for r in rows if r["study_uid"] == u))
st.session_state[STUDY_KEY] = uid
with session_scope() as s:
    study = s.scalar(select(Study).where(Study.study_uid == uid))
    series = [(x.id, f"{x.modality} {x.plane} ({x.n_instances} images)") for x in
              s.scalars(select(Series).where(Series.study_id == study.id))]
    info = {"status": study.status, "error": study.error, "history": study.history, "modality": study.modality}
st.title(f"Study {uid[-16:]}")
st.caption(f"status **{info['status']}** · modality {info['modality']} · history: {info['history'] or 'none'}")
if info["error"]:
    st.warning(f"Some files of this study could not be used: {info['error']}")

view, report = st.columns([1, 1])
with view:
    st.subheader("Viewer")
    if not series:
        st.error("No readable images in this study.")
    else:
        sid = st.selectbox("Series", [x[0] for x in series], format_func=dict(series).get)
        vol, hint = load_series(sid)
        z = st.slider("Slice", 1, len(vol), (len(vol) + 1) // 2) - 1 if len(vol) > 1 else 0
        img = vol[z]
        if hint["modality"] == "CT":
            presets = ["header", *dicom_io.CT_WINDOWS] if "header_window" in hint else list(dicom_io.CT_WINDOWS)
            preset = st.selectbox("Window preset", presets, index=presets.index("soft tissue"))
            center, width = hint["header_window"] if preset == "header" else dicom_io.CT_WINDOWS[preset]
        else:
            center, width = dicom_io.auto_window(img)
            st.caption("MR auto-window (1st-99th percentile)")
        center = st.number_input("Level", value=float(center))
        width = st.number_input("Width", value=float(width), min_value=1.0)
        st.image(dicom_io.apply_window(img, center, width), caption=f"slice {z + 1}/{len(vol)}", clamp=True)

with report:
    st.subheader("Report")
    ready = model_status_panel(SOLUTION)
    history = workflow.report_history(uid)
    drafts = [v for v in history if v.kind == "ai_draft"]
    signed = any(v.signed for v in history)
    if not drafts and series and ready and st.button("Draft with AI"):
        try:
            workflow.draft_study(uid, get_reporter())
            audit("report.draft.request", target=uid, solution=SOLUTION)
            st.rerun()
        except VerticalsError as e:
            st.error(str(e))
    latest = history[-1] if history else None
    if drafts:
        d = drafts[-1].details
        st.markdown(f"**AI draft** (v{drafts[-1].version}): modality {d.get('modality')} "
                    f"({d.get('modality_conf', 0):.0%}), region {d.get('region')} ({d.get('region_conf', 0):.0%}), "
                    f"abnormal {d.get('abnormal_prob', 0):.0%}, category {d.get('category')} "
                    f"({d.get('category_conf', 0):.0%})")
        st.info(drafts[-1].findings)
    if not signed:
        findings = st.text_area("Findings", value=latest.findings if latest else "", height=180, key=f"f-{uid}")
        impression = st.text_area("Impression", value=latest.impression if latest else "", height=120,
                                  key=f"i-{uid}")
        c1, c2 = st.columns(2)
        if c1.button("Save edit"):
            try:
                workflow.save_edit(uid, user, findings, impression)
                st.success("saved")
                st.rerun()
            except VerticalsError as e:
                st.error(str(e))
        if c2.button("Sign report", type="primary"):
            try:
                workflow.sign_report(uid, user, findings, impression)
                st.success("signed")
                st.rerun()
            except VerticalsError as e:
                st.error(str(e))
    else:
        final = [v for v in history if v.signed][-1]
        st.success(f"Signed by {final.author} (version {final.version}); signed reports are immutable.")
        st.text(f"FINDINGS:\n{final.findings}\n\nIMPRESSION:\n{final.impression}")
        add = st.text_area("Addendum", key=f"a-{uid}")
        if st.button("Add addendum"):
            try:
                workflow.add_addendum(uid, user, add)
                st.rerun()
            except VerticalsError as e:
                st.error(str(e))
        if st.button("Export DICOM SR, text and PDF"):
            try:
                paths = workflow.export_report(uid)
                audit("report.export.request", target=uid, solution=SOLUTION)
                for kind, p in paths.items():
                    st.download_button(f"Download {kind}", Path(p).read_bytes(), file_name=Path(p).name,
                                       key=f"dl-{kind}")
            except VerticalsError as e:
                st.error(str(e))
    if drafts and drafts[-1].details.get("similar"):
        st.subheader("Similar prior cases")
        for c in drafts[-1].details["similar"]:
            with st.expander(f"{c['diagnosis'] or c['case_id']} (similarity {c['score']:.2f})"):
                st.markdown(f"**Image report:** {c['caption']}")
                st.markdown(f"**Case findings:** {c['findings'][:1200]}")
    if history:
        st.subheader("Report history")
        st.dataframe(pd.DataFrame([{"version": v.version, "kind": v.kind, "author": v.author, "signed": v.signed,
                                    "at": v.created_at.strftime("%Y-%m-%d %H:%M"), "findings": v.findings[:120]}
                                   for v in history]), hide_index=True, use_container_width=True)
