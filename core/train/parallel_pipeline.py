"""Pipeline parallel for ``DeepseekV3`` via ``torch.distributed.pipelining`` (GPipe, 1F1B, interleaved 1F1B).

The decoder layers are cut into ``pp * stages_per_rank`` contiguous stages; stage 0 also holds the
embedding, the last stage the final norm and LM head. Rank ``r`` of the ``pp`` group holds stages
``r, r + pp, ...`` (one stage unless the schedule is interleaved). Each stage keeps the full model's
parameter names (``model.layers.<i>...``), so distributed checkpoints load at any other layout.

Every optimizer step, each data rank's batch (``micro_batch_size * pipeline_microbatches`` sequences) is
split by the schedule into micro-batches; gradients are averaged over them (``scale_grads``), so a
step equals one step on the whole batch. TP and FSDP apply to each stage after the cut.

Limits (checked, with a clear error): the MTP heads and the sequence-wise balance loss are not
pipelined (they need hidden states of several stages), nor are tied embeddings.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from core.train.distributed import DistContext

log = logging.getLogger(__name__)


class PipelineStageModel(nn.Module):
    """Layers ``layer_ids`` of a DeepseekV3 (+ embedding on the first stage, norm + head on the last).

    forward: first stage ``input_ids (B, T)``, others ``hidden (B, T, D)`` -> hidden (B, T, D), or
    logits (B, T, V) on the last stage. Plain causal attention (no padding masks under pipelining).
    """

    def __init__(self, full: nn.Module, layer_ids: list[int], *, first: bool, last: bool) -> None:
        super().__init__()
        self.args, self.first, self.last = full.args, first, last
        self.model = nn.Module()
        if first:
            self.model.embed_tokens = full.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[i] for i in layer_ids})
        if last:
            self.model.norm = full.model.norm
            self.lm_head = full.lm_head
        self.register_buffer("inv_freq", full.inv_freq.detach().clone(), persistent=False)
        self.rope_scale = full.rope_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from core.model.deepseek import DeepseekV3

        if self.first:
            x = self.model.embed_tokens(x)  # (B, T) -> (B, T, D)
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = DeepseekV3.rope(self, pos, x.dtype)  # (B, 1, T, d_rope/2) each
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, None)
        if self.last:
            x = self.lm_head(self.model.norm(x))  # (B, T, V)
        return x


class LocalStages(nn.Module):
    """Everything this rank holds, under the full model's names: one module for the optimizer, the
    hooks and checkpoints, sharing parameters with the stage modules the schedule runs."""

    def __init__(self, stages: list[PipelineStageModel]) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        for s in stages:
            self.model.layers.update(s.model.layers)
            if s.first:
                self.model.embed_tokens = s.model.embed_tokens
            if s.last:
                self.model.norm = s.model.norm
                self.lm_head = s.lm_head
        self._stages = stages  # not registered: the same parameters, reached through ``model``

    @torch.no_grad()
    def update_balance_bias(self, gamma: float | None = None) -> None:
        for m in self.modules():
            if hasattr(m, "update_bias") and hasattr(m, "e_score_correction_bias"):
                m.update_bias(self._stages[0].args.bias_update_speed if gamma is None else gamma)


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous, as even as possible: 10 layers over 4 stages -> [3, 3, 2, 2] layers."""
    if n_stages > n_layers:
        raise ConfigError(f"pipeline needs at least one decoder layer per stage: {n_stages} stages > "
                          f"{n_layers} num_hidden_layers")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def build_stages(model: nn.Module, ctx: DistContext) -> list[PipelineStageModel]:
    """This rank's stage modules (looped placement), each parallelized with TP/EP/FSDP."""
    from core.train.distributed import shard_model

    args = model.args
    if args.num_nextn_predict_layers:
        raise ConfigError("pipeline parallel trains the next-token loss only: set model.num_nextn_predict_layers: 0")
    if args.aux_loss_alpha > 0:
        raise ConfigError("pipeline parallel does not support the sequence-wise balance loss: set "
                          "model.aux_loss_alpha: 0 (aux-loss-free balancing still runs)")
    if args.tie_word_embeddings:
        raise ConfigError("pipeline parallel needs untied embeddings: set model.tie_word_embeddings: false")
    pp, per_rank = ctx.size("pp"), ctx.config.pipeline_stages_per_rank
    n_stages = pp * per_rank
    parts = split_layers(args.num_hidden_layers, n_stages)
    rank = ctx.coord("pp")
    stages = []
    for s in range(rank, n_stages, pp):
        stage = PipelineStageModel(model, parts[s], first=s == 0, last=s == n_stages - 1).to(ctx.device)
        shard_model(stage, ctx)
        stages.append(stage)
    return stages


def _lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of one micro-batch: logits (b, T, V), input_ids (b, T)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1))


