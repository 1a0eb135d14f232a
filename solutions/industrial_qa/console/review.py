"""Review queue: an operator confirms or overturns decisions; the labels feed few-shot refinement."""

from __future__ import annotations

import streamlit as st

from core.console import audit, model_status_panel, require_user
from solutions.industrial_qa.console.common import SOLUTION, inspections_df, overlay_image, pick_line

user = require_user("operator")
st.title("Review queue")
model_status_panel(SOLUTION)
line = pick_line()
if line:
    from solutions.industrial_qa.service import add_review

    df = inspections_df(line)
    queue = df[(df.status == "done") & df.review_label.isna()].copy()
    order = st.sidebar.radio("Order", ["most uncertain first", "rejects first", "newest first"])
    if order == "most uncertain first":
        queue = queue.iloc[(queue.probability - 0.5).abs().argsort()]
    elif order == "rejects first":
        queue = queue.sort_values(["decision", "probability"], ascending=[False, False])
    st.caption(f"{len(queue)} part(s) awaiting review; {int(df.review_label.notna().sum())} reviewed.")
    if queue.empty:
        st.success("Nothing to review.")
    for _, row in queue.head(10).iterrows():
        with st.container(border=True):
            left, right = st.columns([1, 2])
            try:
                left.image(overlay_image(row.image_path, row.heatmap_path), use_container_width=True)
            except Exception as e:
                left.warning(f"image unavailable: {e}")
            right.markdown(f"**#{row.id}** model says **{row.decision}** (p={row.probability:.2f}, "
                           f"score {row.score:.3f})" + (f", type {row.defect_type}" if row.defect_type else ""))
            dtype = right.text_input("Defect type (if defective)", value=row.defect_type or "",
                                     key=f"type-{row.id}")
            note = right.text_input("Note", key=f"note-{row.id}")
            b1, b2 = right.columns(2)
            model_says_defect = row.decision == "reject"
            if b1.button("Confirm", key=f"confirm-{row.id}"):
                label = "defect" if model_says_defect else "good"
                add_review(int(row.id), user.username, "confirm", label, dtype or None, note)
                audit("review", target=str(row.id), detail={"verdict": "confirm", "label": label}, solution=SOLUTION)
                st.rerun()
            if b2.button("Overturn", key=f"overturn-{row.id}"):
                label = "good" if model_says_defect else "defect"
                add_review(int(row.id), user.username, "overturn", label, dtype or None, note)
                audit("review", target=str(row.id), detail={"verdict": "overturn", "label": label}, solution=SOLUTION)
                st.rerun()
