"""Trainer hooks that make the single-process ``Trainer`` correct on a mesh (``core.train.hooks`` protocol).

- :class:`GradSyncHook`: gradient accumulation without a reduction per micro-batch (DDP ``no_sync`` /
  FSDP2 ``set_requires_gradient_sync``): only the last micro-batch of a step reduces.
- :class:`MeshGradClipHook`: gradient-norm clipping over parameters that are plain tensors, DTensors on
  different meshes (TP slices, FSDP shards) and pipeline stages on other ranks.
- :class:`ExpertLoadSyncHook`: DeepSeek-V3's aux-loss-free balancing counts tokens per expert; every
  data rank counts only its own tokens, so the counts are summed over the data ranks before the bias
  update, which then moves identically everywhere (and equals the single-process update).
- :class:`GlobalLossHook`: the loss averaged over data ranks, per step (what a single process would see).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from core.errors import VerticalsError
from core.train.hooks import TrainerHook

if TYPE_CHECKING:  # pragma: no cover
    from core.train.distributed import DistContext


class GradSyncHook(TrainerHook):
    """Reduce gradients once per optimizer step instead of once per micro-batch.

    The trainer calls ``before_step`` for each micro-batch; all but the last run without gradient sync.
    The loader must yield a multiple of ``grad_accum_steps`` batches per epoch (the entry point drops the
    remainder), otherwise the last, shorter group would never be reduced: that is detected and reported.
    """

    name = "grad_sync"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._micro = 0
        self._synced = True

    def _set_sync(self, enabled: bool) -> None:
        if hasattr(self.model, "require_backward_grad_sync"):  # DDP
            self.model.require_backward_grad_sync = enabled
        else:
            inner = getattr(self.model, "model", self.model)
            setter = getattr(inner, "set_requires_gradient_sync", None)  # FSDP2
            if setter is not None:
                setter(enabled)
        self._synced = enabled

    def before_step(self, trainer: Any, batch: Any) -> None:
        self._micro += 1
        self._set_sync(self._micro >= trainer.grad_accum_steps)

    def after_backward(self, trainer: Any) -> None:
        if not self._synced:
            self._set_sync(True)
            self._micro = 0
            raise VerticalsError("gradient accumulation group ended early: the number of batches per epoch "
                                 f"must be a multiple of grad_accum_steps={trainer.grad_accum_steps}")
        self._micro = 0


def _grad_norm_sq(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries of ``grads`` as a plain fp32 scalar; DTensors are reduced over their mesh."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups[key].append(g)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for key, gs in groups.items():
        norm = torch.nn.utils.get_total_norm(gs, norm_type=2.0)
        if key is not None:
            norm = norm.full_tensor()  # partial sums over shards -> the whole tensors' norm
        total = total + norm.float() ** 2
    return total


class MeshGradClipHook(TrainerHook):
    """Clip the global gradient norm to ``max_norm`` (use with ``Trainer(grad_clip=None)``).

    ``pp_group``: the pipeline group; each stage holds different parameters, so squared norms are summed
    over it. The last computed norm is kept in ``last_norm`` (for logging and tests).
    """

    name = "mesh_grad_clip"

    def __init__(self, max_norm: float, pp_group: Any = None) -> None:
        if max_norm <= 0:
            raise VerticalsError(f"grad clip must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)
        self.pp_group = pp_group
        self.last_norm = math.nan

    def after_backward(self, trainer: Any) -> None:
        params = [p for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        sq = _grad_norm_sq([p.grad for p in params]) if params else torch.zeros(())
        if self.pp_group is not None:
            dist.all_reduce(sq, group=self.pp_group)
        norm = float(sq.sqrt())
        self.last_norm = norm
        coef = self.max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)


class ExpertLoadSyncHook(TrainerHook):
    """Sum MoE routing counts over the data ranks, then apply the aux-loss-free bias update.

    ``update_bias``: call ``model.update_balance_bias()`` after summing (the trainer does not do it on
    its own). Ranks of one tensor-parallel or pipeline group see the same tokens and are not summed.
    """

    name = "expert_load_sync"

    def __init__(self, model: nn.Module, ctx: DistContext, *, update_bias: bool = True) -> None:
        self.model = model
        self.ctx = ctx
        self.update_bias = update_bias

    def after_step(self, trainer: Any, loss: float) -> None:
        from core.train.distributed import data_group

        gates = [m for m in self.model.modules() if hasattr(m, "e_score_correction_bias") and hasattr(m, "load")]
        if not gates:
            return
        group = data_group(self.ctx)
        if group is not None:
            loads = torch.stack([g.load for g in gates])  # (layers, E): one collective for all layers
            dist.all_reduce(loads, group=group)
            for g, row in zip(gates, loads, strict=True):
                g.load.copy_(row)
        if self.update_bias and hasattr(self.model, "update_balance_bias"):
            self.model.update_balance_bias()


class GlobalLossHook(TrainerHook):
    """Record the loss averaged over the data ranks after every optimizer step (``losses``)."""

    name = "global_loss"

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.losses: list[float] = []

    def after_step(self, trainer: Any, loss: float) -> None:
        from core.train.distributed import mean_over_data_ranks

        self.losses.append(mean_over_data_ranks(loss, self.ctx))

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = list(state.get("losses", []))


class UnusedExpertGradHook(TrainerHook):
    """Give experts that no token chose in this step no gradient (``None``), as on one process.

    Under FSDP2 every expert must have a gradient on every rank (ranks reduce-scatter the same set), so
    unused experts get exact zeros. AdamW would still move a zero-gradient weight (momentum, decay);
    a single process skips it. One small all-reduce of "had a non-zero gradient" flags per step restores
    the single-process update. ``groups``: (process group or None, parameters) pairs whose flags are
    combined (the ranks that hold the same experts).
    """

    name = "unused_expert_grad"

    def __init__(self, groups: list[tuple[Any, list[nn.Parameter]]]) -> None:
        self.groups = [(g, ps) for g, ps in groups if ps]

    @classmethod
    def for_model(cls, model: nn.Module, ctx: DistContext) -> UnusedExpertGradHook:
        from core.train.distributed import data_group
        from core.train.parallel_tensor import ExpertParallelMoE

        dense: list[nn.Parameter] = []
        ep_local: list[nn.Parameter] = []
        for m in model.modules():
            if isinstance(m, ExpertParallelMoE):
                ep_local.extend(m.experts.parameters())
            elif hasattr(m, "experts") and hasattr(m, "gate"):
                dense.extend(m.experts.parameters())
        dp_group = ctx.submesh("dp").get_group() if ctx.is_distributed else None
        return cls([(data_group(ctx), dense), (dp_group, ep_local)])

    def after_backward(self, trainer: Any) -> None:
        from torch.distributed.tensor import DTensor

        for group, params in self.groups:
            flags = torch.zeros(len(params), dtype=torch.float32)
            for i, p in enumerate(params):
                g = p.grad
                if g is not None:
                    local = g.to_local() if isinstance(g, DTensor) else g
                    flags[i] = float(bool(local.ne(0).any()))
            if group is not None:
                flags = flags.to(params[0].device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            for p, f in zip(params, flags.tolist(), strict=True):
                if f == 0.0:
                    p.grad = None


def distributed_hooks(train_module: nn.Module, ctx: DistContext, *, grad_clip: float | None = 1.0,
                      pp_group: Any = None) -> tuple[list[TrainerHook], float | None, GlobalLossHook]:
    """The hooks a strategy needs, and the ``grad_clip`` to hand the ``Trainer`` itself.

    Returns ``(hooks, trainer_grad_clip, loss_hook)``: under 3d_parallel (DTensors on several meshes) or
    pipeline parallel clipping moves into :class:`MeshGradClipHook` and the trainer's own is switched off.
    """
    from core.train.distributed import has_moe, unwrap

    model = unwrap(train_module)
    hooks: list[TrainerHook] = [GradSyncHook(train_module)]
    moe = has_moe(model)
    if moe and ctx.is_distributed and ctx.config.strategy != "ddp":
        hooks.append(UnusedExpertGradHook.for_model(model, ctx))
    trainer_clip = grad_clip
    if grad_clip and ctx.is_distributed and (ctx.config.strategy == "3d_parallel" or pp_group is not None):
        hooks.append(MeshGradClipHook(grad_clip, pp_group=pp_group))
        trainer_clip = None
    if moe:
        hooks.append(ExpertLoadSyncHook(model, ctx))
    loss_hook = GlobalLossHook(ctx)
    hooks.append(loss_hook)
    return hooks, trainer_clip, loss_hook
