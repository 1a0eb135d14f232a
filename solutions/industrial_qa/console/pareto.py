"""Defect-type Pareto: which defect types cause most rejects (operator labels win over the model's)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.console import model_status_panel, require_user
from solutions.industrial_qa.console.common import SOLUTION, inspections_df, pick_line

require_user("operator")
st.title("Defect-type Pareto")
model_status_panel(SOLUTION)
line = pick_line()
if line:
    df = inspections_df(line)
    defects = df[(df.review_label == "defect") | (df.review_label.isna() & (df.decision == "reject"))]
    if defects.empty:
        st.info("No rejected parts on this line yet.")
    else:
        types = defects.review_type.fillna(defects.defect_type).fillna("unclassified")
        counts = types.value_counts().rename_axis("defect type").to_frame("count")
        counts["cumulative %"] = (counts["count"].cumsum() / counts["count"].sum() * 100).round(1)
        st.bar_chart(counts[["count"]])
        st.dataframe(counts, use_container_width=True)
        st.caption("Types come from the few-shot type classifier or the operator's review; "
                   "'unclassified' parts were rejected by a model without labelled types.")
        if len(counts) > 1:
            st.line_chart(pd.DataFrame({"cumulative %": counts["cumulative %"].values}, index=counts.index))
