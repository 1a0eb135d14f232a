"""``verticals customer-service ...``: train, evaluate, benchmark the tracker, import transcripts.

Evaluation prints exactly one JSON object as the last stdout line; progress goes to stderr.
Heavy libraries are imported inside the commands so ``verticals --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Customer service: dialogue state tracking and agent assist.", no_args_is_help=True)

DataRoot = Annotated[Path | None, typer.Option("--data-root", help="Folder laid out like shared/data/customer_service.")]


def _root(data_root: Path | None) -> Path:
    from core.errors import DataError
    from core.settings import get_settings

    root = data_root or get_settings().data_root / "customer_service"
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    return root


@app.command()
def train(
    task: Annotated[str, typer.Option(help="dst | intents | actions")],
    dataset: Annotated[str, typer.Option(help="sgd | banking77 | clinc150 | star")],
    data_root: DataRoot = None,
    max_dialogues: Annotated[int, typer.Option(help="SGD/STAR train dialogues (seeded sample; 0 = default).")] = 0,
    epochs: Annotated[int, typer.Option(help="Tracker head epochs (0 = default).")] = 0,
    max_per_class: Annotated[int, typer.Option(help="Intents: cap training texts per intent (0 = all).")] = 0,
    encoder: Annotated[str, typer.Option(help="DST: frozen encoder precision, int8 | fp32 (default: the product's choice).")] = "",
) -> None:
    """Train a model on the dataset's train split and store it under VERTICALS_HOME."""
    from core.errors import DataError
    from solutions.customer_service.pipeline import train as run

    if encoder not in ("", "int8", "fp32"):
        raise DataError(f"--encoder takes int8 or fp32, not {encoder!r}")
    info = run(task, dataset, _root(data_root), max_dialogues=max_dialogues or None, epochs=epochs or None,
               max_per_class=max_per_class or None, encoder_int8={"": None, "int8": True, "fp32": False}[encoder])
    typer.echo(json.dumps({"task": task, "dataset": dataset, **info}))


@app.command()
def evaluate(
    task: Annotated[str, typer.Option(help="dst | intents | actions | discovery")],
    dataset: Annotated[str, typer.Option(help="sgd | multiwoz21 | banking77 | clinc150 | dstc11 | star")],
    data_root: DataRoot = None,
    split: Annotated[str, typer.Option(help="dev | test")] = "dev",
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON line on stdout.")] = False,
    limit: Annotated[int, typer.Option(help="Seeded sample: N dialogues (dst, actions) or N in-scope texts (intents); 0 = all.")] = 0,
) -> None:
    """Score a model on dev/test (trains it first when missing); last stdout line is JSON."""
    from solutions.customer_service.pipeline import evaluate as run

    res = run(task, dataset, _root(data_root), split=split, limit=limit or None)  # type: ignore[arg-type]
    if not as_json:
        for k, v in res.items():
            if not isinstance(v, dict):
                typer.echo(f"{k:>28}: {v}", err=True)
    typer.echo(json.dumps(res))


