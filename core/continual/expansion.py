"""Elastic expansion: give a new task fresh routed experts in the core model's MoE layers.

For each ``core.model.deepseek.MoE`` layer, ``expand_moe`` appends ``n_new`` routed experts and extends
the router (``Gate``) with ``n_new`` rows. The old experts and the old router rows are frozen: the
router's weight is split into a frozen ``weight_old (E, D)`` and a trainable ``weight_new (n_new, D)``,
concatenated on the fly, so the optimizer can only move the new rows. ``expand_model`` does this for
every MoE layer and freezes everything else too, so training the new task only touches its experts.

The extended router may send old-task tokens to the new experts. Where an old task must behave exactly
as before, route it to the old experts only: ``with experts_limit(model, n_old): model(...)`` masks
the new experts out of the top-k choice (the scores of the old experts are unchanged, so old-task
outputs are bit-identical as long as the frozen parameters and the balance bias are untouched).

Checkpoint note: an expanded gate stores ``gate.weight_old`` and ``gate.weight_new`` instead of
``gate.weight``; rebuild with ``expand_model(model, n_new)`` before ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from core.errors import ConfigError
from core.model.deepseek import MLP, Gate, MoE


class ExpandedGate(Gate):
    """A ``Gate`` whose expert rows are split into a frozen old block and a trainable new block."""

    def __init__(self, gate: Gate, n_new: int) -> None:
        nn.Module.__init__(self)
        for attr in ("top_k", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                     "aux_loss_alpha", "seq_aux", "track_load"):
            setattr(self, attr, getattr(gate, attr))
        self.aux_loss = None
        old = gate.weight_old if isinstance(gate, ExpandedGate) else gate.weight
        prev_new = gate.weight_new.detach() if isinstance(gate, ExpandedGate) else old.new_empty(0, old.shape[1])
        frozen = torch.cat([old.detach(), prev_new], 0)  # (E, D): every row that exists so far is frozen
        self.n_old = frozen.shape[0]
        self.n_experts = self.n_old + n_new
        if self.n_group > 1 and self.n_experts % self.n_group:
            raise ConfigError(f"{self.n_experts} experts cannot be split into n_group={self.n_group} groups; "
                              f"add a multiple of {self.n_group} experts")
        self.weight_old = nn.Parameter(frozen.clone(), requires_grad=False)
        new = torch.empty(n_new, frozen.shape[1], device=frozen.device, dtype=frozen.dtype)
        nn.init.kaiming_uniform_(new, a=math.sqrt(5))
        self.weight_new = nn.Parameter(new)
        bias = gate.e_score_correction_bias
        # New experts start at the mean balance bias of the old ones: no head start, no handicap.
        self.register_buffer("e_score_correction_bias",
                             torch.cat([bias, bias.mean().expand(n_new)]).clone())
        self.register_buffer("load", torch.zeros(self.n_experts, device=bias.device), persistent=False)
        self.limit: int | None = None  # route only to experts [0, limit) when set

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return torch.cat([self.weight_old, self.weight_new], 0)  # (E + n_new, D)

    def forward(self, x: torch.Tensor, batch_shape: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.limit is None:
            return super().forward(x, batch_shape)
        saved = self.e_score_correction_bias.clone()
        try:  # -inf bias: never chosen; the weights of chosen experts come from the raw scores
            self.e_score_correction_bias[self.limit :] = float("-inf")
            return super().forward(x, batch_shape)
        finally:
            self.e_score_correction_bias.copy_(saved)


def expand_moe(moe: MoE, n_new: int, *, init: Literal["copy", "random"] = "copy") -> list[nn.Parameter]:
    """Append ``n_new`` routed experts to ``moe`` and extend its router; freeze the old experts and rows.

    ``init="copy"`` starts each new expert as a copy of an old one (round-robin), so it begins from
    useful features; ``"random"`` uses the default init. Returns the new trainable parameters.
    """
    if n_new < 1:
        raise ConfigError(f"n_new must be >= 1, not {n_new}")
    if not isinstance(moe, MoE):
        raise ConfigError(f"expand_moe needs a core.model.deepseek.MoE, not {type(moe).__name__}")
    n_old = len(moe.experts)
    if moe.gate.top_k > n_old + n_new:
        raise ConfigError("top-k exceeds the number of experts")
    moe.gate = ExpandedGate(moe.gate, n_new)
    for expert in moe.experts:
        expert.requires_grad_(False)
    ref = moe.experts[0].gate_proj.weight
    new_params: list[nn.Parameter] = [moe.gate.weight_new]
    for i in range(n_new):
        dim, inter = ref.shape[1], ref.shape[0]
        expert = MLP(dim, inter).to(device=ref.device, dtype=ref.dtype)
        if init == "copy":
            expert.load_state_dict(moe.experts[i % n_old].state_dict())
        expert.requires_grad_(True)
        moe.experts.append(expert)
        new_params += list(expert.parameters())
    return new_params


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def expand_model(model: nn.Module, n_new: int, *, init: Literal["copy", "random"] = "copy",
                 freeze_rest: bool = True) -> list[nn.Parameter]:
    """Expand every MoE layer of ``model`` by ``n_new`` experts. With ``freeze_rest`` every other
    parameter (attention, norms, shared experts, embeddings) is frozen too, so the returned list is
    exactly what trains."""
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("the model has no core.model.deepseek.MoE layer to expand")
    if freeze_rest:
        model.requires_grad_(False)
    new: list[nn.Parameter] = []
    for moe in layers:
        new += expand_moe(moe, n_new, init=init)
    return new


@contextlib.contextmanager
def experts_limit(model: nn.Module, n_experts: int | None) -> Iterator[nn.Module]:
    """Route every expanded MoE layer to its first ``n_experts`` experts only (``None``: all)."""
    gates = [m.gate for m in moe_layers(model) if isinstance(m.gate, ExpandedGate)]
    previous = [g.limit for g in gates]
    for g in gates:
        if n_experts is not None and n_experts < g.top_k:
            raise ConfigError(f"cannot route top-{g.top_k} among only {n_experts} experts")
        g.limit = n_experts
    try:
        yield model
    finally:
        for g, p in zip(gates, previous, strict=True):
            g.limit = p
