"""Structured pruning of the core DeepSeek-V3 LM: FFN channels, routed experts, attention heads.

Why structured: removing whole channels / experts / heads gives a smaller *dense* model that runs
faster with the same kernels, unlike unstructured sparsity. The pruned model is again a plain
``DeepseekV3`` with a smaller config (``intermediate_size``, ``moe_intermediate_size``,
``n_routed_experts``, ``num_attention_heads``), so it saves, loads, quantizes and serves like any other.
The same keep-fraction is applied in every layer because the config has one size per kind.

Importance (activation-based, measured on calibration text with forward pre-hooks):
- FFN channel j of an MLP: mean |a_j| x ||W_down[:, j]||, with a = silu(gate) * up the input of
  ``down_proj`` (how much the channel contributes to the block output on real text).
- Routed expert e: tokens routed to it x mean ||a|| x ||W_down|| (rarely chosen, weak experts go first).
- Attention head h: mean |o_h| over its slice of ``o_proj``'s input x ||W_o[:, slice]||.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError
from core.model.deepseek import MLA, MLP, DeepseekV3, ModelArgs, MoE
from core.quant.calibrate import LayerStats, collect_stats

log = logging.getLogger(__name__)


@dataclass
class PrunePlan:
    keep_fraction: float
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_attention_heads: int
    params_before: int
    params_after: int

    @property
    def sparsity(self) -> float:
        return 1 - self.params_after / max(self.params_before, 1)


def _round_to(n: float, mult: int, lo: int) -> int:
    return max(lo, int(round(n / mult)) * mult) if n >= mult else max(lo, int(round(n)))


def _shape_for(args: ModelArgs, f: float, parts: Sequence[str]) -> ModelArgs:
    """Config with a keep-fraction f applied to the chosen parts."""
    a = copy.deepcopy(args)
    if "ffn" in parts:
        a.intermediate_size = _round_to(args.intermediate_size * f, 8, 8)
        a.moe_intermediate_size = _round_to(args.moe_intermediate_size * f, 8, 8)
    if "experts" in parts and args.n_routed_experts > 0:
        g = max(args.n_group, 1)
        e = _round_to(args.n_routed_experts * f, g, max(args.num_experts_per_tok, g))
        a.n_routed_experts = max(e, ((args.num_experts_per_tok + g - 1) // g) * g)
    if "heads" in parts:
        a.num_attention_heads = max(1, int(round(args.num_attention_heads * f)))
        a.num_key_value_heads = a.num_attention_heads
    return a


def count_params(args: ModelArgs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DeepseekV3(args).parameters())


def plan_pruning(args: ModelArgs, sparsity: float, parts: Sequence[str] = ("ffn", "experts", "heads")
                 ) -> PrunePlan:
    """Smallest uniform cut (keep-fraction f) that removes at least ``sparsity`` of all parameters."""
    if not 0.0 < sparsity < 0.9:
        raise ConfigError(f"sparsity {sparsity} must be in (0, 0.9)")
    unknown = set(parts) - {"ffn", "experts", "heads"}
    if unknown:
        raise ConfigError(f"unknown prune parts {sorted(unknown)}; choose from ffn, experts, heads")
    before = count_params(args)
    best = None
    for step in range(100, 4, -1):  # f from 1.00 down to 0.05
        f = step / 100
        a = _shape_for(args, f, parts)
        after = count_params(a)
        best = PrunePlan(f, a.intermediate_size, a.moe_intermediate_size, a.n_routed_experts,
                         a.num_attention_heads, before, after)
        if 1 - after / before >= sparsity:
            return best
    raise ConfigError(f"cannot remove {sparsity:.0%} of the parameters by pruning {', '.join(parts)} "
                      f"alone (at most {best.sparsity if best else 0:.0%}); the embeddings and head dominate "
                      "this model: add parts or lower --sparsity")


def _col_norm(w: torch.Tensor) -> torch.Tensor:
    return w.float().norm(dim=0)


def _mlp_keep(mlp: MLP, st: LayerStats | None, keep: int) -> torch.Tensor:
    score = _col_norm(mlp.down_proj.weight)
    if st is not None and st.rows:
        score = score * st.x_abs_mean
    return score.topk(keep).indices.sort().values


@torch.no_grad()
def _slice_mlp(mlp: MLP, idx: torch.Tensor) -> MLP:
    D = mlp.gate_proj.in_features
    new = MLP(D, len(idx))
    new.gate_proj.weight.copy_(mlp.gate_proj.weight[idx])
    new.up_proj.weight.copy_(mlp.up_proj.weight[idx])
    new.down_proj.weight.copy_(mlp.down_proj.weight[:, idx])
    return new


@torch.no_grad()
def prune_model(model: DeepseekV3, calib_batches: Sequence[torch.Tensor], sparsity: float = 0.3,
                parts: Sequence[str] = ("ffn", "experts", "heads"), progress: bool = True
                ) -> tuple[DeepseekV3, PrunePlan]:
    """A new, smaller DeepseekV3 (the input is left untouched) and the plan it follows."""
    if not calib_batches:
        raise ConfigError("pruning needs calibration batches to rank channels, experts and heads")
    plan = plan_pruning(model.args, sparsity, parts)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (n.endswith("down_proj") or n.endswith("o_proj"))]
    for g in model.gates():
        g.track_load = True
        g.load.zero_()
    stats = collect_stats(model, calib_batches, names, max_rows=1, progress=progress)
    new_args = copy.deepcopy(model.args)
    new_args.intermediate_size = plan.intermediate_size
    new_args.moe_intermediate_size = plan.moe_intermediate_size
    new_args.n_routed_experts = plan.n_routed_experts
    new_args.num_attention_heads = new_args.num_key_value_heads = plan.num_attention_heads
    new_args.__post_init__()
    student = DeepseekV3(new_args)
    src_state = {k: v for k, v in model.state_dict().items()}
    student.load_state_dict({k: v for k, v in src_state.items()
                             if k in student.state_dict() and student.state_dict()[k].shape == v.shape},
                            strict=False)
    for i, (src, dst) in enumerate(zip(model.model.layers, student.model.layers, strict=True)):
        _prune_layer(src, dst, f"model.layers.{i}.", stats, plan, parts)
    for k in range(len(model.mtp)):
        _prune_layer(model.mtp[k].block, student.mtp[k].block, f"mtp.{k}.block.", stats, plan, parts)
    for g in model.gates():
        g.track_load = False
    return student.eval(), plan


@torch.no_grad()
def _prune_layer(src: nn.Module, dst: nn.Module, prefix: str, stats: dict[str, LayerStats], plan: PrunePlan,
                 parts: Sequence[str]) -> None:
    # Attention heads.
    a_src, a_dst = src.self_attn, dst.self_attn
    if isinstance(a_src, MLA) and a_dst.n_heads != a_src.n_heads:
        H, dv, dq = a_src.n_heads, a_src.v_head_dim, a_src.qk_head_dim
        dkv = a_src.qk_nope_head_dim + dv
        wo = a_src.o_proj.weight.float().view(-1, H, dv)  # (D, H, dv)
        score = wo.pow(2).sum((0, 2)).sqrt()
        st = stats.get(prefix + "self_attn.o_proj")
        if st is not None and st.rows:
            score = score * st.x_abs_mean.view(H, dv).mean(-1)
        heads = score.topk(a_dst.n_heads).indices.sort().values
        for name in ("q_proj", "q_b_proj"):
            if hasattr(a_src, name):
                w = getattr(a_src, name).weight.view(H, dq, -1)[heads]
                getattr(a_dst, name).weight.copy_(w.reshape(-1, w.shape[-1]))
        w = a_src.kv_b_proj.weight.view(H, dkv, -1)[heads]
        a_dst.kv_b_proj.weight.copy_(w.reshape(-1, w.shape[-1]))
        a_dst.o_proj.weight.copy_(wo[:, heads].reshape(wo.shape[0], -1))
        if a_src.o_proj.bias is not None:
            a_dst.o_proj.bias.copy_(a_src.o_proj.bias)
    # Feed-forward.
    m_src, m_dst = src.mlp, dst.mlp
    if isinstance(m_src, MoE):
        g = m_src.gate
        keep_e = torch.arange(g.n_experts)
        if len(m_dst.experts) != len(m_src.experts):
            score = torch.zeros(g.n_experts)
            for e, ex in enumerate(m_src.experts):
                st = stats.get(f"{prefix}mlp.experts.{e}.down_proj")
                mass = (st.x_abs_mean.sum() * st.rows) if st is not None else torch.tensor(0.0)
                score[e] = float(mass) * float(ex.down_proj.weight.norm()) + float(g.load[e])
            keep_e = score.topk(len(m_dst.experts)).indices.sort().values
        m_dst.gate.weight.copy_(g.weight[keep_e])
        m_dst.gate.e_score_correction_bias.copy_(g.e_score_correction_bias[keep_e])
        for j, e in enumerate(keep_e.tolist()):
            name = f"{prefix}mlp.experts.{e}.down_proj"
            idx = _mlp_keep(m_src.experts[e], stats.get(name), m_dst.experts[j].gate_proj.out_features)
            m_dst.experts[j] = _slice_mlp(m_src.experts[e], idx)
        sh = m_src.shared_experts
        idx = _mlp_keep(sh, stats.get(f"{prefix}mlp.shared_experts.down_proj"), m_dst.shared_experts.gate_proj.out_features)
        m_dst.shared_experts = _slice_mlp(sh, idx)
    elif isinstance(m_src, MLP):
        idx = _mlp_keep(m_src, stats.get(f"{prefix}mlp.down_proj"), m_dst.gate_proj.out_features)
        dst.mlp = _slice_mlp(m_src, idx)
