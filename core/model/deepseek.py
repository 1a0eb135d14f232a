"""A DeepSeek-V3 language model in one file: config, RMSNorm, RoPE (+YaRN), MLA, DeepSeekMoE, MTP.

Reads top to bottom like DeepSeek's own ``inference/model.py``. Module and parameter names follow
transformers' ``DeepseekV3ForCausalLM`` (``model.layers.N.self_attn.kv_a_proj_with_mqa`` ...), so a
Hugging Face DeepSeek-V3 checkpoint loads with a plain name map (see ``core.model.hf``).

What the architecture does, and why:
- **MLA** compresses keys/values into one ``kv_lora_rank`` latent plus a single shared RoPE key per
  token; the decode cache holds only those (``kv_lora_rank + qk_rope_head_dim`` numbers per token per
  layer). At decode time attention runs in latent space ("absorb": ``W_UK`` is folded into the
  query and ``W_UV`` into the output) so the cache is never expanded to per-head keys/values.
- **DeepSeekMoE**: shared experts + fine-grained routed experts, sigmoid affinities, group-limited
  top-k; the chosen experts' weights are normalised and multiplied by ``routed_scaling_factor``.
- **Auxiliary-loss-free balancing**: a per-expert bias ``e_score_correction_bias`` is added to the
  scores *for choosing experts only*; after each optimizer step ``b_i += gamma * sign(mean_load -
  load_i)`` (``update_balance_bias``). An optional tiny sequence-wise balance loss is also available.
- **MTP**: ``num_nextn_predict_layers`` sequential modules predict tokens 2..D+1 ahead, sharing the
  embedding and output head; their loss is weighted by ``mtp_loss_weight`` (lambda). At inference the
  first module drafts tokens for self-speculative decoding (``core.model.generate``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.errors import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """Every key of a DeepSeek-V3 ``config.json`` is a field, so ``ModelArgs(**json.load(f))`` works.

    The first block is the architecture (Hugging Face names); the second block is training-only knobs
    of this implementation; the last block is Hugging Face bookkeeping kept for round trips.
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    kv_lora_rank: int = 64
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None

    # Training knobs (ours; ignored by other runtimes).
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free bias update
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (0 = off)
    seq_aux: bool = True
    mtp_loss_weight: float = 0.3  # lambda

    # Hugging Face bookkeeping (kept so configs round-trip; no effect here).
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    model_type: str = "deepseek_v3"
    transformers_version: str | None = None
    dtype: str | None = "float32"
    torch_dtype: str | None = None
    use_cache: bool = True
    pretraining_tp: int = 1
    ep_size: int = 1
    head_dim: int | None = None
    qk_head_dim: int | None = None
    output_router_logits: bool = False
    auto_map: dict[str, str] | None = None
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.head_dim = self.qk_rope_head_dim
        if self.n_routed_experts % max(self.n_group, 1):
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} > n_group={self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok exceeds n_routed_experts")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim must be even")
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"scoring_func={self.scoring_func!r} not supported (DeepSeek-V3 uses 'sigmoid')")

    @property
    def rope(self) -> dict[str, Any]:
        """RoPE parameters in one dict, from ``rope_parameters`` (transformers>=5) or ``rope_scaling``."""
        p = dict(self.rope_parameters or {})
        if not p:
            p = dict(self.rope_scaling or {})
            if "type" in p and "rope_type" not in p:
                p["rope_type"] = p.pop("type")
        p.setdefault("rope_type", "default")
        p.setdefault("rope_theta", self.rope_theta)
        return p

    def is_moe_layer(self, layer_id: int) -> bool:
        return (self.n_routed_experts > 0 and layer_id >= self.first_k_dense_replace
                and layer_id % max(self.moe_layer_freq, 1) == 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """Like ``ModelArgs(**d)`` but drops (and logs) keys this runtime does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            log.info("ignoring config keys %s", unknown)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> ModelArgs:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------
# Batch-1 fp32 inference (up to F32_MAX_ROWS rows: decode, speculative verify) routes plain nn.Linear
# layers through a C matrix-vector kernel (the quant runtime's kernel library,
# ``core.quant.kernels.f32_matvec``): decode is memory-bound and MKL's sgemm at M=1 streams weights at
# about half the speed. Weights under ``MATVEC_MIN_NUMEL`` elements (cache-resident; the kernel's
# Python-side checks cost more than MKL's call) go straight to ``F.linear``. Anything else (training,
# batches, quantized or hooked modules, no C compiler) takes the module's own forward.
# ``FAST_MATVEC = False`` turns it off.
FAST_MATVEC = True
MATVEC_MIN_NUMEL = 1 << 17  # 512 KiB of fp32 weight
# A hook-free module whose class sets ``decode_direct = True`` (core.quant's QuantLinear) is called
# through its ``forward`` directly, without ``nn.Module.__call__``, at inference (no autograd, no
# hooks, not tracing): the same result, 0.6-0.9 us less per call measured on ~70 calls per decoded token
# (~1% of int4 decode; docs/BENCHMARKS.md).
# ``DIRECT_FORWARD = False`` turns it off.
DIRECT_FORWARD = True
_matvec: Any = None
_matvec_rows = 0  # the kernel's row limit (core.quant.kernels.F32_MAX_ROWS), read on first use


def _fast_matvec() -> Any:
    global _matvec, _matvec_rows
    if _matvec is None:
        from core.quant.kernels import F32_MAX_ROWS, f32_matvec

        _matvec, _matvec_rows = f32_matvec, F32_MAX_ROWS
    return _matvec


def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``; for a few fp32 rows at inference with a plain, hook-free ``nn.Linear``, the C kernel
    (or ``F.linear`` without the module call, for small weights)."""
    mv = _matvec or (_fast_matvec() if FAST_MATVEC else None)
    if (FAST_MATVEC and type(m) is nn.Linear and x.numel() <= _matvec_rows * m.in_features
            and not torch.is_grad_enabled()
            and not m._forward_hooks and not m._forward_pre_hooks and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks):
        w = m.weight
        if w.numel() < MATVEC_MIN_NUMEL:
            return F.linear(x, w, m.bias)
        y = mv(x, w, m.bias)
        if y is not None:
            return y
    elif (DIRECT_FORWARD and getattr(type(m), "decode_direct", False) and not torch.is_grad_enabled()
          and not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
          and not m._backward_pre_hooks and not nn.modules.module._global_forward_hooks
          and not nn.modules.module._global_forward_pre_hooks and not torch.jit.is_tracing()):
        return type(m).forward(m, x)  # what m(x) runs, without Module.__call__
    return m(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op (decode: ~25 per token)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d_rope/2,) and the cos/sin scale; YaRN blends interpolated and original
    frequencies with a linear ramp between the beta_fast/beta_slow correction dims."""
    p, dim = args.rope, args.qk_rope_head_dim
    base = float(p["rope_theta"])
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if p["rope_type"] in ("default", None):
        return 1.0 / pos_freqs, 1.0
    if p["rope_type"] != "yarn":
        raise ConfigError(f"rope type {p['rope_type']!r} not supported (use 'default' or 'yarn')")
    factor = float(p.get("factor") or 1.0)
    orig = int(p.get("original_max_position_embeddings") or args.max_position_embeddings)
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        attn_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                       if mscale and mscale_all else _yarn_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra = 1 - ramp  # 1 -> keep original frequency (high-frequency dims), 0 -> interpolate
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, float(attn_factor)


def softmax_scale(args: ModelArgs) -> float:
    scale = args.qk_head_dim ** -0.5
    p = args.rope
    if p["rope_type"] not in ("default", None) and p.get("mscale_all_dim"):
        m = _yarn_mscale(float(p["factor"]), float(p["mscale_all_dim"]))
        scale *= m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x: (B, h, T, d_rope); cos/sin: (B, 1, T, d_rope/2). Interleaved pairs (x0,x1),(x2,x3).. as in
    DeepSeek's weights; the output is laid out [rotated evens | rotated odds] like transformers (q and k
    get the same permutation, so q.k is unchanged)."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------------
# Latent KV cache
# ---------------------------------------------------------------------------------------------------
class LatentCache:
    """Decode cache holding, per layer, only ``[kv latent | rope key]``: (B, S_max, r + d_rope).

    All rows share one write position (prompts are left-padded); ``key_mask`` (B, S_max) marks real
    tokens. ``truncate`` rolls back rejected speculative tokens without copying.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, width: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.kv = [torch.zeros(batch, max_len, width, dtype=dtype, device=device) for _ in range(n_layers)]
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # next RoPE position per row
        self.length = 0
        self.max_len = max_len
        self.padded = False  # some row has a masked slot in [0, length): decode steps need the full mask

    def bytes_per_token_per_layer(self) -> int:
        t = self.kv[0]
        return t.shape[-1] * t.element_size()

    def truncate(self, length: int) -> None:
        drop = self.length - length
        if drop > 0:
            self.pos -= self.key_mask[:, length:self.length].sum(1)
            self.key_mask[:, length:self.length] = False
            self.length = length


# ---------------------------------------------------------------------------------------------------
# Attention (MLA)
# ---------------------------------------------------------------------------------------------------
class MLA(nn.Module):
    """Multi-head Latent Attention. Naive mode (training / long prefill) expands the latent through
    ``kv_b_proj``; absorb mode (cached decode) attends in the latent space directly."""

    absorb_max_query: int = 16  # queries per step up to which cached attention uses absorb mode

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = args.qk_head_dim, args.v_head_dim
        self.rope_interleave = args.rope_interleave
        self.attention_dropout = args.attention_dropout
        H, D = self.n_heads, args.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.qk_rope_head_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=args.attention_bias)
        self.softmax_scale = softmax_scale(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """x: (B, T, D); mask: bool (B, 1, T, S) True = may attend, or None for plain causal;
        cache: this layer's (B, S_max, r + d_rope) buffer, filled at [start, start + T)."""
        B, T, _ = x.shape
        H, dn, dr, r = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        q = (linear(self.q_proj, x) if self.q_lora_rank is None
             else linear(self.q_b_proj, self.q_a_layernorm(linear(self.q_a_proj, x))))
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)  # (B, H, T, dn + dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        kv = linear(self.kv_a_proj_with_mqa, x)  # (B, T, r + dr)
        c_kv, k_pe = kv.split([r, dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin, self.rope_interleave).squeeze(1)  # (B, T, dr)
        dropout = self.attention_dropout if self.training else 0.0

        if cache is not None:
            cache[:, start:start + T, :r] = c_kv
            cache[:, start:start + T, r:] = k_pe
            if T <= self.absorb_max_query:
                return self._absorb(q_nope, q_pe, cache[:, :start + T], mask)
            c_kv, k_pe = cache[:, :start + T, :r], cache[:, :start + T, r:]

        # Naive: expand latent to per-head keys and values.
        S = c_kv.shape[1]
        kvb = self.kv_b_proj(c_kv).view(B, S, H, dn + self.v_head_dim).transpose(1, 2)  # (B, H, S, dn + dv)
        k_nope, v = kvb.split([dn, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, H, S, dr)], dim=-1)
        qf = torch.cat([q_nope, q_pe], dim=-1)
        if mask is None and T > 1 and S != T:  # chunk after a cached prefix: bottom-right causal
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        dv = self.v_head_dim
        if dv < self.qk_head_dim and x.device.type == "cpu" and T > 1:
            # torch's fused (flash) CPU kernel needs one head dim for q, k and v; with d_v < d_qk SDPA
            # falls back to the unfused math path (materialised scores, ~4x slower at T=512). Zero-pad
            # v and drop the padded output columns: same result, fused kernel.
            v = F.pad(v, (0, self.qk_head_dim - dv))
        o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=mask is None and T > 1, scale=self.softmax_scale)
        if o.shape[-1] != dv:
            o = o[..., :dv]
        return linear(self.o_proj, o.transpose(1, 2).reshape(B, T, H * dv))

    def _absorbed_weights(self, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, dn, r) and W_UV^T (H, r, dv) from ``kv_b_proj`` (``scaled``: W_UK times the softmax
        scale, for the decode fast path). At inference they are kept as contiguous copies (1x kv_b_proj's
        size), rebuilt whenever the weight changes (data pointer or version counter): bmm on the strided
        views ran at ~4 GB/s, about 1.6 ms per 8-layer token."""
        H, dn, dv, r = self.n_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        w = self.kv_b_proj.weight
        if (type(self.kv_b_proj) is not nn.Linear or (torch.is_grad_enabled() and w.requires_grad)
                or w.is_inference()):  # inference tensors have no version counter: cannot tell if stale
            wv = w.view(H, dn + dv, r)
            return wv[:, :dn] * self.softmax_scale if scaled else wv[:, :dn], wv[:, dn:].transpose(1, 2)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = self.__dict__.get("_absorbed")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                wv = w.detach().view(H, dn + dv, r)
                w_uk = wv[:, :dn].contiguous()
                cached = (key, w_uk, wv[:, dn:].transpose(1, 2).contiguous(), w_uk * self.softmax_scale)
            self.__dict__["_absorbed"] = cached
        return (cached[3] if scaled else cached[1]), cached[2]

    def _absorb(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Latent-space attention: scores = (q_nope W_UK) c^T + q_pe k_pe^T; out = (p c) W_UV."""
        B, H, T, dn = q_nope.shape
        r, dv = self.kv_lora_rank, self.v_head_dim
        w_uk, w_uv_t = self._absorbed_weights()  # (H, dn, r), (H, r, dv)
        S = kv.shape[1]
        # All heads share one latent "key/value" per token, so fold heads into the query rows:
        # one (H*T, r+dr) x (r+dr, S) matmul per sequence, no per-head copies of the cache.
        # Plain matmul/bmm on views instead of einsum: fewer dispatched ops per decode step.
        q = torch.cat([torch.matmul(q_nope, w_uk), q_pe], dim=-1)  # (B, H, T, r + dr): [q_nope W_UK | q_pe]
        scores = torch.bmm(q.view(B, H * T, -1), kv.transpose(1, 2)).view(B, H, T, S)  # (B, H, T, S)
        scores.mul_(self.softmax_scale)
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=kv.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).type_as(q).view(B, H * T, S)
        o = torch.bmm(p, kv[..., :r]).view(B, H, T, r)  # (B, H, T, r) in latent space
        o = torch.matmul(o, w_uv_t)  # (B, H, T, dv)
        return linear(self.o_proj, o.transpose(1, 2).reshape(B, T, H * dv))


