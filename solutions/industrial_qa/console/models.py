"""Model registry per line: versions, which is active, metrics; retrain or refine from reviews."""

from __future__ import annotations

import streamlit as st

from core.console import audit, model_status_panel, require_user
from solutions.industrial_qa.console.common import SOLUTION, pick_line, training_request_problem, versions_df

require_user("operator")
st.title("Model registry")
model_status_panel(SOLUTION)
line = pick_line()
if line:
    from solutions.industrial_qa import store
    from solutions.industrial_qa.service import sync_versions

    try:
        sync_versions(line)
    except Exception as e:  # a damaged version folder must not take the page down
        st.warning(f"could not read every stored version: {e}")
    df = versions_df(line)
    if df.empty:
        st.info("No model version for this line yet.")
    else:
        st.dataframe(df.drop(columns=["id"]), use_container_width=True, hide_index=True)
        choice = st.selectbox("Version", list(df.version))
        if st.button("Make active"):
            from solutions.industrial_qa.service import record_model_version

            store.set_active(line, choice)
            record_model_version(line, choice, store.line_dir(line) / choice)
            audit("activate_model", target=line, detail={"version": choice}, solution=SOLUTION)
            st.success(f"{choice} is now active for {line}")
            st.rerun()
    with st.expander("Train a new version"):
        data = st.text_input("Data folder (MVTec layout or a folder of good images)")
        backbone = st.text_input(
            "ImageNet backbone checkpoint (optional)",
            help="A torchvision-layout ResNet-18/34/50 or Wide-ResNet-50-2 state dict (.pth, .pt or "
                 ".safetensors) on this machine. It replaces the self-supervised feature net; leave empty "
                 "to train the self-supervised net on the line's own images.").strip()
        if st.button("Queue training") and data:
            problem = training_request_problem(data, backbone)
            if problem:
                st.error(problem)
            else:
                from core.jobs import claim_job
                from core.queue import app

                key = f"train:industrial_qa.train_line:{line}"
                kwargs = {"job_key": key, "line": line, "data": data} | ({"backbone": backbone} if backbone else {})
                if claim_job(key, kind="train", solution=SOLUTION):
                    app.send_task("industrial_qa.train_line", kwargs=kwargs)
                    audit("train", target=line, detail={"data": data, "backbone": backbone or None}, solution=SOLUTION)
                    st.success("training queued; progress appears at the top of each page")
                else:
                    st.info("a training job for this line is already queued or running")
