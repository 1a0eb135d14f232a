"""Console pages render with real data (streamlit AppTest), and operator actions land in the DB."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from core.db import session_scope

CONSOLE = Path(__file__).resolve().parents[3] / "solutions" / "industrial_qa" / "console"
PAGES = ["live.py", "trends.py", "pareto.py", "threshold.py", "review.py", "models.py"]


@pytest.fixture
def seeded(tmp_home: Path, tiny_mvtec: Path, tiny_config) -> dict:  # noqa: ANN001
    from core.auth import create_user, login
    from solutions.industrial_qa.evaluation import train_line
    from solutions.industrial_qa.orm import Inspection
    from solutions.industrial_qa.service import (
        get_or_create_line,
        heatmap_dir,
        record_model_version,
        save_heat_png,
    )

    version, folder, _ = train_line(tiny_mvtec, "line-c", tiny_config)
    mv = record_model_version("line-c", version, folder)
    line_id = get_or_create_line("line-c")
    imgs = sorted((tiny_mvtec / "test").rglob("*.jpg"))
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.UTC)
    with session_scope() as s:
        for k, p in enumerate(imgs):
            prob = float(rng.random())
            row = Inspection(image_id=f"line-c:{k}", line_id=line_id, image_path=str(p), status="done",
                             score=prob * 3, probability=prob, decision="reject" if prob > 0.5 else "accept",
                             defect_type="crack" if prob > 0.5 else None, model_version_id=mv, latency_ms=20.0,
                             created_at=now - dt.timedelta(minutes=7 * k))
            s.add(row)
            s.flush()
            row.heatmap_path = str(save_heat_png(rng.random((64, 48)), heatmap_dir() / f"{row.id}.png"))
        s.add(Inspection(image_id="line-c:bad", line_id=line_id, image_path="/nope.png", status="failed",
                         error="not a readable image"))
    create_user("op1", "operator-password-1", "operator")
    return {"token": login("op1", "operator-password-1")}


def _page(name: str, token: str | None):  # noqa: ANN202
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(CONSOLE / name), default_timeout=120)
    if token:
        at.session_state["verticals_token"] = token
    return at.run()


@pytest.mark.parametrize("page", PAGES)
def test_pages_render_for_an_operator(seeded: dict, page: str) -> None:
    at = _page(page, seeded["token"])
    assert not at.exception, at.exception
    assert at.title and at.title[0].value
    assert not at.error or page == "live.py"  # live shows the failed inspection as an error card


def test_pages_require_sign_in(seeded: dict) -> None:
    at = _page("live.py", None)
    assert not at.exception
    assert any(h.value == "Sign in" for h in at.subheader)


def test_review_and_threshold_actions(seeded: dict) -> None:
    from solutions.industrial_qa.orm import ModelVersion, Review

    at = _page("review.py", seeded["token"])
    confirm = [b for b in at.button if b.key and b.key.startswith("confirm-")][0]
    confirm.click().run()
    assert not at.exception
    with session_scope() as s:
        reviews = list(s.scalars(select(Review)))
    assert len(reviews) == 1 and reviews[0].verdict == "confirm" and reviews[0].reviewer == "op1"

    at = _page("threshold.py", seeded["token"])
    [b for b in at.button if b.label.startswith("Save threshold")][0].click().run()
    assert not at.exception
    with session_scope() as s:
        active = s.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))
    assert active.threshold == pytest.approx(at.slider[1].value)


def test_queue_training_rejects_a_bad_backbone_without_queueing(seeded: dict, tmp_path: Path) -> None:
    from core.jobs import Job

    notes = tmp_path / "weights.txt"
    notes.write_text("not a checkpoint")
    at = _page("models.py", seeded["token"])
    data, backbone = at.text_input[0], at.text_input[1]
    data.input(str(tmp_path))
    backbone.input(str(notes))
    [b for b in at.button if b.label == "Queue training"][0].click().run()
    assert not at.exception
    assert any("backbone checkpoint not usable" in e.value for e in at.error)
    with session_scope() as s:
        assert not list(s.scalars(select(Job).where(Job.kind == "train")))


def test_app_routes_only() -> None:
    src = (CONSOLE / "app.py").read_text()
    assert "st.navigation" in src and all(p in src for p in PAGES)
