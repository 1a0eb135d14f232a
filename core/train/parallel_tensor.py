"""Tensor parallel (Megatron-style, via ``torch.distributed.tensor.parallel``) and expert parallel for
``core.model.deepseek.DeepseekV3``.

Tensor parallel plan per decoder layer (``tp`` ranks; inputs and outputs of a layer are replicated):

====================================  ===========  ==============================================
module                                 style        why
====================================  ===========  ==============================================
``self_attn.q_proj`` / ``q_b_proj``    colwise      heads split across ranks: (D -> H/tp * d_qk)
``self_attn.q_a_proj``                 replicated   small latent (D -> q_lora_rank), every head needs it
``self_attn.kv_a_proj_with_mqa``       replicated   the shared KV latent + RoPE key (MLA's cache)
``self_attn.kv_b_proj``                colwise      latent -> per-head keys/values, heads split
``self_attn.o_proj``                   rowwise      local heads -> partial sums, one all-reduce
``mlp.gate_proj`` / ``up_proj``        colwise      intermediate split
``mlp.down_proj``                      rowwise      one all-reduce
routed + shared experts                as ``mlp``   each expert is an MLP
``mlp.gate`` (router)                  replicated   every rank must choose the same experts
====================================  ===========  ==============================================

So a layer costs two all-reduces of (B, T, D) forward and two backward (plus a small one of the
shared RoPE key's gradient, (B, T, d_rope)). The attention module's ``n_heads`` is set to the local
head count, which is all MLA's reshapes use.

Expert parallel: routed experts are partitioned over the ``ep`` ranks (rank r keeps experts
[r*E/ep, (r+1)*E/ep)); each rank routes its own tokens, sends every (token, expert) pair to the
rank owning the expert with one all-to-all, runs its local experts, and an all-to-all brings the
outputs back (both differentiable). Shared experts and the router stay replicated.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)


def _mlp_plan(prefix: str) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {f"{prefix}gate_proj": ColwiseParallel(), f"{prefix}up_proj": ColwiseParallel(),
            f"{prefix}down_proj": RowwiseParallel()}


def decoder_layer_plan(layer: nn.Module) -> dict[str, Any]:
    """The ``parallelize_module`` plan for one ``DecoderLayer`` (keys relative to the layer)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    attn = layer.self_attn
    plan: dict[str, Any] = {}
    if getattr(attn, "q_lora_rank", None) is None:
        plan["self_attn.q_proj"] = ColwiseParallel()
    else:
        plan["self_attn.q_b_proj"] = ColwiseParallel()
    plan["self_attn.kv_b_proj"] = ColwiseParallel()
    plan["self_attn.o_proj"] = RowwiseParallel()
    ffn = layer.mlp
    if hasattr(ffn, "experts"):
        for i in range(len(ffn.experts)):
            plan.update(_mlp_plan(f"mlp.experts.{i}."))
        plan.update(_mlp_plan("mlp.shared_experts."))
    else:
        plan.update(_mlp_plan("mlp."))
    return plan