# ---------------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, gate, MoE
# ---------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class Gate(nn.Module):
    """Sigmoid router with group-limited top-k. ``e_score_correction_bias`` steers which experts are
    chosen but never the weights they get; it is a buffer, moved by ``update_bias`` (no gradient)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.n_experts = args.num_experts_per_tok, args.n_routed_experts
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = args.norm_topk_prob, args.routed_scaling_factor
        self.aux_loss_alpha, self.seq_aux = args.aux_loss_alpha, args.seq_aux
        self.weight = nn.Parameter(torch.empty(self.n_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        self.register_buffer("load", torch.zeros(self.n_experts), persistent=False)  # tokens/expert since update
        self.track_load = False
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch_shape: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, D) -> (weights (N, k), expert indices (N, k))."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            g = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
            gs = g.topk(2, dim=-1)[0].sum(-1) if g.shape[-1] > 1 else g.amax(-1)  # (N, G)
            keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(self.topk_group, dim=-1)[1], True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.n_experts // self.n_group, 1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # (N, k)
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * self.routed_scaling_factor
        if self.training or self.track_load:
            with torch.no_grad():
                self.load += torch.bincount(idx.flatten(), minlength=self.n_experts).to(self.load)
        self.aux_loss = None
        if self.training and self.aux_loss_alpha > 0 and batch_shape is not None:
            self.aux_loss = self._seq_balance_loss(scores, idx, batch_shape)
        return w.type_as(x), idx

    def _seq_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor, bt: tuple[int, int]) -> torch.Tensor:
        """Sequence-wise balance loss alpha * sum_i f_i P_i (DeepSeek-V3 eq. 17-20), averaged over sequences."""
        B, T = bt
        E, k = self.n_experts, self.top_k
        s = scores / scores.sum(-1, keepdim=True)  # normalised affinities
        p = s.view(B, T, E).mean(1)  # (B, E)
        counts = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, idx.view(B, T * k), torch.ones(B, T * k, device=scores.device))
        f = counts * E / (k * T)
        return self.aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """b_i += gamma * sign(mean_load - load_i); then reset the load counter."""
        if self.load.sum() > 0:
            self.e_score_correction_bias += gamma * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


class MoE(nn.Module):
    # Decode fast path: expert weights (all routed + shared, fp32 bytes) up to which a few-token step
    # runs every expert from stacked copies instead of the chosen ones one by one (see ``_moe_step``).
    dense_decode_bytes: int = 4 << 20

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.hidden_size, args.moe_intermediate_size)
                                     for _ in range(args.n_routed_experts))
        self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, D)
        w, idx = self.gate(xf, (shape[0], shape[1]) if x.dim() == 3 else None)
        y = torch.zeros_like(xf)
        if xf.shape[0] == 1:  # batch-1 decode: run the token's k experts, accumulate in place
            es = idx[0].tolist()
            y = self.experts[es[0]](xf) * w[0, 0]
            for j in range(1, len(es)):
                y.add_(self.experts[es[j]](xf) * w[0, j])
        elif xf.shape[0] <= 4:  # speculative verify / tiny batches: visit each token's k experts
            rows = []
            for t, (es, ws) in enumerate(zip(idx.tolist(), w, strict=True)):
                xt = xf[t:t + 1]
                rows.append(sum(self.experts[e](xt) * we for e, we in zip(es, ws, strict=True)))
            y = torch.cat(rows, 0)
        else:
            counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
            for e, c in enumerate(counts):
                if c == 0:
                    continue
                tok, slot = torch.where(idx == e)
                y.index_add_(0, tok, self.experts[e](xf[tok]) * w[tok, slot, None])
        return (y + self.shared_experts(xf)).view(shape)


# ---------------------------------------------------------------------------------------------------
# Blocks, the model, MTP
# ---------------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.self_attn = MLA(args)
        self.mlp: nn.Module = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size,
                                                                                args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's own final norm; the projection is the main model's ``lm_head`` (shared)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MTPModule(nn.Module):
    """Depth-k MTP: h'_i = Block(eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)])), logits = head(norm(h'_i))."""

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.block = DecoderLayer(args, layer_id)
        self.shared_head = SharedHead(args)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """h, emb: (B, T, D) -> new hidden (B, T, D) (pre-norm; feed ``shared_head.norm`` then lm_head)."""
        x = linear(self.eh_proj, torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, mask, cache, start)


# ---------------------------------------------------------------------------------------------------
# Decode fast path (batch-1-ish cached steps: decode, speculative verify, MTP drafts)
# ---------------------------------------------------------------------------------------------------
# A decode step of a small model is dominated by per-op dispatch, not arithmetic: the module path runs
# ~70 tensor ops and ~10 module calls per layer. For cached steps of at most F32_MAX_ROWS tokens with
# no padding, no autograd and no hooks, ``DeepseekV3.forward`` / ``mtp_forward`` take the functions
# below instead: the same weights and maths with fewer ops: RoPE as one matmul by a per-step rotation
# matrix (built once per step, shared by every layer; the softmax scale is folded into the query's
# copy and into the cached W_UK), one additive mask per step, routing decided in Python on the k
# scores of the token, expert outputs accumulated with ``add_(alpha=w)``, and no module ``__call__``
# for norms, attention, MLPs or layers. Anything unusual (a swapped-in module type, hooks, quantized
# linears: see ``linear``) takes the module's own forward. Tests compare both paths.
def _rms(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _mla_step(a: MLA, x: torch.Tensor, rot: torch.Tensor, rot_q: torch.Tensor, mask: torch.Tensor | None,
              kvc: torch.Tensor, start: int) -> torch.Tensor:
    """Absorbed latent attention for T new tokens at [start, start + T) of this layer's cache ``kvc``;
    ``rot`` / ``rot_q`` (T, d_rope, d_rope) rotate keys / queries (``rot_q`` carries the softmax scale)."""
    B, T, _ = x.shape
    H, dn, dr, r, dv = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank, a.v_head_dim
    q = (linear(a.q_proj, x) if a.q_lora_rank is None
         else linear(a.q_b_proj, _rms(a.q_a_layernorm, linear(a.q_a_proj, x))))
    q_nope, q_pe = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
    c, k_pe = linear(a.kv_a_proj_with_mqa, x).split([r, dr], dim=-1)
    S = start + T
    kvc[:, start:S, :r] = _rms(a.kv_a_layernorm, c)
    kvc[:, start:S, r:] = torch.matmul(k_pe.unsqueeze(-2), rot).squeeze(-2)
    w_uk, w_uv_t = a._absorbed_weights(scaled=True)
    qc = torch.cat([torch.matmul(q_nope, w_uk), torch.matmul(q_pe.unsqueeze(-2), rot_q).squeeze(-2)], dim=-1)
    kv = kvc[:, :S]
    lib = (_scores_lib() if B == 1 and H * T <= SCORES_C_MAX_ROWS and kv.dtype == torch.float32
           and kv.is_contiguous() else None)
    if lib is not None:  # the cache rows are the weight rows of a (H*T)-row fp32 matmul (see _scores_lib)
        scores = torch.empty(B, H * T, S, dtype=torch.float32)
        qc = qc.contiguous()  # (cat's output already is); kept alive across the call
        lib.f32_mm(qc.data_ptr(), kv.data_ptr(), None, scores.data_ptr(), H * T, S, r + dr,
                   _kernels.kernel_threads())
    else:
        scores = torch.bmm(qc.view(B, H * T, r + dr), kv.transpose(1, 2))  # (B, H*T, S), already scaled
    if mask is not None:
        scores = scores.view(B, H, T, S).add_(mask).view(B, H * T, S)
    o = torch.bmm(torch.softmax(scores, dim=-1), kv[..., :r]).view(B, H, T, r)
    o = torch.matmul(o, w_uv_t)  # (B, H, T, dv)
    return linear(a.o_proj, o.transpose(1, 2).reshape(B, T, H * dv))


# Decode attention scores (``_mla_step``, batch 1): q (H*T rows) times the latent cache (S rows of
# r + d_rope), read cold once per layer per token (663 KB at a 576-token context in the bench config).
# torch's bmm at 8 query rows ran at ~185 us/MB here; the kernel library's fp32 ``f32_mm`` (cache rows
# as weight rows, 4 query rows per pass over a row held in L1) ~115 us/MB: -0.4 ms per decoded token
# (11.6 -> 11.2, docs/BENCHMARKS.md). Above ``SCORES_C_MAX_ROWS`` query rows it was slower than bmm.
# Per-head C matvecs for q_nope W_UK and o W_UV were tried too: no gain in a full decode step (16 more
# ctypes calls per layer ate it). Off with ``FAST_MATVEC = False``, without the library, or when the
# quant backend is forced to "dequant".
SCORES_C_MAX_ROWS = 16
_kernels: Any = None


def _scores_lib() -> Any:
    global _kernels
    if _kernels is None:
        from core.quant import kernels

        _kernels = kernels
    if not FAST_MATVEC or _kernels.active_backend() != "c":
        return None
    return _kernels.c_library()


def _mlp_step(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is not MLP:
        return m(x)
    return linear(m.down_proj, F.silu(linear(m.gate_proj, x)).mul_(linear(m.up_proj, x)))


def _route(g: Gate, s: list[float], c: list[float]) -> tuple[list[int], list[float]]:
    """One token's experts and weights from its sigmoid scores ``s`` and biased choice scores ``c``
    (the same rule as ``Gate.forward``: group-limited top-k on ``c``, weights from ``s``)."""
    E = g.n_experts
    allowed: Any = range(E)
    if g.n_group > 1 and g.topk_group < g.n_group:
        n = E // g.n_group
        gs = [sum(sorted(c[i * n:(i + 1) * n], reverse=True)[:2]) for i in range(g.n_group)]
        keep = sorted(range(g.n_group), key=lambda i: -gs[i])[:g.topk_group]
        allowed = [e for e in range(E) if e // n in keep]
    idx = sorted(allowed, key=lambda e: -c[e])[:g.top_k]
    w = [s[e] for e in idx]
    if g.norm_topk_prob:
        tot = sum(w) + 1e-20
        w = [v / tot for v in w]
    return idx, [v * g.routed_scaling_factor for v in w]


def _moe_dense_weights(m: MoE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every expert of ``m`` (routed, then shared) stacked into two matrices, or None when they are
    too big (``MoE.dense_decode_bytes``), not plain linears, or cannot be version-checked:
    W_in (2 (E I + I_s), D) = [gate_1..gate_E, gate_s, up_1..up_E, up_s], W_out (D, E I + I_s). Kept
    as copies, rebuilt when a module or parameter was swapped or a weight changed in place (version
    counter); the check reads ``_modules`` / ``_parameters`` directly (``Module.__getattr__`` is slow)."""
    cached = m.__dict__.get("_dense")
    if cached is not None:
        refs, ws, vers, limit, dense = cached
        if (limit == MoE.dense_decode_bytes and all(d[k] is o for d, k, o in refs)
                and [w._version for w in ws] == vers):
            return dense
    mlps = [*m.experts, m.shared_experts]
    refs, lins = [], []
    for i, e in enumerate(m.experts):
        refs.append((m.experts._modules, str(i), e))
    refs.append((m._modules, "shared_experts", m.shared_experts))
    for e in mlps:
        if type(e) is not MLP:
            return None
        for n in ("gate_proj", "up_proj", "down_proj"):
            lin = e._modules[n]
            refs.append((e._modules, n, lin))
            lins.append(lin)
    if any(type(x) is not nn.Linear or x.bias is not None or x.weight.is_inference() for x in lins):
        return None
    ws = [x.weight for x in lins]
    refs += [(x._parameters, "weight", w) for x, w in zip(lins, ws, strict=True)]
    dense = None
    if sum(w.numel() for w in ws) * ws[0].element_size() <= MoE.dense_decode_bytes:
        with torch.no_grad():
            dense = (torch.cat(ws[0::3] + ws[1::3]).contiguous(), torch.cat(ws[2::3], dim=1).contiguous())
    m.__dict__["_dense"] = (refs, ws, [w._version for w in ws], MoE.dense_decode_bytes, dense)
    return dense


