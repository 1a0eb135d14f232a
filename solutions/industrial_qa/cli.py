"""``verticals industrial-qa ...``: train, inspect, evaluate and watch a drop folder.

Heavy libraries (torch) are imported inside the commands so ``verticals --help`` stays fast.
``evaluate --json`` prints exactly one JSON object as the last stdout line; progress goes to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from core.errors import DataError

BACKBONE_HELP = ("torchvision-layout ImageNet ResNet-18/34/50 or Wide-ResNet-50-2 state dict (.pth/.pt/"
                 ".safetensors) used frozen as the feature extractor instead of self-supervised training.")

app = typer.Typer(help="Industrial QA: defect detection on production lines (MVTec AD layout data).",
                  no_args_is_help=True)


def _config(steps: int | None, size: int | None, coreset: int | None, far: float | None,
            fusion: str | None = None, backbone: Path | None = None):  # noqa: ANN202
    from solutions.industrial_qa.detector import DetectorConfig

    cfg = DetectorConfig()
    if backbone is not None:
        cfg.use_backbone(backbone)  # fusion knn unless --fusion says otherwise
    if fusion is not None:
        if fusion not in ("knn", "seg", "sum"):
            raise DataError("--fusion must be knn, seg or sum")
        if backbone is not None and fusion == "seg":
            raise DataError("--fusion seg needs the self-supervised pretext head; with --backbone use knn")
        cfg.fusion = fusion  # type: ignore[assignment]
    if steps is not None:
        cfg.features.steps = steps
    if size is not None:
        if size < 64 or size % 16:
            raise DataError("--size must be a multiple of 16 and at least 64")
        cfg.features.image_size = size
    if coreset is not None:   # patches per tile of the per-position bank (the global bank's size when it is off)
        if cfg.local_block > 0:
            cfg.local_bank = coreset
        else:
            cfg.coreset_size = coreset
    if far is not None:
        if not 0 < far < 1:
            raise DataError("--target-far must be in (0, 1)")
        cfg.target_far = far
    return cfg


def _threads() -> None:
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    from solutions.industrial_qa.detector import keep_freed_heap

    keep_freed_heap()  # scoring reuses freed buffers instead of page-faulting fresh ones (1.3x)


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="MVTec-layout folder (uses train/good) or a folder of good images.")],
    line: Annotated[str, typer.Option("--line", help="Production line / product name.")],
    steps: Annotated[int | None, typer.Option(help="Self-supervised training steps.")] = None,
    size: Annotated[int | None, typer.Option(help="Model input size (square).")] = None,
    coreset: Annotated[int | None, typer.Option(help="Memory-bank size (patches per tile of the per-position bank).")] = None,
    target_far: Annotated[float | None, typer.Option(help="Target false-alarm rate for the threshold.")] = None,
    backbone: Annotated[Path | None, typer.Option(help=BACKBONE_HELP)] = None,
) -> None:
    """Train a detector on normal images and store it as the line's next model version."""
    _threads()
    from solutions.industrial_qa.evaluation import tqdm_progress, train_line

    cb, close = tqdm_progress(f"train {line}")
    try:
        version, folder, det = train_line(data, line, _config(steps, size, coreset, target_far, None, backbone), cb)
    finally:
        close()
    _record_version(line, version, folder, det)
    typer.echo(json.dumps({"line": line, "version": version, "path": str(folder),
                           "threshold": det.calibrator.threshold if det.calibrator else None,
                           "train_seconds": round(det.info["train_seconds"], 1)}))


def _record_version(line: str, version: str, folder: Path, det: object) -> None:
    """Mirror the new version into the DB when a database is reachable (the CLI works without one)."""
    try:
        from solutions.industrial_qa.service import record_model_version

        record_model_version(line, version, folder)
    except Exception as e:  # no DB here: weights on disk are the source of truth
        typer.echo(f"note: model stored on disk; not recorded in the database ({type(e).__name__})", err=True)


