"""Evaluation harness: train a benchmark's tasks in sequence with one method and score every step.

Outputs (``run``):
  * ``accuracy_matrix`` R[i][j]: accuracy on task j's eval set after training tasks 0..i.
  * ``average_accuracy``: mean_j R[T-1][j].
  * ``forgetting``: mean over j < T-1 of max_{i<T-1} R[i][j] - R[T-1][j] (Chaudhry et al. 2018);
    ``forgetting_per_task`` lists each j.
  * ``backward_transfer``: mean over j < T-1 of R[T-1][j] - R[j][j] (Lopez-Paz & Ranzato 2017).
  * ``forward_transfer``: mean over j > 0 of R[j-1][j] - b_j, with b_j the accuracy of the untrained
    model on task j (Lopez-Paz & Ranzato 2017).
  * references from the same run: ``joint_accuracy`` (one model trained on all tasks at once: the
    upper reference) and ``naive_average_accuracy`` (plain sequential fine-tuning: the lower one).
  * for EWC methods, ``ewc_step_time_ratio``: median EWC training step time / median plain step
    time, measured side by side (interleaved rounds) on the same model and batches: the run's trained
    model with the Fisher it built (``ewc_timing_fisher``).

Methods: ``naive`` (fine-tune), ``ewc`` (separate Fisher per task), ``online-ewc``, ``lora`` (first task
trains the whole model; each later task trains only its own adapters, plus its head in task-incremental
benchmarks; inference picks the adapter by task id), ``replay`` (reservoir buffer, rehearsal), and the
combinations ``ewc+replay`` / ``online-ewc+replay`` (both hooks: EWC penalty plus rehearsal; reported
under their own names, never as EWC alone).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from core.continual import adapters
from core.continual.benchmarks import Batch, Benchmark, Task, loss_fn, output_fn
from core.continual.ewc import EWC, KFAC_KINDS
from core.continual.replay import Replay, ReservoirBuffer
from core.errors import ConfigError
from core.train.hooks import TrainerHook

Method = Literal["naive", "ewc", "online-ewc", "lora", "replay", "ewc+replay", "online-ewc+replay"]
METHODS: tuple[str, ...] = ("naive", "ewc", "online-ewc", "lora", "replay", "ewc+replay", "online-ewc+replay")


class TensorLoader:
    """Re-iterable mini-batches over an ``(x, y, t)`` tuple, reshuffled (seeded) every pass."""

    def __init__(self, data: Batch, batch_size: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.data[0]) // self.batch_size)

    def __iter__(self):  # noqa: ANN204 - a generator of Batch
        n = len(self.data[0])
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        for s in range(0, n, self.batch_size):
            idx = order[s : s + self.batch_size]
            yield tuple(d[idx] for d in self.data)


def make_trainer(model: nn.Module, *, lr: float, hooks: Sequence[TrainerHook] = (),
                 params: Sequence[nn.Parameter] | None = None, device: str = "cpu",
                 optimizer: str = "adam") -> Any:
    """The core trainer (AdamW, no decay, no clipping); ``optimizer="sgd"`` swaps in SGD with momentum
    0.9 at a constant ``lr`` (the trainer's own optimizer is AdamW only)."""
    from core.train.trainer import Trainer

    trainer = Trainer(model, loss_fn, lr=lr, weight_decay=0.0, grad_clip=None, amp="fp32", hooks=hooks,
                      params=params, device=device, progress=False)
    if optimizer == "sgd":
        ps = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        trainer.optimizer = torch.optim.SGD(ps, lr=lr, momentum=0.9)  # type: ignore[assignment]
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    elif optimizer != "adam":
        raise ConfigError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
    return trainer


@torch.no_grad()
def accuracy(model: nn.Module, task: Task, batch_size: int = 1024, device: str = "cpu",
             metric: str = "accuracy") -> float:
    """Accuracy on ``task.eval``, or balanced accuracy (mean per-class recall over the classes present)."""
    was = model.training
    model.eval()
    x, y, t = task.eval
    preds = []
    for s in range(0, len(y), batch_size):
        logits = model(x[s : s + batch_size].to(device), t[s : s + batch_size].to(device))
        preds.append(logits.argmax(-1).cpu())
    model.train(was)
    if not preds:
        return 0.0
    hit = torch.cat(preds) == y
    if metric == "balanced_accuracy":
        recalls = [float(hit[y == c].float().mean()) for c in y.unique().tolist()]
        return sum(recalls) / len(recalls)
    return float(hit.float().mean())


def _adapter_id(bench: Benchmark, j: int) -> str | None:
    return None if j == 0 else bench.tasks[j].name


def _eval_row(bench: Benchmark, model: nn.Module, method: str, device: str) -> list[float]:
    row = []
    for j, task in enumerate(bench.tasks):
        if method == "lora":
            with adapters.use_task(model, _adapter_id(bench, j)):
                row.append(accuracy(model, task, device=device, metric=bench.metric))
        else:
            row.append(accuracy(model, task, device=device, metric=bench.metric))
    return row


def method_settings(bench: Benchmark, method: str) -> dict[str, Any]:
    """The hyper-parameters ``method`` runs with on ``bench`` (reported beside its figures)."""
    out: dict[str, Any] = {"epochs": bench.epochs, "lr": bench.lr, "batch_size": bench.batch_size,
                           "optimizer": bench.optimizer}
    base = method.removesuffix("+replay")
    if base in ("ewc", "online-ewc"):
        lam = bench.ewc_lambda
        fisher = bench.ewc_fisher
        if method.endswith("+replay"):
            lam = lam if bench.replay_ewc_lambda is None else bench.replay_ewc_lambda
            fisher = bench.replay_ewc_fisher or fisher
        out.update(ewc_lambda=lam, ewc_fisher=fisher, ewc_apply=bench.ewc_apply,
                   ewc_params=bench.ewc_params)
        if fisher in KFAC_KINDS:
            out.update(ewc_kfac_tol=bench.ewc_kfac_tol, ewc_kfac_refresh=bench.ewc_kfac_refresh,
                       ewc_normalize=bench.ewc_kfac_normalize)
            if fisher == "kfac_merged":
                out.update(ewc_kfac_block_max=bench.ewc_kfac_block_max, ewc_kfac_rank=bench.ewc_kfac_rank)
        elif bench.ewc_normalize != "none":
            out["ewc_normalize"] = bench.ewc_normalize
        if base == "online-ewc":
            out["online_decay"] = bench.online_decay
    if method == "replay" or method.endswith("+replay"):
        out["replay_capacity"] = bench.replay_capacity
    if method == "lora":
        out.update(lora_rank=bench.lora_rank, lora_targets=bench.lora_targets)
    return out


def _ewc_hook(bench: Benchmark, mode: Literal["separate", "online"], **overrides: Any) -> EWC:
    """An EWC hook with every EWC setting of ``bench`` (normalisation follows the Fisher kind), some
    overridden (the timing runs: ``apply``, ``fisher_samples``, ...)."""
    kw: dict[str, Any] = dict(
        mode=mode, decay=bench.online_decay, fisher=bench.ewc_fisher, apply=bench.ewc_apply,
        params=bench.ewc_params, fisher_samples=bench.fisher_samples, output_fn=output_fn,
        temperature=bench.ewc_temperature,
        normalize=bench.ewc_kfac_normalize if bench.ewc_fisher in KFAC_KINDS else bench.ewc_normalize,
        kfac_tol=bench.ewc_kfac_tol, kfac_refresh=bench.ewc_kfac_refresh,
        kfac_block_max=bench.ewc_kfac_block_max, kfac_rank=bench.ewc_kfac_rank)
    return EWC(bench.ewc_lambda, **{**kw, **overrides})


def _hooks(bench: Benchmark, method: str, seed: int) -> list[TrainerHook]:
    if method.endswith("+replay"):  # a combination: the EWC penalty and rehearsal of a reservoir
        lam = bench.ewc_lambda if bench.replay_ewc_lambda is None else bench.replay_ewc_lambda
        fisher = bench.replay_ewc_fisher or bench.ewc_fisher
        return (_hooks(dataclasses.replace(bench, ewc_lambda=lam, ewc_fisher=fisher), method.removesuffix("+replay"), seed)
                + _hooks(bench, "replay", seed))
    if method in ("ewc", "online-ewc"):
        return [_ewc_hook(bench, "online" if method == "online-ewc" else "separate")]
    if method == "replay":
        return [Replay(ReservoirBuffer(bench.replay_capacity, seed=seed), batch_size=bench.batch_size)]
    return []


def train_sequence(bench: Benchmark, method: str, *, seed: int = 0, device: str = "cpu",
                   bar: tqdm | None = None, keep: dict[str, Any] | None = None) -> tuple[list[list[float]], list[float]]:
    """Train tasks in order with ``method``; returns (R, b): the accuracy matrix and untrained accuracies.
    ``keep``, if given, receives the trained ``model`` and its ``hooks`` (the timing of a run uses them)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    torch.manual_seed(seed)
    model = bench.make_model().to(device)
    base = _eval_row(bench, model, "naive", device)
    hooks = _hooks(bench, method, seed)
    matrix: list[list[float]] = []
    for i, task in enumerate(bench.tasks):
        params = None
        if method == "lora" and i > 0:
            params = adapters.add_task(model, task.name, bench.lora_targets, rank=bench.lora_rank)
            if bench.head_pattern:
                pattern = bench.head_pattern.format(task=i)
                params += [p for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
            adapters.set_task(model, task.name)
        trainer = make_trainer(model, lr=bench.lr, hooks=hooks, params=params, device=device,
                               optimizer=bench.optimizer)
        trainer.fit(TensorLoader(task.train, bench.batch_size, seed=seed + i), epochs=bench.epochs,
                    task_id=task.name)
        matrix.append(_eval_row(bench, model, method, device))
        if bar is not None:
            bar.update(1)
    if keep is not None:
        keep.update(model=model, hooks=hooks)
    return matrix, base


def train_joint(bench: Benchmark, *, seed: int = 0, device: str = "cpu") -> list[float]:
    """Upper reference: one model trained on every task's data at once (same epochs)."""
    torch.manual_seed(seed)
    model = bench.make_model().to(device)
    data = tuple(torch.cat([t.train[k] for t in bench.tasks]) for k in range(3))
    make_trainer(model, lr=bench.lr, device=device, optimizer=bench.optimizer).fit(
        TensorLoader(data, bench.batch_size, seed=seed), epochs=bench.epochs, task_id="joint")
    return [accuracy(model, t, device=device, metric=bench.metric) for t in bench.tasks]


def metrics(matrix: list[list[float]], base: list[float]) -> dict[str, Any]:
    """Average accuracy, forgetting, backward and forward transfer from R (T x T) and b (T)."""
    n = len(matrix)
    last = matrix[-1]
    forget = [max(matrix[i][j] for i in range(j, n - 1)) - last[j] for j in range(n - 1)]
    return {
        "average_accuracy": sum(last) / n,
        "forgetting": sum(forget) / len(forget) if forget else 0.0,
        "forgetting_per_task": forget,
        "backward_transfer": sum(last[j] - matrix[j][j] for j in range(n - 1)) / (n - 1) if n > 1 else 0.0,
        "forward_transfer": sum(matrix[j - 1][j] - base[j] for j in range(1, n)) / (n - 1) if n > 1 else 0.0,
    }


class _StepTimer(TrainerHook):
    """Wall time from ``before_step`` to ``after_step``: forward, penalty, backward, optimizer step and, as the
    last hook of its trainer, the other hooks' ``after_step`` (``apply="prox"`` acts there)."""

    name = "step_timer"

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def before_step(self, trainer: Any, batch: Any) -> None:
        self._t0 = time.perf_counter()

    def after_step(self, trainer: Any, loss: float) -> None:
        self.times.append(time.perf_counter() - self._t0)


def step_time_ratio(bench: Benchmark, mode: Literal["separate", "online"], *, rounds: int = 7,
                    steps: int = 40, seed: int = 0, device: str = "cpu",
                    trained: tuple[nn.Module, EWC] | None = None) -> dict[str, Any]:
    """EWC vs plain training step time, interleaved rounds on copies of one model and the same batches.

    ``trained``: the model and EWC hook of a finished run, timed as they are (the Fisher the run really
    built: for KFAC its kept eigen-directions set the cost). Without it (``--only-timing``) a fresh model's
    EWC hook is first consolidated on every task from 64 samples (separate mode then holds T
    Fisher/anchor pairs; on permuted-digits both ways gave the same KFAC ratio).
    Every way of applying the penalty is timed (``grad``, ``loss``, ``prox``) with the benchmark's
    optimizer; ``ewc_step_time_ratio`` is the one the benchmark uses (``bench.ewc_apply``). A step time
    is the mean over one round (``steps`` rounded up to a multiple of ``bench.ewc_kfac_refresh``, so an
    amortised KFAC refresh is counted in full), the median over rounds (the first, warm-up, dropped).
    """
    torch.manual_seed(seed)
    fisher = bench.ewc_fisher
    refresh = bench.ewc_kfac_refresh if fisher in KFAC_KINDS else 1
    steps = -(-steps // refresh) * refresh
    if trained is not None:
        model, ewc = copy.deepcopy(trained[0]).to(device), trained[1]
    else:
        model = bench.make_model().to(device)
        # the timing fits below must not re-estimate the Fisher (consolidate_at_task_end=False)
        ewc = _ewc_hook(bench, mode, fisher_samples=64, apply="grad", consolidate_at_task_end=False)
        for task in bench.tasks:
            ewc.consolidate(model, loss_fn, TensorLoader(task.train, bench.batch_size, seed=seed), task.name)
    applies = ("grad", "loss") if fisher in KFAC_KINDS else ("grad", "loss", "prox")
    hooks: dict[str, list[TrainerHook]] = {"plain": []}
    for apply in applies:
        h = _ewc_hook(bench, mode, apply=apply, kfac_refresh=refresh, consolidate_at_task_end=False)
        h.load_state_dict(ewc.state_dict())
        hooks[apply] = [h]
    timers = {k: _StepTimer() for k in hooks}
    # the timer goes last: its after_step must run after the EWC hook's (apply="prox" acts there)
    trainers = {k: make_trainer(copy.deepcopy(model), lr=bench.lr, hooks=[*h, timers[k]], device=device,
                                optimizer=bench.optimizer) for k, h in hooks.items()}
    loader = TensorLoader(bench.tasks[-1].train, bench.batch_size, seed=seed)
    for _ in range(rounds):
        for trainer in trainers.values():
            trainer.fit(loader, epochs=steps, max_steps=steps, task_id="timing")
    # per round the mean step; the median over rounds, the first (allocator and cache warm-up) dropped
    med = {k: statistics.median(statistics.fmean(t.times[r * steps:(r + 1) * steps]) for r in range(1, rounds))
           for k, t in timers.items()}
    used = bench.ewc_apply if bench.ewc_apply in applies else "grad"
    out = {"plain_step_ms": 1e3 * med["plain"], "ewc_step_ms": 1e3 * med[used],
           "ewc_step_time_ratio": med[used] / med["plain"], "ewc_apply": used,
           "ewc_loss_path_step_ms": 1e3 * med["loss"],
           "ewc_loss_path_step_time_ratio": med["loss"] / med["plain"], "ewc_kfac_refresh": refresh,
           "ewc_timing_fisher": "trained run" if trained is not None else "fresh model, 64 samples"}
    out.update({f"ewc_{a}_step_time_ratio": med[a] / med["plain"] for a in applies})
    return out


def _plots(result: dict[str, Any], task_names: list[str], stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["accuracy_matrix"]
    n = len(r)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    im = ax.imshow(r, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{r[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if r[i][j] < 0.6 else "black")
    ax.set_xticks(range(n), task_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), [f"after {t}" for t in task_names], fontsize=7)
    ax.set_xlabel("evaluated on task j")
    ax.set_title(f"{result['benchmark']} / {result['method']}: R[i][j]")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    heat = stem.with_name(stem.name + "-matrix.png")
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for j in range(n):
        ax.plot(range(j, n), [r[i][j] for i in range(j, n)], marker="o", label=task_names[j])
    ax.axhline(result["joint_accuracy"], ls="--", c="k", lw=1, label="joint (avg)")
    ax.set_xticks(range(n), [f"after {t}" for t in task_names], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{result['benchmark']} / {result['method']}: per-task accuracy")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    curves = stem.with_name(stem.name + "-curves.png")
    fig.savefig(curves, dpi=120)
    plt.close(fig)
    return [str(heat), str(curves)]


References = tuple[tuple[list[list[float]], list[float]], list[float]]  # (naive (R, b), joint per task)


def references(bench: Benchmark, *, seed: int = 0, device: str = "cpu", bar: tqdm | None = None) -> References:
    """The naive fine-tuning run and the joint-training accuracies, to share between several methods."""
    naive = train_sequence(bench, "naive", seed=seed, device=device, bar=bar)
    joint = train_joint(bench, seed=seed, device=device)
    if bar is not None:
        bar.update(1)
    return naive, joint


def run(bench: Benchmark, method: str, *, seed: int = 0, device: str = "cpu", out_dir: Path | None = None,
        timing: bool = True, log: Callable[[str], None] | None = None,
        refs: References | None = None) -> dict[str, Any]:
    """The whole evaluation: the method, the naive and joint references, metrics, plots, JSON.

    ``refs`` (from :func:`references` with the same benchmark and seed) skips retraining the references
    when several methods are compared in one run."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    n = len(bench.tasks)
    runs = [method] if method == "naive" or refs is not None else [method, "naive"]
    total = n * len(runs) + (0 if refs is not None else 1)
    desc = f"{bench.name}: {'+'.join(runs)}" + ("" if refs is not None else "+joint")
    with tqdm(total=total, desc=desc, file=None) as bar:
        kept: dict[str, Any] = {}
        matrix, base = train_sequence(bench, method, seed=seed, device=device, bar=bar, keep=kept)
        if refs is None:
            if method == "naive":
                refs = ((matrix, base), train_joint(bench, seed=seed, device=device))
                bar.update(1)
            else:
                refs = references(bench, seed=seed, device=device, bar=bar)
    naive, joint = refs
    result: dict[str, Any] = {"benchmark": bench.name, "method": method, "accuracy_matrix": matrix,
                              **metrics(matrix, base)}
    naive_m = metrics(*naive)
    result.update({
        "joint_accuracy": sum(joint) / n,
        "joint_per_task": joint,
        "naive_average_accuracy": naive_m["average_accuracy"],
        "naive_forgetting": naive_m["forgetting"],
        "naive_forgetting_per_task": naive_m["forgetting_per_task"],
        "untrained_accuracy": base,
        "tasks": [t.name for t in bench.tasks],
        "scenario": bench.scenario,
        "metric": bench.metric,
        "seed": seed,
        "settings": method_settings(bench, method),
    })
    if timing and method in ("ewc", "online-ewc"):
        ewc = next(h for h in kept["hooks"] if isinstance(h, EWC))
        result.update(step_time_ratio(bench, "online" if method == "online-ewc" else "separate", seed=seed,
                                      device=device, trained=(kept["model"], ewc)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["notes"] = bench.notes
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        stem = out_dir / f"{bench.name}-{method}-{stamp}"
        result["plots"] = _plots(result, result["tasks"], stem)
        result["json_path"] = str(stem.with_suffix(".json"))
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result