def _moe_step(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MoE for a few tokens, routed in Python. Small experts (``MoE.dense_decode_bytes``): all experts
    in two matvecs over stacked weights, unchosen ones weighted 0 (a handful of ops instead of ~6 per
    expert, and 2 tokens cost what 1 does). Bigger ones: each chosen expert once on all rows (weight
    0 for rows that did not choose it; the matvec costs the same for 1-4 rows), accumulated in place."""
    g = m.gate if type(m) is MoE else None
    if g is None or type(g) is not Gate or g.training or g.track_load:
        return m(x)
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    s = F.linear(xf, g.weight).sigmoid_()
    routes = [_route(g, si, ci) for si, ci in zip(s.tolist(), (s + g.e_score_correction_bias).tolist(), strict=True)]
    dense = _moe_dense_weights(m)
    if dense is not None:
        E, N = g.n_experts, xf.shape[0]
        wd = [[0.0] * E for _ in range(N)]
        for t, (es, ws) in enumerate(routes):
            for e, w in zip(es, ws, strict=True):
                wd[t][e] = w
        gu = _mv(xf, dense[0])
        a = gu[:, :gu.shape[1] // 2]
        a = F.silu(a).mul_(gu[:, gu.shape[1] // 2:])  # (N, E I + I_s)
        ei = a.shape[1] - m.shared_experts.gate_proj.out_features
        a[:, :ei].view(N, E, ei // E).mul_(torch.tensor(wd, dtype=a.dtype)[:, :, None])
        return _mv(a, dense[1]).view(shape)
    y = _mlp_step(m.shared_experts, xf)
    if len(routes) == 1:
        for e, w in zip(*routes[0], strict=True):
            y.add_(_mlp_step(m.experts[e], xf), alpha=w)
    else:
        per: dict[int, list[float]] = {}
        for t, (es, ws) in enumerate(routes):
            for e, w in zip(es, ws, strict=True):
                per.setdefault(e, [0.0] * len(routes))[t] = w
        for e, ws in per.items():
            y.add_(_mlp_step(m.experts[e], xf) * torch.tensor(ws, dtype=y.dtype)[:, None])
    return y.view(shape)


def _mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a few fp32 rows: the C matvec for big weights when available, else F.linear."""
    if w.numel() >= MATVEC_MIN_NUMEL:
        y = (_matvec or _fast_matvec())(x, w, None)
        if y is not None:
            return y
    return F.linear(x, w)


def _layer_step(layer: DecoderLayer, x: torch.Tensor, rot: torch.Tensor, rot_q: torch.Tensor,
                mask: torch.Tensor | None, kvc: torch.Tensor, start: int) -> torch.Tensor:
    x = x + _mla_step(layer.self_attn, _rms(layer.input_layernorm, x), rot, rot_q, mask, kvc, start)
    h = _rms(layer.post_attention_layernorm, x)
    return x.add_(_moe_step(layer.mlp, h) if type(layer.mlp) is MoE else _mlp_step(layer.mlp, h))


def _fast_types_ok(layer: nn.Module) -> bool:
    return (type(layer) is DecoderLayer and type(layer.self_attn) is MLA and type(layer.input_layernorm) is RMSNorm
            and type(layer.post_attention_layernorm) is RMSNorm and type(layer.self_attn.kv_a_layernorm) is RMSNorm
            and (layer.self_attn.q_lora_rank is None or type(layer.self_attn.q_a_layernorm) is RMSNorm))


def _computes_fp32(m: nn.Module) -> bool:
    """Does ``m`` (a projection: plain, quantized or torch-dynamic Linear) compute in fp32? Reads the
    registered parameter only: a quantized module's ``weight`` is a dequantizing property (a full
    dequantization per call) or a method (torch's dynamic int8 Linear)."""
    w = m._parameters.get("weight")
    return w is None or w.dtype == torch.float32


def _hooks_free(model: nn.Module) -> bool:
    """No forward hooks on any module of ``model`` (nor global ones). A hook-free result is trusted
    until a hook is registered anywhere (torch's hook handle counter moves); a hooked one is rescanned
    (hooks may have been removed since)."""
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks:
        return False
    nid = getattr(torch.utils.hooks.RemovableHandle, "next_id", None)
    cached = model.__dict__.get("_hook_scan")
    if nid is not None and cached is not None and cached[0] == nid and cached[1]:
        return True
    free = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.__dict__["_hook_scan"] = (nid, free)
    return free


class Backbone(nn.Module):
    """``model.*`` of the HF layout: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V)
    hidden: torch.Tensor  # (B, T, D) final hidden before the last norm (feeds MTP)


class DeepseekV3(nn.Module):
    """The causal LM. ``forward`` -> logits; ``compute_loss`` adds MTP and balance terms for training."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(args, args.num_hidden_layers + k)
                                 for k in range(args.num_nextn_predict_layers))
        inv_freq, self.rope_scale = rope_inv_freq(args)
        self.softmax_scale = softmax_scale(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- setup ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.args.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, 0.0, std)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.inv_freq.copy_(rope_inv_freq(self.args)[0])
        self.__dict__.pop("_step_memo", None)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.gradient_checkpointing = enable

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or (``active``) those used per token: routed experts count only top-k."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for m in self.modules():
                if isinstance(m, MoE):
                    per = sum(p.numel() for p in m.experts[0].parameters())
                    n -= per * (len(m.experts) - m.gate.top_k)
        return n

    def gates(self) -> list[Gate]:
        return [m for m in self.modules() if isinstance(m, Gate)]

    @torch.no_grad()
    def update_balance_bias(self, gamma: float | None = None) -> None:
        """Aux-loss-free balancing step for every MoE layer (call after each optimizer step)."""
        for g in self.gates():
            g.update_bias(self.args.bias_update_speed if gamma is None else gamma)

    def new_cache(self, batch: int, max_len: int, *, mtp: bool = False) -> LatentCache:
        n = len(self.mtp) if mtp else self.args.num_hidden_layers
        p = self.model.norm.weight  # a plain parameter whatever the projections' format
        return LatentCache(n, batch, max_len, self.args.kv_lora_rank + self.args.qk_rope_head_dim,
                           dtype=p.dtype, device=p.device)

    # -- forward -------------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, d_rope/2)."""
        f = positions[..., None].float() * self.inv_freq  # (B, T, d/2)
        return ((f.cos() * self.rope_scale).to(dtype).unsqueeze(1),
                (f.sin() * self.rope_scale).to(dtype).unsqueeze(1))

    def _fast_ok(self, rows: int, cache: LatentCache | None, dtype: torch.dtype) -> bool:
        """Can this cached step take the decode fast path (see ``_layer_step``)?"""
        return (FAST_MATVEC and cache is not None and not cache.padded and rows <= (_matvec_rows or 4)
                and not self.training and not torch.is_grad_enabled() and dtype == torch.float32
                and _computes_fp32(self.lm_head) and _hooks_free(self))

    def _fast_begin(self, cache: LatentCache, T: int, device: torch.device, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Cache bookkeeping for T unpadded tokens, the step's RoPE rotation matrices (T, d, d) for keys
        and (scaled) queries, the additive causal mask (T, S) when T > 1, and the start position."""
        start = cache.length
        if start + T > cache.max_len:
            raise ConfigError(f"cache holds {cache.max_len} tokens; asked for {start + T}")
        cache.key_mask[:, start:start + T] = True
        cache.pos += T
        # Same cos/sin values as ``rope`` (positions = start.. since no row is padded).
        memo = self.__dict__.get("_step_memo")  # the MTP draft after a verify step reuses its matrices
        if memo is not None and memo[0] == (start, dtype, device) and memo[1] >= T:
            rot, rot_q, mask = memo[2]
            return rot[:T], rot_q[:T], (mask[:T, :start + T] if T > 1 else None), start
        f = torch.arange(start, start + T, device=device)[:, None].float() * self.inv_freq  # (T, d/2)
        cs = torch.cat([f.cos(), -f.sin(), f.cos(), f.sin()], dim=-1).mul_(self.rope_scale).to(dtype)
        d = self.args.qk_rope_head_dim
        idx = self.__dict__.get("_rope_rot_idx")
        if idx is None or idx[0].device != device:
            h = torch.arange(d // 2, device=device)
            i1, i2 = (2 * h, 2 * h + 1) if self.args.rope_interleave else (h, h + d // 2)
            # y = x @ R: y_j = x1_j cos_j - x2_j sin_j, y_{j+d/2} = x2_j cos_j + x1_j sin_j (``apply_rope``)
            idx = (torch.cat([i1, i2, i2, i1]), torch.cat([h, h, h + d // 2, h + d // 2]))
            self.__dict__["_rope_rot_idx"] = idx
        rot = torch.zeros(T, d, d, dtype=dtype, device=device)
        rot[:, idx[0], idx[1]] = cs
        rot_q = rot * self.softmax_scale
        mask = None
        if T > 1:
            mask = torch.full((T, start + T), float("-inf"), dtype=dtype, device=device).triu_(start + 1)
        self.__dict__["_step_memo"] = ((start, dtype, device), T, (rot, rot_q, mask))
        return rot, rot_q, mask, start

    def _prepare(self, B: int, T: int, device: torch.device, attention_mask: torch.Tensor | None,
                 cache: LatentCache | None, position_ids: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Positions (B, T), the bool attention mask (B, 1, T, S) or None (plain causal), and start."""
        start = cache.length if cache is not None else 0
        if cache is not None:
            if start + T > cache.max_len:
                raise ConfigError(f"cache holds {cache.max_len} tokens; asked for {start + T}")
            new = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                     device=device)
            cache.key_mask[:, start:start + T] = new
            if position_ids is None:
                position_ids = cache.pos[:, None] + new.long().cumsum(1) - 1
                position_ids = position_ids.clamp_min(0)
            cache.pos += new.sum(1)
            keys = cache.key_mask[:, :start + T]
            padded = not bool(keys.all())
            cache.padded = padded
        else:
            keys = attention_mask.bool() if attention_mask is not None else None
            padded = keys is not None and not bool(keys.all())
            if position_ids is None:
                if padded:
                    position_ids = (keys.long().cumsum(1) - 1).clamp_min(0)
                else:
                    position_ids = torch.arange(T, device=device).expand(B, T)
        mask = None
        if padded:
            S = start + T
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)
            self_pos = torch.zeros(T, S, dtype=torch.bool, device=device)
            self_pos[torch.arange(T), torch.arange(start, S)] = True  # padded rows still see themselves
            mask = ((causal & keys[:, None, :]) | self_pos)[:, None]  # (B, 1, T, S)
        return position_ids, mask, start

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: LatentCache | None = None, logits_to_keep: int = 0,
                return_hidden: bool = False) -> torch.Tensor | LMOutput:
        """input_ids (B, T) or inputs_embeds (B, T, D) -> logits (B, T, V) (last ``logits_to_keep`` only
        when > 0). ``attention_mask`` (B, T): 1 = real token, 0 = padding / skipped position."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if (attention_mask is None and position_ids is None and self._fast_ok(B * T, cache, x.dtype)
                and all(_fast_types_ok(layer) for layer in self.model.layers)):
            assert cache is not None
            rot, rot_q, fmask, start = self._fast_begin(cache, T, x.device, x.dtype)
            for layer, kvc in zip(self.model.layers, cache.kv, strict=False):
                x = _layer_step(layer, x, rot, rot_q, fmask, kvc, start)
            cache.length = start + T
            h = x
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            logits = linear(self.lm_head, _rms(self.model.norm, x))
            return LMOutput(logits, h) if return_hidden else logits
        pos, mask, start = self._prepare(B, T, x.device, attention_mask, cache, position_ids)
        cos, sin = self.rope(pos, x.dtype)
        for i, layer in enumerate(self.model.layers):
            kv = cache.kv[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv, start)
        if cache is not None:
            cache.length = start + T
        h = x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = linear(self.lm_head, self.model.norm(x))
        return LMOutput(logits, h) if return_hidden else logits

    def mtp_forward(self, k: int, h: torch.Tensor, next_ids: torch.Tensor, *,
                    attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    cache: LatentCache | None = None, logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module ``k`` on hidden h (B, T, D) at positions i and the ids of t_{i+k+1} (B, T).
        ``cache`` is an MTP cache (``new_cache(..., mtp=True)``). Returns (logits (B, T, V) (the last
        ``logits_to_keep`` positions only when > 0), hidden (B, T, D))."""
        B, T, _ = h.shape
        mod = self.mtp[k]
        emb = self.model.embed_tokens(next_ids)
        if (attention_mask is None and position_ids is None and self._fast_ok(B * T, cache, h.dtype)
                and type(mod) is MTPModule and _fast_types_ok(mod.block) and type(mod.enorm) is RMSNorm
                and type(mod.hnorm) is RMSNorm and type(mod.shared_head.norm) is RMSNorm):
            assert cache is not None
            rot, rot_q, fmask, start = self._fast_begin(cache, T, h.device, h.dtype)
            x = linear(mod.eh_proj, torch.cat([_rms(mod.enorm, emb), _rms(mod.hnorm, h)], dim=-1))
            hk = _layer_step(mod.block, x, rot, rot_q, fmask, cache.kv[k], start)
            cache.length = start + T
            out = hk[:, -logits_to_keep:] if logits_to_keep else hk
            return linear(self.lm_head, _rms(mod.shared_head.norm, out)), hk
        pos, mask, start = self._prepare(B, T, h.device, attention_mask, cache, position_ids)
        cos, sin = self.rope(pos, h.dtype)
        hk = mod(h, emb, cos, sin, mask, cache.kv[k] if cache is not None else None, start)
        if cache is not None:
            cache.length = start + T
        out = hk[:, -logits_to_keep:] if logits_to_keep else hk
        return linear(self.lm_head, mod.shared_head.norm(out)), hk

    def compute_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
        """Next-token loss + lambda/D * sum_k MTP_k loss + balance loss. input_ids (B, T); labels
        default to input_ids (-100 = ignore; padding is ignored via attention_mask)."""
        labels = input_ids.clone() if labels is None else labels.clone()
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        out = self(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_hidden=True)
        V = self.args.vocab_size
        lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
        total, parts = lm, {"lm_loss": lm.detach()}
        if len(self.mtp):
            T = input_ids.shape[1]
            h, mtp_losses = out.hidden, []
            for k in range(len(self.mtp)):
                n = T - k - 1  # positions whose token t_{i+k+1} exists
                if n < 2:
                    break
                am = attention_mask[:, :n] if attention_mask is not None else None
                logits, h = self.mtp_forward(k, h[:, :n], input_ids[:, k + 1:k + 1 + n], attention_mask=am)
                tgt = labels[:, k + 2:k + 2 + n - 1]  # module k at position i predicts t_{i+k+2}
                mtp_losses.append(F.cross_entropy(logits[:, :n - 1].reshape(-1, V).float(), tgt.reshape(-1),
                                                  ignore_index=-100))
            if mtp_losses:
                mtp = torch.stack(mtp_losses).mean()
                total = total + self.args.mtp_loss_weight * mtp
                parts["mtp_loss"] = mtp.detach()
        aux = [g.aux_loss for g in self.gates() if g.aux_loss is not None]
        if aux:
            a = torch.stack(aux).sum()
            total = total + a
            parts["balance_loss"] = a.detach()
        parts["loss"] = total
        return parts


def expert_load_imbalance(model: DeepseekV3) -> float:
    """max load / mean load over all MoE layers' counters (worst layer); 1.0 = perfectly balanced."""
    worst = 1.0
    for g in model.gates():
        if g.load.sum() > 0:
            worst = max(worst, float(g.load.max() / g.load.mean()))
    return worst