def build_schedule(stages: list[PipelineStageModel], ctx: DistContext, n_micro: int,
                   micro_shape: tuple[int, int]) -> Any:
    """The schedule over this rank's stages. ``micro_shape`` = (sequences, seq_len) of one micro-batch:
    stage inputs/outputs are declared up front (static shapes), so no extra forward runs to infer them
    (such a forward would also count routed tokens into the balance statistics)."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    pp = ctx.size("pp")
    n_stages = pp * ctx.config.pipeline_stages_per_rank
    group = ctx.submesh("pp").get_group()
    rank = ctx.coord("pp")
    b, t = micro_shape
    D, V = stages[0].args.hidden_size, stages[0].args.vocab_size

    def meta(stage: PipelineStageModel) -> tuple[torch.Tensor, torch.Tensor]:
        x = (torch.empty(b, t, dtype=torch.long, device="meta") if stage.first
             else torch.empty(b, t, D, device="meta", requires_grad=True))
        y = torch.empty(b, t, V if stage.last else D, device="meta", requires_grad=True)
        return x, y

    pstages = []
    for m, s in zip(stages, range(rank, n_stages, pp), strict=True):
        x, y = meta(m)
        pstages.append(PipelineStage(m, stage_index=s, num_stages=n_stages, device=ctx.device, group=group,
                                     input_args=(x,), output_args=(y,)))
    name = ctx.config.pipeline_schedule
    if name == "interleaved_1f1b":
        if n_micro % pp:
            raise ConfigError(f"interleaved_1f1b needs pipeline_microbatches ({n_micro}) divisible by "
                              f"pipeline_parallel_size ({pp})")
        return ScheduleInterleaved1F1B(pstages, n_microbatches=n_micro, loss_fn=_lm_loss)
    cls = Schedule1F1B if name == "1f1b" else ScheduleGPipe
    return cls(pstages[0], n_microbatches=n_micro, loss_fn=_lm_loss)


def pipeline_step(trainer: Any, schedule: Any, stages: list[PipelineStageModel], ctx: DistContext,
                  batch: torch.Tensor) -> float:
    """One optimizer step through the schedule, with the trainer's optimizer, scheduler and hooks
    (the pipeline equivalent of ``Trainer._step``). Returns the batch loss (same on every pp rank)."""
    for h in trainer.hooks:
        h.before_step(trainer, batch)
    for s in stages:
        s.train()
    batch = batch.to(ctx.device)
    has_first = any(s.first for s in stages)
    has_last = any(s.last for s in stages)
    losses: list[torch.Tensor] = []
    args = (batch,) if has_first else ()
    kwargs: dict[str, Any] = {"target": batch, "losses": losses} if has_last else {}
    schedule.step(*args, **kwargs)
    loss = torch.stack([x.detach().float() for x in losses]).mean() if has_last else torch.zeros(())
    loss = loss.to(ctx.device)
    n_stages = ctx.size("pp") * ctx.config.pipeline_stages_per_rank
    last_rank = (n_stages - 1) % ctx.size("pp")
    group = ctx.submesh("pp").get_group()
    dist.broadcast(loss, group=group, group_src=last_rank)
    for h in trainer.hooks:
        h.after_backward(trainer)
    if trainer.grad_clip:
        raise ConfigError("pipeline steps clip through MeshGradClipHook; build the Trainer with grad_clip=None")
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    trainer.global_step += 1
    value = float(loss)
    for h in trainer.hooks:
        h.after_step(trainer, value)
    return value


def train_pipeline(model: nn.Module, ctx: DistContext, windows: torch.Tensor, tr: Any, ckpt_dir: Path,
                   *, resume: bool = True) -> dict[str, Any]:
    """The entry point's pipeline branch: stages, schedule, trainer pieces, loop, checkpoint."""
    from core.train.launch import epochs_of
    from core.train.parallel_checkpoint import load_checkpoint, save_checkpoint
    from core.train.parallel_hooks import GradSyncHook, distributed_hooks
    from core.train.trainer import Trainer

    if tr.grad_accum_steps != 1:
        raise ConfigError("with pipeline parallel, micro-batches come from distributed.pipeline_microbatches; "
                          "set train.grad_accum_steps: 1")
    n_micro = ctx.config.pipeline_microbatches or 2 * ctx.size("pp")
    stages = build_stages(model, ctx)
    local = LocalStages(stages)
    schedule = build_schedule(stages, ctx, n_micro, (tr.micro_batch_size, windows.shape[1]))
    hooks, _, loss_hook = distributed_hooks(local, ctx, grad_clip=tr.grad_clip, pp_group=ctx.submesh("pp").get_group())
    hooks = [h for h in hooks if not isinstance(h, GradSyncHook)]  # the schedule manages FSDP sync itself
    trainer = Trainer(local, lambda m, b: torch.zeros(()), lr=tr.lr, weight_decay=tr.weight_decay,
                      warmup_steps=tr.warmup_steps, total_steps=tr.steps, grad_clip=None, amp="fp32",
                      hooks=hooks, device=ctx.device, progress=False)
    if resume and (ckpt_dir / ".metadata").is_file():
        state = load_checkpoint(ckpt_dir, local, trainer.optimizer)
        trainer.global_step = int(state.get("step", 0))
        if state.get("scheduler"):
            trainer.scheduler.load_state_dict(state["scheduler"])
    per_step = tr.micro_batch_size * n_micro
    stream = epochs_of(windows, ctx, dataclasses.replace(tr, micro_batch_size=per_step))

    t0, tokens, start = time.perf_counter(), 0, trainer.global_step
    while trainer.global_step < tr.steps:
        batch = next(stream)["input_ids"]
        pipeline_step(trainer, schedule, stages, ctx, batch)
        tokens += batch.numel()
    save_checkpoint(ckpt_dir, local, trainer.optimizer,
                    train_state={"step": trainer.global_step, "scheduler": trainer.scheduler.state_dict()})
    dt = max(time.perf_counter() - t0, 1e-9)
    losses = loss_hook.losses
    return {"strategy": ctx.config.strategy, "world_size": ctx.world_size,
            "mesh": dict(zip(("pp", "dp", "ep", "tp"), ctx.config.mesh_shape, strict=True)),
            "pipeline_schedule": ctx.config.pipeline_schedule, "pipeline_microbatches": n_micro,
            "steps": trainer.global_step, "steps_this_run": trainer.global_step - start,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "tokens_per_s": tokens * ctx.data_world_size / dt,
            "global_batch_sequences": per_step * ctx.data_world_size, "checkpoint": str(ckpt_dir)}
