"""``verticals medical-imaging ...``: ingest, train, draft, evaluate, export, bench.

Heavy libraries are imported inside the commands so ``verticals --help`` stays fast. Evaluation and
benchmark commands print one JSON object as the last line of stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from core.errors import DataError

app = typer.Typer(help="Medical imaging: DICOM in, de-identified; AI report drafts; signed DICOM SR out.",
                  no_args_is_help=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ensure_model(data: Path | None = None) -> None:
    """Train the default reporter when none is stored (progress bars on stderr)."""
    from core.jobs import progress
    from core.settings import get_settings
    from solutions.medical_imaging.pipeline import default_model_dir, model_ready, train_reporter

    if model_ready():
        return
    root = data or get_settings().data_root / "medical" / "medpix2"
    _log(f"no trained reporter under {default_model_dir()}: training on {root} (train split) first")
    train_reporter(root, default_model_dir(), progress=progress, log=_log)


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A DICOM file, folder or zip; NIfTI/NRRD volumes and PNG key images too.")],
    history: Annotated[str, typer.Option(help="Clinical history for the study (used by the draft).")] = "",
    draft: Annotated[bool, typer.Option(help="Draft a report for each ingested study (needs the model).")] = False,
) -> None:
    """De-identify and store every image under PATH; unreadable files are listed, the rest is kept."""
    from infra.migrate import upgrade
    from solutions.medical_imaging.workflow import ingest_path

    upgrade("heads")
    t0 = time.perf_counter()
    summary = ingest_path(path, history=history).as_dict()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    for e in summary["errors"]:
        _log(f"skipped: {e['reason']}")
    if draft and summary["study_uids"]:
        from solutions.medical_imaging.tasks import cached_reporter
        from solutions.medical_imaging.workflow import draft_study

        _ensure_model()
        rep = cached_reporter()
        summary["drafts"] = {}
        for uid in summary["study_uids"]:
            try:
                summary["drafts"][uid] = draft_study(uid, rep).findings
            except DataError as e:
                summary["drafts"][uid] = f"error: {e}"
    typer.echo(json.dumps(summary))


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="A MedPix-layout folder (images_train.jsonl, cases_train.jsonl, images/).")],
    enc_epochs: Annotated[int, typer.Option(help="Image-encoder epochs.")] = 30,
    dec_epochs: Annotated[int, typer.Option(help="Report-decoder epochs.")] = 15,
    out: Annotated[Path | None, typer.Option(help="Model folder (default: VERTICALS_HOME/models/medical_imaging/reporter).")] = None,
) -> None:
    """Train the dual-encoder reporter on the train split of DATA."""
    from core.jobs import progress
    from solutions.medical_imaging.pipeline import default_model_dir, train_reporter

    res = train_reporter(data, out or default_model_dir(), enc_epochs=enc_epochs, dec_epochs=dec_epochs,
                         progress=progress, log=_log)
    typer.echo(json.dumps(res))


@app.command()
def draft(
    target: Annotated[str, typer.Argument(help="A stored study UID, or an image/DICOM file or folder.")],
    history: Annotated[str, typer.Option(help="Clinical history.")] = "",
    plane: Annotated[str, typer.Option(help="Plane for PNG key images: axial, coronal, sagittal, other.")] = "other",
    force: Annotated[bool, typer.Option(help="Re-draft a stored study even when a draft exists.")] = False,
) -> None:
    """Draft findings + impression for a study or an image (prints the draft and a JSON line)."""
    import numpy as np

    from solutions.medical_imaging import dicom_io
    from solutions.medical_imaging.data import (
        NATIVE_SIZE,
        load_image_array,
        load_native_array,
        to_model_input,
    )
    from solutions.medical_imaging.tasks import cached_reporter

    _ensure_model()
    rep = cached_reporter()
    t0 = time.perf_counter()
    p = Path(target)
    if not p.exists():
        from infra.migrate import upgrade
        from solutions.medical_imaging.workflow import draft_study

        upgrade("heads")
        v = draft_study(target, rep, force=force)
        out = {"study_uid": target, "version": v.version, "findings": v.findings, "impression": v.impression,
               "details": v.details}
    else:
        if p.is_file() and dicom_io._is_key_image(p.name):
            img, pl, hint = load_image_array(p, rep.cfg.image_size), plane, None
            full = load_native_array(p)
        else:
            scan = dicom_io.scan(p)
            if not scan.instances:
                reasons = "; ".join(e.reason for e in scan.errors[:3]) or "no DICOM images found"
                raise DataError(f"{p}: nothing to draft from ({reasons})")
            study = scan.studies[0]
            se = max(study.series.values(), key=lambda s: len(s.instances))
            vol = se.volume()
            mid = vol[len(vol) // 2]
            ds = se.instances[0].dataset
            windowed = dicom_io.apply_window(mid, *dicom_io.default_window(ds, mid))
            img, full = to_model_input(windowed, rep.cfg.image_size), to_model_input(windowed, NATIVE_SIZE, canvas=False)
            pl, hint = se.plane, se.modality if se.modality in ("CT", "MR") else None
        d = rep.draft_batch(np.asarray(img)[None], [history], [pl], [hint], full_images=[full])[0]
        out = {"findings": d.findings, "impression": d.impression, "modality": d.modality, "region": d.region,
               "similar": [{k: s[k] for k in ("case_id", "diagnosis", "score")} for s in d.similar]}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    typer.echo(f"FINDINGS:\n{out['findings']}\n\nIMPRESSION:\n{out['impression']}\n", err=True)
    typer.echo(json.dumps(out, default=str))


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="A MedPix-layout folder.")],
    split: Annotated[str, typer.Option(help="dev or test.")] = "dev",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON line.")] = False,
) -> None:
    """Draft vs reference captions on SPLIT, with the retrieval and template baselines in the same run."""
    from solutions.medical_imaging.data import load_medpix
    from solutions.medical_imaging.pipeline import evaluate as run_eval

    if split not in ("dev", "test"):
        raise DataError(f"--split must be dev or test, not {split!r}")
    load_medpix(data, split)  # fail fast on a bad layout before any training
    _ensure_model(data)
    res = run_eval(data, split, log=_log)
    if not as_json:
        for k, v in res.items():
            _log(f"{k}: {v}")
    typer.echo(json.dumps(res))


@app.command()
def oof(
    out: Annotated[Path, typer.Option(help="Folder for the fold files (fold<i>.npz, fold<i>.safetensors).")],
    data: Annotated[Path | None, typer.Option(help="A MedPix-layout folder (its train split only is read).")] = None,
    fold: Annotated[list[int] | None, typer.Option(help="Fold(s) to run (default: all).")] = None,
    folds: Annotated[int, typer.Option(help="Number of case-disjoint folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the fold split and of training.")] = 0,
    report: Annotated[bool, typer.Option("--report", help="Only score the stored folds (shipped fusion weights).")] = False,
) -> None:
    """Case-disjoint out-of-fold harness on TRAIN: a CNN + side models per fold; prints OOF accuracies."""
    from core.settings import get_settings
    from solutions.medical_imaging import oof as harness

    root = data or get_settings().data_root / "medical" / "medpix2"
    if not report:
        _log(f"{harness.prepare_cache(root, out)} texts embedded")
        for i in fold if fold else range(folds):
            harness.run_fold(root, out, i, folds, seed, log=_log)
    typer.echo(json.dumps(harness.score(harness.collect(root, out))))


@app.command("export")
def export_cmd(
    study_uid: Annotated[str, typer.Argument(help="A study with a signed report.")],
    out: Annotated[Path | None, typer.Option(help="Folder for sr_v<N>.dcm, report_v<N>.txt/.pdf.")] = None,
) -> None:
    """Export the signed report as DICOM SR (Comprehensive SR), text and PDF."""
    from solutions.medical_imaging.workflow import export_report

    typer.echo(json.dumps(export_report(study_uid, out)))


@app.command()
def bench(
    slices: Annotated[int, typer.Option(help="Slices in the synthetic-copy series used for ingest speed.")] = 200,
    studies: Annotated[int, typer.Option(help="Studies to draft for draft latency.")] = 10,
) -> None:
    """Ingest throughput (slices/s, de-identification included) and draft latency (s/study)."""
    from solutions.medical_imaging.benchmark import run_bench

    _ensure_model()
    typer.echo(json.dumps(run_bench(slices, studies, log=_log)))