@app.command()
def inspect(
    images: Annotated[list[Path], typer.Argument(help="Image files to inspect.")],
    line: Annotated[str, typer.Option("--line")],
    heatmaps: Annotated[Path | None, typer.Option(help="Folder to write <stem>_heatmap.png overlays.")] = None,
) -> None:
    """Inspect part images: one JSON line per image (score, probability, decision, latency)."""
    _threads()
    from solutions.industrial_qa import store
    from solutions.industrial_qa.detector import AnomalyDetector
    from solutions.industrial_qa.service import save_heatmap

    det = AnomalyDetector.load(store.active_path(line))
    failed = 0
    for p in images:
        try:
            r = det.inspect_images([p])[0]
        except DataError as e:
            failed += 1
            typer.echo(json.dumps({"image": str(p), "status": "failed", "error": str(e)}))
            continue
        row = {"image": str(p), "status": "done", "score": r.score, "probability": r.probability,
               "decision": "reject" if r.reject else "accept", "defect_type": r.defect_type,
               "latency_ms": round(r.latency_ms, 1), "heatmap_shape": list(r.heatmap.shape)}
        if heatmaps is not None:
            row["heatmap"] = str(save_heatmap(p, r.heatmap, heatmaps / f"{p.stem}_heatmap.png"))
        typer.echo(json.dumps(row))
    if failed == len(images):
        raise DataError(f"none of the {len(images)} image(s) could be read")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="MVTec-layout folder.")],
    few_shot: Annotated[int, typer.Option("--few-shot", help="Labelled test defects used for refinement.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for the few-shot draw.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")] = False,
    line: Annotated[str | None, typer.Option(help="Store/reuse the model under this line name.")] = None,
    steps: Annotated[int | None, typer.Option(help="Self-supervised training steps.")] = None,
    size: Annotated[int | None, typer.Option(help="Model input size (square).")] = None,
    coreset: Annotated[int | None, typer.Option(help="Memory-bank size (patches per tile of the per-position bank).")] = None,
    target_far: Annotated[float | None, typer.Option(help="Target false-alarm rate.")] = None,
    fusion: Annotated[str | None, typer.Option(help="Anomaly map: knn, seg or sum.")] = None,
    speed: Annotated[bool, typer.Option(help="Also measure images/s and p95 latency.")] = True,
    speed_images: Annotated[int, typer.Option(help="Images timed for throughput (a third for latency).")] = 128,
    few_shot_threshold: Annotated[str, typer.Option(
        help="With --few-shot: 'balanced' (threshold maximising balanced accuracy on the CV scores of "
             "the shots + held-out normals) or 'far' (the --target-far quantile of the normals).")] = "balanced",
    backbone: Annotated[Path | None, typer.Option(help=BACKBONE_HELP)] = None,
) -> None:
    """Fit on DIR/train/good (trains when no matching stored model), score DIR/test, print metrics."""
    _threads()
    from solutions.industrial_qa.evaluation import evaluate as run_eval
    from solutions.industrial_qa.evaluation import tqdm_progress

    cb, close = tqdm_progress("train")
    try:
        report = run_eval(data, few_shot, seed, _config(steps, size, coreset, target_far, fusion, backbone), line, cb, speed,
                          max(8, speed_images), few_shot_threshold)
    finally:
        close()
    _print_report(report, as_json)


def _print_report(report: dict, as_json: bool) -> None:
    """The report as one JSON line on stdout, and readable on stderr unless ``--json``."""
    if not as_json:
        for k, v in report.items():
            typer.echo(f"{k:32s} {v}", err=True)
    sys.stdout.write(json.dumps(report) + "\n")


@app.command()
def validate(
    data: Annotated[Path, typer.Option("--data", help="MVTec-layout folder (uses train/good only) or a folder of good images.")],
    n_val: Annotated[int, typer.Option("--n-val", help="Seeded normals held out of fitting for validation.")] = 80,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")] = False,
    steps: Annotated[int | None, typer.Option(help="Self-supervised training steps.")] = None,
    size: Annotated[int | None, typer.Option(help="Model input size (square).")] = None,
    coreset: Annotated[int | None, typer.Option(help="Memory-bank size (patches per tile of the per-position bank).")] = None,
    fusion: Annotated[str | None, typer.Option(help="Anomaly map: knn, seg or sum.")] = None,
) -> None:
    """Choose settings without test images: fit on train/good minus N held-out normals, score those
    clean and with synthetic defects of a generator the training never sees; print the metrics."""
    _threads()
    from solutions.industrial_qa.evaluation import tqdm_progress
    from solutions.industrial_qa.validation import validate as run_validation

    cb, close = tqdm_progress("validate")
    try:
        report = run_validation(data, _config(steps, size, coreset, None, fusion), n_val=n_val, on_progress=cb)
    finally:
        close()
    _print_report(report, as_json)


@app.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="Camera drop folder to watch for new images.")],
    line: Annotated[str, typer.Option("--line")],
    interval: Annotated[float, typer.Option(help="Seconds between scans.")] = 1.0,
    once: Annotated[bool, typer.Option(help="Scan once and exit (cron / tests).")] = False,
) -> None:
    """Queue every new image in FOLDER for inspection on the `industrial_qa` worker queue."""
    from solutions.industrial_qa.service import watch_folder

    n = watch_folder(folder, line, interval=interval, once=once,
                     echo=lambda msg: typer.echo(msg, err=True))
    typer.echo(json.dumps({"queued": n}))
