"""The inspect task through a real Celery worker: end to end into the DB, idempotent, bad images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from core.db import session_scope


def _train_tiny(data: Path, line: str, config) -> str:  # noqa: ANN001
    from solutions.industrial_qa.evaluation import train_line
    from solutions.industrial_qa.service import record_model_version

    version, folder, _ = train_line(data, line, config)
    record_model_version(line, version, folder)
    return version


@pytest.mark.parametrize("embedded_worker", [["industrial_qa"]], indirect=True)
def test_inspect_task_end_to_end_idempotent_and_bad_images(embedded_worker, tiny_mvtec: Path, tiny_config,
                                                           tmp_path: Path) -> None:
    from core.queue import app
    from solutions.industrial_qa.orm import Defect, Inspection
    from solutions.industrial_qa.service import register_image, scan_folder

    _train_tiny(tiny_mvtec, "line-a", tiny_config)
    drop = tmp_path / "drop"
    drop.mkdir()
    goods = sorted((tiny_mvtec / "test" / "good").iterdir())[:2]
    defect = sorted((tiny_mvtec / "test" / "crack").iterdir())[0]
    for p in [*goods, defect]:
        (drop / p.name).write_bytes(p.read_bytes())
    (drop / "corrupt.jpg").write_bytes(goods[0].read_bytes()[:200])
    (drop / "notes.png").write_text("not an image at all")
    Image.new("L", (8000, 6000)).save(drop / "huge.png")

    ids = scan_folder(drop, "line-a", set())
    assert len(ids) == 6
    # files are scanned in name order, so bad images sit between good ones: the worker keeps going
    for i in ids:
        res = app.send_task("industrial_qa.inspect", kwargs={"inspection_id": i})
        res.get(timeout=240, interval=0.05)
    with session_scope() as s:
        rows = {r.image_path.rsplit("/", 1)[-1]: r for r in s.scalars(select(Inspection))}
    assert {n: r.status for n, r in rows.items()} == {
        goods[0].name: "done", goods[1].name: "done", defect.name: "done",
        "corrupt.jpg": "failed", "notes.png": "failed", "huge.png": "failed"}
    assert "not a readable image" in rows["notes.png"].error
    assert "pixels" in rows["huge.png"].error
    assert rows["corrupt.jpg"].error
    for name in (goods[0].name, defect.name):
        r = rows[name]
        assert r.decision in ("accept", "reject") and 0 <= r.probability <= 1 and r.model_version_id
        heat = np.asarray(Image.open(r.heatmap_path))
        with Image.open(drop / name) as im:
            assert heat.shape == (im.size[1], im.size[0])  # heatmap at input resolution

    # idempotent: the same image again (dropped twice, or the task re-delivered) is the same row
    first = rows[defect.name].id
    assert register_image(drop / defect.name, "line-a") == first
    (drop / "copy_of_defect.jpg").write_bytes((drop / defect.name).read_bytes())
    assert scan_folder(drop, "line-a", {str(p) for p in drop.iterdir() if p.name != "copy_of_defect.jpg"}) == [first]
    app.send_task("industrial_qa.inspect", kwargs={"inspection_id": first}).get(timeout=240, interval=0.05)
    app.send_task("industrial_qa.inspect_batch",
                  kwargs={"inspection_ids": [first, rows["notes.png"].id]}).get(timeout=240, interval=0.05)
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Inspection)) == 6
        n_def = s.scalar(select(func.count()).select_from(Defect).where(Defect.inspection_id == first))
        again = s.get(Inspection, first)
    assert again.status == "done" and again.score == pytest.approx(rows[defect.name].score, rel=1e-5)
    from solutions.industrial_qa.service import run_inspections

    run_inspections([first])
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Defect).where(Defect.inspection_id == first)) == n_def


@pytest.mark.parametrize("embedded_worker", [["industrial_qa"]], indirect=True)
def test_worker_inspects_with_a_user_backbone_model(embedded_worker, tiny_mvtec: Path, tiny_config,
                                                    tmp_path: Path) -> None:
    """A --backbone model is self-contained: the worker rebuilds the same frozen ResNet from the
    stored model even after the user's checkpoint file is gone."""
    import torch

    from core.queue import app
    from solutions.industrial_qa import store
    from solutions.industrial_qa.backbone import BackboneNet
    from solutions.industrial_qa.detector import AnomalyDetector
    from solutions.industrial_qa.orm import Inspection
    from solutions.industrial_qa.service import scan_folder

    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    torch.save(BackboneNet("resnet18").body.state_dict(), ckpt)
    _train_tiny(tiny_mvtec, "line-bb", tiny_config.use_backbone(ckpt))
    ckpt.unlink()
    local = AnomalyDetector.load(store.active_path("line-bb"))
    assert isinstance(local.net, BackboneNet) and local.config.fusion == "knn"
    drop = tmp_path / "drop"
    drop.mkdir()
    imgs = [sorted((tiny_mvtec / "test" / "good").iterdir())[0], sorted((tiny_mvtec / "test" / "crack").iterdir())[0]]
    for p in imgs:
        (drop / p.name).write_bytes(p.read_bytes())
    ids = scan_folder(drop, "line-bb", set())
    app.send_task("industrial_qa.inspect_batch", kwargs={"inspection_ids": ids}).get(timeout=240, interval=0.05)
    expected = {p.name: r.score for p, r in zip(imgs, local.inspect_images([drop / p.name for p in imgs]), strict=True)}
    with session_scope() as s:
        rows = {r.image_path.rsplit("/", 1)[-1]: (r.status, r.score) for r in s.scalars(select(Inspection))}
    for name, score in expected.items():
        assert rows[name][0] == "done" and rows[name][1] == pytest.approx(score, rel=1e-4, abs=1e-4)