@app.command()
def holdout(
    data_root: DataRoot = None,
    dialogues: Annotated[int, typer.Option(help="Held-out SGD train dialogues (outside the tracker's training "
                                                "sample; 0 = 400, or 150 per part with --unseen-services).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the held-out sample (seen-service run).")] = 7,
    unseen_services: Annotated[str, typer.Option(help="Pseudo-unseen check: comma-separated SGD train services "
                                                      "(or 'default') held back from the training sample; heads are "
                                                      "trained without them (or loaded, cached under VERTICALS_HOME) "
                                                      "and scored on held-out dialogues with them.")] = "",
    part: Annotated[int, typer.Option(help="Pseudo-unseen: which disjoint held-out part (0, 1, ...).")] = 0,
    ensemble: Annotated[int, typer.Option(help="Pseudo-unseen: ensemble members of its heads (0 = 1).")] = 0,
    train_dialogues: Annotated[int, typer.Option(help="Pseudo-unseen: the seeded training sample it starts from "
                                                      "(0 = the default recipe's).")] = 0,
    decisions: Annotated[str, typer.Option(help="JSON object of decision settings to use for this run only, e.g. "
                                                '\'{"status_logit_bias_unseen": [0.5, 0, 0, 0, 0]}\'.')] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON line on stdout.")] = False,
) -> None:
    """Score a tracker on held-out SGD *train* dialogues (where DST choices are made, never dev), with the
    per-slot error breakdown; last stdout line is JSON. Without --unseen-services: the stored tracker, seen
    services only. With it: the pseudo-unseen check (seen / unseen = the heads' training services)."""
    from core.errors import DataError
    from solutions.customer_service import pipeline as P

    try:
        dec = json.loads(decisions) if decisions else None
    except ValueError as e:
        raise DataError(f"--decisions is not JSON: {e}") from e
    if dec is not None and not isinstance(dec, dict):
        raise DataError("--decisions takes a JSON object")
    try:
        if unseen_services:
            names = (P.PSEUDO_UNSEEN_SERVICES if unseen_services == "default"
                     else tuple(s.strip() for s in unseen_services.split(",") if s.strip()))
            res = P.holdout_unseen_dst(_root(data_root), names, dialogues or P.PSEUDO_UNSEEN_DIALOGUES, part=part,
                                       train_dialogues=train_dialogues or None,
                                       ensemble=ensemble or P.PSEUDO_UNSEEN_ENSEMBLE, decisions=dec)
        else:
            res = P.holdout_dst(_root(data_root), dialogues or 400, seed=seed, decisions=dec)
    except ValueError as e:  # decision settings that are not decisions
        raise DataError(str(e)) from e
    if not as_json:
        for k, v in res.items():
            typer.echo(f"{k:>28}: {v}", err=True)
    typer.echo(json.dumps(res))


