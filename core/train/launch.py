"""The distributed training entry point: the same command on 1 process, N local GPUs or M machines.

    python -m core.train.launch --config cfg.yaml                       # one process
    torchrun --nproc_per_node 2 -m core.train.launch --config cfg.yaml  # one machine, 2 processes
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 \\
        -m core.train.launch --config cfg.yaml                          # two machines

Config (YAML or JSON; every section optional except ``data.path``)::

    model: {hidden_size: 256, num_hidden_layers: 4, ...}   # core.model.deepseek.ModelArgs fields
    data: {path: .../reports.json, split: train, field: report, seq_len: 128}
    train: {steps: 100, micro_batch_size: 8, grad_accum_steps: 1, lr: 3.0e-4, warmup_steps: 10,
            weight_decay: 0.0, grad_clip: 1.0, amp: auto, seed: 0, gradient_checkpointing: false}
    output: {dir: <VERTICALS_HOME>/models/distributed/<name>, name: run, save_every: 0, resume: true}
    distributed: {strategy: 3d_parallel, data_parallel_size: 2, tensor_parallel_size: 2, ...}

Text is tokenized as UTF-8 bytes (vocab 256 + the model's special ids), so any corpus works without a
trained tokenizer. ``micro_batch_size`` is per data rank: the global batch per optimizer step is
``micro_batch_size * grad_accum_steps * data_parallel_size * expert_parallel_size`` sequences.

Rank 0 prints one JSON object as the last stdout line (losses, throughput, checkpoint path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError, DataError, VerticalsError

log = logging.getLogger(__name__)

_SECTIONS = ("model", "data", "train", "output", "distributed")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    amp: str = "auto"
    seed: int = 0
    gradient_checkpointing: bool = False


@dataclasses.dataclass(frozen=True)
class DataSection:
    path: str = ""
    split: str = "train"
    field: str = "text"
    seq_len: int = 128
    max_documents: int | None = None


@dataclasses.dataclass(frozen=True)
class OutputSection:
    dir: str | None = None
    name: str = "run"
    save_every: int = 0
    resume: bool = True


def _section(cls: type, data: Any, name: str) -> Any:
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{name}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Data: byte-level windows of a text corpus
# ---------------------------------------------------------------------------------------------------
def read_texts(section: DataSection) -> list[str]:
    """Documents from a ``.txt`` file (one per blank-line-separated block), ``.jsonl`` (``field`` per
    line) or ``.json`` (a list, or a mapping of splits to lists, of objects with ``field``)."""
    if not section.path:
        raise ConfigError("data.path is required (a .txt, .jsonl or .json text corpus)")
    p = Path(section.path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path {p} does not exist")
    try:
        if p.suffix == ".txt":
            docs = [d for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        elif p.suffix == ".jsonl":
            docs = [str(json.loads(line)[section.field]) for line in p.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        else:
            obj = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(obj, dict):
                if section.split not in obj:
                    raise DataError(f"{p} has no split {section.split!r} (it has {sorted(obj)[:10]})")
                obj = obj[section.split]
            if not isinstance(obj, list):
                raise DataError(f"{p}: expected a list of records, got {type(obj).__name__}")
            docs = [str(r[section.field]) if isinstance(r, dict) else str(r) for r in obj]
    except (KeyError, TypeError) as e:
        raise DataError(f"{p}: records lack the field {section.field!r} ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is not valid UTF-8 JSON/text: {e}") from None
    if section.max_documents:
        docs = docs[: section.max_documents]
    if not docs:
        raise DataError(f"{p} holds no documents")
    return docs


def byte_windows(docs: list[str], seq_len: int, eos_id: int, offset: int) -> torch.Tensor:
    """Concatenate documents as bytes (+ ``offset``), each followed by ``eos_id``; cut into (n, seq_len)."""
    ids: list[int] = []
    for d in docs:
        ids.extend(b + offset for b in d.encode("utf-8"))
        ids.append(eos_id)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the corpus has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _loader(windows: torch.Tensor, ctx: Any, micro_batch: int, accum: int, seed: int, epoch: int) -> list[dict]:
    """This data rank's micro-batches for one epoch, a multiple of ``accum`` long (remainder dropped)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(windows)), num_replicas=ctx.data_world_size, rank=ctx.data_rank,
                                 shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    n = (len(idx) // (micro_batch * accum)) * accum
    if n == 0:
        raise DataError(f"each data rank gets {len(idx)} windows, fewer than one step of "
                        f"micro_batch_size x grad_accum_steps = {micro_batch * accum}; use more data")
    return [{"input_ids": windows[idx[i * micro_batch:(i + 1) * micro_batch]]} for i in range(n)]


def epochs_of(windows: torch.Tensor, ctx: Any, tr: TrainSection) -> Iterator[dict]:
    """Endless stream of micro-batches, epoch after epoch (the trainer stops at ``max_steps``)."""
    epoch = 0
    while True:
        yield from _loader(windows, ctx, tr.micro_batch_size, tr.grad_accum_steps, tr.seed, epoch)
        epoch += 1


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def run(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train as ``config`` says on the process group torchrun set up; returns rank 0's summary."""
    from core.model.deepseek import DeepseekV3, ModelArgs
    from core.settings import get_settings
    from core.train.distributed import DistributedConfig, init_distributed, parallelize, unwrap
    from core.train.parallel_checkpoint import load_checkpoint, save_checkpoint
    from core.train.parallel_hooks import distributed_hooks
    from core.train.trainer import Trainer

    unknown = sorted(set(config) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; sections are {list(_SECTIONS)}")
    tr = _section(TrainSection, config.get("train"), "train")
    data = _section(DataSection, config.get("data"), "data")
    out = _section(OutputSection, config.get("output"), "output")
    dcfg = DistributedConfig.from_dict(config.get("distributed"))
    if tr.grad_accum_steps != dcfg.grad_accum_steps and dcfg.grad_accum_steps != 1:
        raise ConfigError("set grad_accum_steps in train: (distributed.grad_accum_steps is its alias); not both")
    tr = dataclasses.replace(tr, grad_accum_steps=max(tr.grad_accum_steps, dcfg.grad_accum_steps))
    ctx = init_distributed(dcfg)
    try:
        margs = ModelArgs.from_dict(dict(config.get("model") or {}))
        if margs.vocab_size < 258:
            raise ConfigError(f"model.vocab_size={margs.vocab_size}: byte-level text needs at least 258 "
                              "(256 bytes + bos/eos)")
        torch.manual_seed(tr.seed)  # the same initial weights on every rank
        model = DeepseekV3(margs)
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        windows = byte_windows(read_texts(data), data.seq_len, eos_id=1, offset=2)
        run_dir = Path(out.dir).expanduser() if out.dir else get_settings().model_dir("distributed", out.name)
        ckpt_dir = run_dir / "checkpoint"
        if ctx.config.pipeline_parallel_size > 1:
            from core.train.parallel_pipeline import train_pipeline

            return train_pipeline(model, ctx, windows, tr, ckpt_dir, resume=out.resume)
        train_module = parallelize(model, ctx)
        hooks, clip, loss_hook = distributed_hooks(train_module, ctx, grad_clip=tr.grad_clip)
        trainer = Trainer(train_module, lambda m, b: m(b), lr=tr.lr, weight_decay=tr.weight_decay,
                          warmup_steps=tr.warmup_steps, total_steps=tr.steps, grad_clip=clip, amp=tr.amp,
                          grad_accum_steps=tr.grad_accum_steps, hooks=hooks, device=ctx.device,
                          progress=ctx.is_main)
        start = 0
        if out.resume and (ckpt_dir / ".metadata").is_file():
            state = load_checkpoint(ckpt_dir, unwrap(train_module), trainer.optimizer)
            start = int(state.get("step", 0))
            trainer.global_step = start
            if state.get("scheduler"):
                trainer.scheduler.load_state_dict(state["scheduler"])
            if ctx.is_main:
                log.warning("resumed from %s at step %d", ckpt_dir, start)
        remaining = max(tr.steps - start, 0)
        stats: dict[str, Any] = {"steps": 0, "tokens_per_s": 0.0, "seconds": 0.0}
        every = tr.steps if out.save_every <= 0 else out.save_every
        while remaining > 0:
            chunk = min(every - (trainer.global_step % every), remaining)
            stats = trainer.fit(epochs_of(windows, ctx, tr), max_steps=chunk)
            remaining -= chunk
            save_checkpoint(ckpt_dir, unwrap(train_module), trainer.optimizer,
                            train_state={"step": trainer.global_step, "scheduler": trainer.scheduler.state_dict(),
                                         "config": dict(config)})
        losses = loss_hook.losses
        summary = {"strategy": ctx.config.strategy, "world_size": ctx.world_size,
                   "mesh": dict(zip(("pp", "dp", "ep", "tp"), ctx.config.mesh_shape, strict=True)),
                   "steps": trainer.global_step, "loss_first": losses[0] if losses else None,
                   "loss_last": losses[-1] if losses else None,
                   "tokens_per_s": stats["tokens_per_s"] * ctx.data_world_size,
                   "global_batch_sequences": tr.micro_batch_size * tr.grad_accum_steps * ctx.data_world_size,
                   "checkpoint": str(ckpt_dir)}
        return summary
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.train.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (YAML or JSON)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from core.train.distributed import load_config

    try:
        summary = run(load_config(args.config))
    except VerticalsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
