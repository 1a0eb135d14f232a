"""Live line view: latest parts with heatmap overlays, and an upload path for ad-hoc images."""

from __future__ import annotations

import hashlib

import streamlit as st

from core.console import audit, model_status_panel, require_user
from core.settings import get_settings
from solutions.industrial_qa.console.common import SOLUTION, inspections_df, overlay_image, pick_line

require_user("operator")
st.title("Live line view")
model_status_panel(SOLUTION)
line = pick_line()
if line:
    with st.expander("Upload part images"):
        files = st.file_uploader("Images", type=["png", "jpg", "jpeg", "bmp", "tif", "tiff"],
                                 accept_multiple_files=True)
        if files and st.button("Inspect uploaded images"):
            from solutions.industrial_qa.service import register_image, submit

            folder = get_settings().files_dir / "industrial_qa" / "uploads" / line
            folder.mkdir(parents=True, exist_ok=True)
            ids = []
            for f in files:
                data = f.getvalue()
                if len(data) > get_settings().max_upload_mb * 2**20:
                    st.error(f"{f.name}: larger than {get_settings().max_upload_mb} MB")
                    continue
                digest = hashlib.sha256(data).hexdigest()[:32]
                path = folder / f"{digest}_{f.name}"
                path.write_bytes(data)
                ids.append(register_image(path, line, image_id=f"{line}:{digest}"))
            submit(ids)
            audit("upload", target=line, detail={"n": len(ids)}, solution=SOLUTION)
            st.success(f"queued {len(ids)} image(s) for inspection")

    df = inspections_df(line, limit=200)
    n = st.sidebar.slider("Parts shown", 4, 48, 12, step=4)
    if df.empty:
        st.info("No inspections yet on this line: drop images into its folder "
                "(`verticals industrial-qa watch FOLDER --line NAME`) or upload some above.")
    else:
        done = df[df.status == "done"]
        c1, c2, c3, c4 = st.columns(4)
        c1.metric("Inspected", len(done))
        c2.metric("Rejected", int((done.decision == "reject").sum()))
        c3.metric("Failed (bad input)", int((df.status == "failed").sum()))
        c4.metric("p95 latency (ms)", f"{done.latency_ms.quantile(0.95):.0f}" if len(done) else "-")
        cols = st.columns(4)
        for k, (_, row) in enumerate(df.head(n).iterrows()):
            with cols[k % 4]:
                if row.status == "done":
                    try:
                        st.image(overlay_image(row.image_path, row.heatmap_path), use_container_width=True)
                    except Exception as e:  # image removed from disk since
                        st.warning(f"image unavailable: {e}")
                    badge = ":red[REJECT]" if row.decision == "reject" else ":green[ACCEPT]"
                    st.markdown(f"#{row.id} {badge} p={row.probability:.2f}"
                                + (f" · {row.defect_type}" if row.defect_type else ""))
                elif row.status == "failed":
                    st.error(f"#{row.id} failed: {row.error}")
                else:
                    st.info(f"#{row.id} {row.status}")