def _check_divisible(layer: nn.Module, tp: int) -> None:
    attn = layer.self_attn
    if attn.n_heads % tp:
        raise ConfigError(f"tensor_parallel_size={tp} must divide num_attention_heads={attn.n_heads}")
    ffn = layer.mlp
    mlps = [*ffn.experts, ffn.shared_experts] if hasattr(ffn, "experts") else [ffn]
    for m in mlps:
        inter = m.gate_proj.out_features
        if inter % tp:
            raise ConfigError(f"tensor_parallel_size={tp} must divide the MLP width {inter} "
                              "(intermediate_size / moe_intermediate_size)")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer of a DeepseekV3: the backbone's and the MTP modules' blocks."""
    container = model.model.layers if hasattr(model, "model") else getattr(model, "layers", [])
    layers = list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)
    for mod in getattr(model, "mtp", []):
        layers.append(mod.block)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no decoder layers to parallelize")
    return layers


class _AllReduceGradTail(torch.autograd.Function):
    """Identity forward; backward all-reduces the last ``width`` features of the gradient over ``group``.

    MLA's decoupled RoPE key ``k_pe`` (the tail of ``kv_a_proj_with_mqa``'s output) is shared by all
    heads; with heads split over ranks each rank back-propagates only its heads' share into it, so
    those gradients are summed here (Megatron's "copy to tensor-parallel region" for this slice).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, width: int, group: Any) -> torch.Tensor:
        ctx.width, ctx.group = width, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        import torch.distributed as dist

        grad = grad.clone()
        tail = grad[..., -ctx.width:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., -ctx.width:] = tail
        return grad, None, None


def _sum_rope_key_grad(width: int, group: Any) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return _AllReduceGradTail.apply(output, width, group)

    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard every decoder layer of ``model`` over ``tp_mesh`` in place (see the module docstring).

    Embedding, final norm and LM head stay replicated: at this project's sizes the head is a small share
    of compute, and keeping logits whole keeps the loss code unchanged.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    for layer in decoder_layers(model):
        _check_divisible(layer, tp)
        parallelize_module(layer, tp_mesh, decoder_layer_plan(layer))
        attn = layer.self_attn
        attn.n_heads //= tp  # MLA reshapes with the local head count
        attn.kv_a_proj_with_mqa.register_forward_hook(_sum_rope_key_grad(attn.qk_rope_head_dim,
                                                                          tp_mesh.get_group()))
    return model


# ---------------------------------------------------------------------------------------------------
# Expert parallel
# ---------------------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Differentiable all-to-all of rows: send ``in_splits[r]`` rows to rank r, receive ``out_splits[r]``."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


class ExpertParallelMoE(nn.Module):
    """DeepSeekMoE with routed experts spread over an expert-parallel group.

    Holds the original router (``gate``), this rank's slice of ``experts`` (an ``nn.ModuleDict`` keyed by
    the global expert index, so checkpoint keys ``mlp.experts.<i>.*`` stay those of the full model) and
    the shared experts. Token flow for N local tokens, top-k routing::

        (N, D) -> router -> N*k (token, expert) pairs, sorted by owner rank
               -> all-to-all (pairs to owners) -> local experts -> all-to-all back
               -> weighted sum into (N, D) + shared experts
    """

    def __init__(self, moe: nn.Module, group: Any, ep_rank: int, ep_size: int) -> None:
        super().__init__()
        n = len(moe.experts)
        if n % ep_size:
            raise ConfigError(f"expert_parallel_size={ep_size} must divide n_routed_experts={n}")
        self.n_experts, self.ep_size, self.ep_rank, self.group = n, ep_size, ep_rank, group
        self.per_rank = n // ep_size
        self.start = ep_rank * self.per_rank
        self.gate = moe.gate
        self.experts = nn.ModuleDict({str(i): moe.experts[i] for i in range(self.start, self.start + self.per_rank)})
        self.shared_experts = moe.shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, D)
        w, idx = self.gate(xf, (shape[0], shape[1]) if x.dim() == 3 else None)  # (N, k), (N, k)
        N, k = idx.shape
        flat_e = idx.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_e, stable=True)  # pairs grouped by expert, hence by owner rank
        tok = torch.arange(N, device=x.device).repeat_interleave(k)[order]  # (N*k,) source token of each pair
        e_sorted = flat_e[order]
        send = torch.bincount(e_sorted // self.per_rank, minlength=self.ep_size)  # (ep,) pairs per owner
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # how many pairs each peer sends me
        send_l, recv_l = send.tolist(), recv.tolist()
        x_in = _all_to_all(xf[tok], recv_l, send_l, self.group)  # (M, D) tokens for my experts
        e_in = torch.empty(sum(recv_l), dtype=e_sorted.dtype, device=x.device)
        dist.all_to_all_single(e_in, e_sorted.contiguous(), recv_l, send_l, group=self.group)
        # Every local expert runs, even on zero rows: each then has a gradient on every rank, so the
        # data-parallel reduction of expert weights is the same collective everywhere.
        y_in = torch.zeros_like(x_in)
        for j in range(self.per_rank):
            rows = torch.where(e_in == self.start + j)[0]
            y_in = y_in.index_add(0, rows, self.experts[str(self.start + j)](x_in[rows]))
        y_back = _all_to_all(y_in, send_l, recv_l, self.group)  # (N*k, D) in sorted pair order
        wk = w.reshape(-1)[order].unsqueeze(-1)  # (N*k, 1)
        y = torch.zeros_like(xf).index_add(0, tok, y_back * wk)
        return (y + self.shared_experts(xf)).view(shape)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Replace every MoE layer's expert list by this rank's slice and route through all-to-all."""
    group = ep_mesh.get_group()
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    n = 0
    for layer in decoder_layers(model):
        if hasattr(layer.mlp, "experts") and not isinstance(layer.mlp, ExpertParallelMoE):
            layer.mlp = ExpertParallelMoE(layer.mlp, group, ep_rank, ep_size)
            n += 1
    if n == 0:
        raise ConfigError("expert_parallel_size > 1 but the model has no MoE layers (n_routed_experts=0)")
    return model