@app.command()
def bench(
    data_root: DataRoot = None,
    dialogues: Annotated[int, typer.Option(help="SGD dev dialogues to replay.")] = 15,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    compare: Annotated[bool, typer.Option(help="Also time the batched path with the other encoder precision, "
                                                   "64 pairs per encoder call and the heads stepping one turn per call "
                                                   "(same heads, same turns).")] = False,
) -> None:
    """Tracker speed on real SGD dev turns: per-turn latency (p50/p95, one turn at a time, encoder
    included) and batched throughput (all turns encoded in batches), measured in one run."""
    import random
    import time

    import numpy as np

    from solutions.customer_service import data as D
    from solutions.customer_service.dst import (
        HEAD_BATCH,
        PAIR_BATCH,
        DialogueStateTracker,
        encode_pairs,
        iter_user_turns,
    )
    from solutions.customer_service.encoder import MiniLMEncoder
    from solutions.customer_service.pipeline import is_trained, model_folder
    from solutions.customer_service.pipeline import train as run_train

    root = _root(data_root)
    enc = MiniLMEncoder(cache_dir=None)
    if not is_trained("dst", "sgd"):
        run_train("dst", "sgd", root)
    tracker = DialogueStateTracker.load(model_folder("dst", "sgd"), enc)
    enc = tracker.encoder  # the precision the heads were trained on (fp32 or int8)
    dev = D.load_sgd(root, "dev")
    sample = random.Random(7).sample(dev.dialogues, dialogues)
    bank = tracker.bank(dev.schemas)
    pairs = list(iter_user_turns(sample))
    encode_pairs(enc, ["warm up"], [""])
    # Schema description embeddings are computed once per service and kept (a served tracker has them
    # before the first customer turn), so they are not part of the per-turn latency.
    bank.ensure(sorted({s for d in sample for s in d.get("services", []) if s in dev.schemas}))
    lat, lat_cpu = [], []
    states: dict[int, dict] = {}
    history: dict[int, list] = {}
    for di, ti, user, system in pairs:
        t, c = time.perf_counter(), time.process_time()
        f = encode_pairs(enc, [user], [system])[0]
        services = [fr["service"] for fr in sample[di]["turns"][ti]["frames"]]
        past = history.setdefault(di, [])
        states[di] = tracker.step(states.get(di, {}), f, user, system, services, bank, past)
        past.append((f, system))
        lat.append((time.perf_counter() - t) * 1000)
        lat_cpu.append((time.process_time() - c) * 1000)

    def batched_rate(tr: DialogueStateTracker, batch_size: int = PAIR_BATCH, head_batch: int = HEAD_BATCH) -> float:
        t = time.perf_counter()
        tr.track_sgd(sample, dev.schemas, desc="batched", batch_size=batch_size, head_batch=head_batch)
        return len(pairs) / (time.perf_counter() - t)

    c = time.process_time()
    batched = batched_rate(tracker)
    batched_cpu = len(pairs) / (time.process_time() - c)
    res: dict = {"turns": len(pairs), "encoder": "int8" if enc.quantized else "fp32", "ensemble": tracker.cfg.ensemble,
                 "matmuls": "int8" if enc.quantized else "bf16" if enc.bf16 else "fp32",
                 "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
                 "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
                 "turns_per_s_single": round(1000 * len(lat) / sum(lat), 1), "turns_per_s_batched": round(batched, 1),
                 "batched_over_single": round(batched / (1000 * len(lat) / sum(lat)), 2),
                 # CPU time of this process (1 thread): what a quiet machine would read; wall clock on a
                 # shared machine also counts the time other processes hold the core
                 "cpu_latency_ms_p50": round(float(np.percentile(lat_cpu, 50)), 1),
                 "cpu_latency_ms_p95": round(float(np.percentile(lat_cpu, 95)), 1),
                 "turns_per_cpu_s_batched": round(batched_cpu, 1)}
    if compare:
        # Speed only: the same heads on the other precision's features (their accuracy is not meant).
        other = DialogueStateTracker(tracker.heads, tracker.cfg, enc)
        other.encoder = enc.variant(not enc.quantized)
        encode_pairs(other.encoder, ["warm up"], [""])
        other.bank(dev.schemas).ensure(sorted({s for d in sample for s in d.get("services", []) if s in dev.schemas}))
        rates = {"this": batched_rate(tracker), f"encoder_{'fp32' if enc.quantized else 'int8'}": batched_rate(other),
                 "64_pairs_per_call": batched_rate(tracker, 64),
                 "heads_one_turn_per_call": batched_rate(tracker, head_batch=1)}
        if len(tracker.heads.members):  # the main heads alone (what the seed ensemble costs)
            import copy

            solo = copy.deepcopy(tracker.heads)
            solo.members = type(solo.members)()
            rates["heads_without_ensemble"] = batched_rate(DialogueStateTracker(solo, tracker.cfg, enc))
        if enc.bf16:  # the same fp32 weights with fp32 matmuls (what an AVX2-only CPU runs)
            enc.bf16 = False
            try:
                rates["fp32_matmuls"] = batched_rate(tracker)
            finally:
                enc.bf16 = True
        rates["this"] = round((rates["this"] + batched) / 2, 1)  # two runs of this path, interleaved
        res["compare_turns_per_s_batched"] = {k: round(v, 1) for k, v in rates.items()}
        res["compare_ratio_this_over"] = {k: round(rates["this"] / v, 2) for k, v in rates.items() if k != "this"}
    if not as_json:
        typer.echo(str(res), err=True)
    typer.echo(json.dumps(res))


@app.command("import-sgd")
def import_sgd(
    data_root: DataRoot = None,
    split: Annotated[str, typer.Option()] = "dev",
    dialogues: Annotated[int, typer.Option(help="How many dialogues to import.")] = 20,
    track: Annotated[bool, typer.Option(help="Queue batch re-tracking on the customer_service queue.")] = True,
) -> None:
    """Import real SGD dialogues as conversations (transcripts) and queue their re-tracking."""
    from solutions.customer_service import data as D
    from solutions.customer_service.store import import_transcript

    root = _root(data_root)
    ds = D.load_sgd(root, split, limit=dialogues)  # type: ignore[arg-type]
    ids = []
    for d in ds.dialogues:
        turns = [("customer" if t["speaker"] == "USER" else "agent", t["utterance"]) for t in d["turns"]]
        ids.append(import_transcript(f"sgd-{split}-{d['dialogue_id']}", turns, services=d["services"]))
    if track:
        from core.queue import app as celery

        res = celery.send_task("customer_service.retrack", kwargs={"conversation_ids": ids})
        typer.echo(f"queued re-tracking of {len(ids)} conversations: {res.id}", err=True)
    typer.echo(json.dumps({"imported": len(ids), "conversation_ids": ids}))
