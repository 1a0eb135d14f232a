"""Communication volume per optimizer step, per rank, for each strategy (bytes, from mesh and shapes).

Counted as the bytes one rank *sends* with the standard algorithms: a ring all-reduce of S bytes over n
ranks sends 2(n-1)/n * S, an all-gather or reduce-scatter (n-1)/n * S, an all-to-all (n-1)/n of what
leaves the rank (uniform routing assumed), a pipeline send/recv the activation once.

What each term is (N = tokens per micro-batch per data rank = micro_batch * seq_len, D = hidden size,
m = micro-batches per optimizer step, P = parameters this rank holds after TP/EP sharding):

- ``dp_grad_allreduce`` (ddp): fp32 gradients of all P, once per step (no_sync on the other micro-batches).
- ``fsdp_allgather`` (fsdp / 3d): parameters gathered before forward and again before backward
  (``reshard_after_forward``; the root unit is kept) for every micro-batch, in the compute dtype.
- ``fsdp_reduce_scatter``: fp32 gradients once per step.
- ``tp_allreduce`` (3d, tp>1): per decoder layer and micro-batch, the RowwiseParallel outputs in
  forward (attention ``o_proj``, MLP ``down_proj``, each routed expert's rows: N*k, shared experts) and
  the ColwiseParallel input gradients in backward (``q_proj``, ``kv_b_proj``, ``gate_proj`` + ``up_proj``
  each, and MLA's shared RoPE key gradient).
- ``ep_all_to_all`` (3d, ep>1): dispatch + combine of N*k token rows, forward and backward.
- ``pp_send_recv`` (3d, pp>1): the (N, D) activation to the next stage and its gradient back, per
  micro-batch (a middle stage; the first and last stages send half of that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError
from core.train.distributed import DistributedConfig, resolve_precision

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class ModelShapes:
    """What the volume depends on, read from a (meta-device) DeepseekV3."""

    params: int
    expert_params: int  # routed experts only
    tp_sharded_params: int  # weights a TP plan splits (dense and routed)
    tp_sharded_expert_params: int
    hidden: int
    q_in: int  # q_proj input width (D) or q_lora_rank
    kv_lora_rank: int
    rope_dim: int
    top_k: int
    dense_layers: int  # decoder layers with a dense MLP (MTP blocks included)
    moe_layers: int
    n_heads: int
    n_experts: int
    ffn_widths: tuple[int, ...]  # intermediate widths TP must divide

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShapes:
        from core.train.parallel_tensor import decoder_layer_plan, decoder_layers

        params = sum(p.numel() for p in model.parameters())
        expert = tp_sharded = tp_expert = 0
        dense_layers = moe_layers = 0
        for layer in decoder_layers(model):
            plan = decoder_layer_plan(layer)
            for name in plan:
                n = layer.get_submodule(name).weight.numel()
                tp_sharded += n
                if ".experts." in name:
                    tp_expert += n
            if hasattr(layer.mlp, "experts"):
                moe_layers += 1
                expert += sum(p.numel() for p in layer.mlp.experts.parameters())
            else:
                dense_layers += 1
        args = model.args
        q_in = args.hidden_size if args.q_lora_rank is None else args.q_lora_rank
        return cls(params=params, expert_params=expert, tp_sharded_params=tp_sharded,
                   tp_sharded_expert_params=tp_expert, hidden=args.hidden_size, q_in=q_in,
                   kv_lora_rank=args.kv_lora_rank, rope_dim=args.qk_rope_head_dim,
                   top_k=args.num_experts_per_tok, dense_layers=dense_layers, moe_layers=moe_layers,
                   n_heads=args.num_attention_heads, n_experts=args.n_routed_experts,
                   ffn_widths=(args.intermediate_size, args.moe_intermediate_size,
                               args.moe_intermediate_size * max(args.n_shared_experts, 1)))

    @classmethod
    def from_args(cls, args: Any) -> ModelShapes:
        """Shapes of ``DeepseekV3(args)`` without allocating it (meta device)."""
        from core.model.deepseek import DeepseekV3

        with torch.device("meta"):
            model = DeepseekV3(args)
        return cls.from_model(model)


def _ring_allreduce(nbytes: float, n: int) -> float:
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def _gather(nbytes: float, n: int) -> float:
    return (n - 1) / n * nbytes if n > 1 else 0.0


def comm_volume(shapes: ModelShapes, cfg: DistributedConfig, *, world_size: int, micro_batch: int, seq_len: int,
                grad_accum_steps: int = 1, device: str = "cuda") -> dict[str, Any]:
    """Bytes one rank sends per optimizer step, by term, plus ``total``; see the module docstring.

    ``micro_batch``: sequences per micro-batch per data rank; with pipeline parallel the step's batch is
    cut into ``pipeline_microbatches`` micro-batches instead of using gradient accumulation.
    """
    cfg = cfg.resolve(world_size)
    pp, dp, ep, tp = cfg.mesh_shape
    if shapes.n_heads % tp or any(w % tp for w in shapes.ffn_widths):
        raise ConfigError(f"tensor_parallel_size={tp} must divide num_attention_heads={shapes.n_heads} and the "
                          f"MLP widths {shapes.ffn_widths}")
    if ep > 1 and (shapes.n_experts == 0 or shapes.n_experts % ep):
        raise ConfigError(f"expert_parallel_size={ep} must divide n_routed_experts={shapes.n_experts}")
    compute = resolve_precision(cfg.mixed_precision, torch.device(device))
    act_b, grad_b = _BYTES[compute], 4  # activations in the compute dtype, gradients reduced in fp32
    m = grad_accum_steps
    if pp > 1:
        m = cfg.pipeline_microbatches or 2 * pp
    N, D, k = micro_batch * seq_len, shapes.hidden, shapes.top_k

    # Parameters this rank holds: TP splits the planned weights, EP the routed experts, PP the layers.
    dense = shapes.params - shapes.expert_params
    dense_tp = shapes.tp_sharded_params - shapes.tp_sharded_expert_params
    dense_local = (dense - dense_tp) + dense_tp / tp
    expert_local = shapes.expert_params / ep / tp if shapes.expert_params else 0.0
    dense_local, expert_local = dense_local / pp, expert_local / pp
    layers_local = (shapes.dense_layers + shapes.moe_layers) / pp
    moe_local = shapes.moe_layers / pp
    dense_mlp_local = shapes.dense_layers / pp

    out: dict[str, float] = {}
    if cfg.strategy == "ddp":
        out["dp_grad_allreduce"] = _ring_allreduce((dense_local + expert_local) * grad_b, dp)
    else:
        shard_dense = dp * ep if ep > 1 else dp
        gathers = 2 if cfg.reshard_after_forward else 1
        out["fsdp_allgather"] = m * gathers * (_gather(dense_local * act_b, shard_dense)
                                               + _gather(expert_local * act_b, dp))
        out["fsdp_reduce_scatter"] = (_gather(dense_local * grad_b, shard_dense)
                                      + _gather(expert_local * grad_b, dp))
    if tp > 1:
        attn_fwd = N * D
        attn_bwd = N * shapes.q_in + N * shapes.kv_lora_rank + N * shapes.rope_dim
        mlp_fwd, mlp_bwd = N * D, 2 * N * D
        moe_fwd, moe_bwd = N * D + N * k * D, 2 * N * D + 2 * N * k * D
        elems = (layers_local * (attn_fwd + attn_bwd) + dense_mlp_local * (mlp_fwd + mlp_bwd)
                 + moe_local * (moe_fwd + moe_bwd))
        out["tp_allreduce"] = m * _ring_allreduce(elems * act_b, tp)
    if ep > 1:
        rows = N * k * D * act_b
        out["ep_all_to_all"] = m * moe_local * 4 * _gather(rows, ep)  # dispatch + combine, fwd + bwd
    if pp > 1:
        out["pp_send_recv"] = m * 2 * N * D * act_b
    total = sum(out.values())
    return {"strategy": cfg.strategy, "mesh": {"pp": pp, "dp": dp, "ep": ep, "tp": tp},
            "micro_batches": m, "tokens_per_step": N * m * dp * ep, "bytes": {k_: int(v) for k_, v in out.items()},
            "total_bytes": int(total), "bytes_per_token": total / (N * m * dp * ep),
            "params_per_rank": int(dense_local + expert_local)}
