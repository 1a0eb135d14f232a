"""``verticals core continual-eval``: run a continual-learning benchmark with one method.

Prints one JSON object as the last stdout line (progress bars on stderr) and writes the same JSON plus
the accuracy-matrix heatmap and per-task curves (PNG) under ``--out``
(default ``$VERTICALS_HOME/reports/continual``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from core.errors import ConfigError

METHOD_CHOICES = ("naive", "ewc", "online-ewc", "lora", "replay", "ewc+replay", "online-ewc+replay")
BENCHMARK_CHOICES = ("permuted-digits", "intents", "defects")


def continual_eval(
    benchmark: Annotated[str, typer.Option(help="permuted-digits | intents | defects")] = "permuted-digits",
    method: Annotated[str, typer.Option(help="naive | ewc | online-ewc | lora | replay | ewc+replay | "
                                        "online-ewc+replay, or a comma list "
                                        "(one shared naive/joint reference; one JSON line per method)")] = "ewc",
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON result on stdout.")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for the JSON and PNG plots.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for model init and batch order.")] = 0,
    tasks: Annotated[int | None, typer.Option(min=2, help="Use only the first N tasks.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override the benchmark's epochs per task.")] = None,
    per_class: Annotated[int | None, typer.Option(min=2, help="intents: examples per intent (default 40).")] = None,
    ewc_lambda: Annotated[float | None, typer.Option(min=0.0, help="Override the benchmark's EWC lambda (also for the +replay combinations).")] = None,
    timing: Annotated[bool, typer.Option(help="Measure the EWC step-time ratio (EWC methods).")] = True,
    only_timing: Annotated[bool, typer.Option(help="Only measure the EWC vs plain step-time ratio.")] = False,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding customer_service/ (intents) or industrial/magnetic_tile/ (defects).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch (the models are small).")] = 1,
    validation: Annotated[bool, typer.Option(help="Score on a seeded 20 % slice of each task's training data "
                                             "(trained on the rest), never on the eval sets: for tuning.")] = False,
    ewc_kfac_refresh: Annotated[int | None, typer.Option(min=1, help="KFAC EWC: recompute the penalty gradient "
                                                         "every N steps (1 = every step).")] = None,
    ewc_kfac_rank: Annotated[int | None, typer.Option(min=0, help="kfac_merged EWC: rank of the shared Kronecker "
                                                      "subspace part per layer (0 = blocks / diagonal only).")] = None,
    ewc_kfac_tol: Annotated[float | None, typer.Option(min=0.0, max=0.999, help="KFAC EWC: keep each factor's "
                                                       "eigenvalues >= this times its largest (smaller rank = "
                                                       "cheaper step).")] = None,
    ewc_fisher: Annotated[str | None, typer.Option(help="Override the EWC Fisher: empirical | "
                                                   "empirical_per_sample | true | kfac | kfac_merged (also for the +replay combinations).")] = None,
) -> None:
    """Train the benchmark's tasks in sequence with METHOD; report R[i][j], forgetting, transfer, and the
    naive and joint references from the same run."""
    import torch

    from core.continual import benchmarks, harness
    from core.settings import get_settings

    methods = [m.strip() for m in method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_CHOICES]
    if bad or not methods:
        raise ConfigError(f"unknown method {(bad or [method])[0]!r}; choose from {', '.join(METHOD_CHOICES)}")
    if benchmark not in BENCHMARK_CHOICES:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARK_CHOICES)}")
    torch.set_num_threads(threads)
    kwargs: dict[str, object] = {}
    if benchmark == "intents" and per_class is not None:
        kwargs["per_class"] = per_class
    if benchmark in ("intents", "defects") and data_root is not None:
        kwargs["data_root"] = data_root
    bench = benchmarks.load(benchmark, **kwargs)
    if tasks is not None:
        bench.tasks = bench.tasks[:tasks]
    if validation:
        bench = benchmarks.validation(bench)
    if ewc_fisher is not None:
        if ewc_fisher not in ("empirical", "empirical_per_sample", "true", "kfac", "kfac_merged"):
            raise ConfigError(f"unknown EWC Fisher {ewc_fisher!r}; choose empirical, empirical_per_sample, true, "
                              "kfac or kfac_merged")
        bench.ewc_fisher = ewc_fisher
        bench.replay_ewc_fisher = None  # the combinations too
    if ewc_kfac_refresh is not None:
        bench.ewc_kfac_refresh = ewc_kfac_refresh
    if ewc_kfac_rank is not None:
        bench.ewc_kfac_rank = ewc_kfac_rank
    if ewc_kfac_tol is not None:
        bench.ewc_kfac_tol = ewc_kfac_tol
    if epochs is not None:
        bench.epochs = epochs
    if ewc_lambda is not None:  # overrides the combinations' lambda too
        bench.ewc_lambda = ewc_lambda
        bench.replay_ewc_lambda = None
    if only_timing:
        for m in methods:
            mode = "online" if m == "online-ewc" else "separate"
            typer.echo(json.dumps({"benchmark": bench.name, "method": m, "mode": mode,
                                   **harness.step_time_ratio(bench, mode, seed=seed)}))
        return
    out_dir = out or get_settings().home / "reports" / "continual"
    refs = None
    if len(methods) > 1:
        from tqdm import tqdm

        with tqdm(total=len(bench.tasks) + 1, desc=f"{bench.name}: naive+joint references") as bar:
            refs = harness.references(bench, seed=seed, bar=bar)
    for m in methods:
        result = harness.run(bench, m, seed=seed, out_dir=out_dir, timing=timing, refs=refs)
        if not as_json:
            typer.echo(f"{bench.name} / {m}: average accuracy {result['average_accuracy']:.4f} "
                       f"(joint {result['joint_accuracy']:.4f}, naive {result['naive_average_accuracy']:.4f}), "
                       f"forgetting {result['forgetting']:.4f}; plots: {', '.join(result['plots'])}")
        typer.echo(json.dumps(result))


def register(app: typer.Typer) -> None:
    app.command("continual-eval")(continual_eval)
