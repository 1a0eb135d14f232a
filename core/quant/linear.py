"""Quantized drop-in replacements for ``nn.Linear`` (and optionally ``nn.Embedding``) in any module tree.

A :class:`QuantLinear` holds only the packed weight, its scales and (AWQ) an input-channel scale
vector; it never keeps the fp32 weight. Its buffers have fixed shapes given by (in, out, spec), so a
model skeleton can be rebuilt from a manifest and filled from a quantized checkpoint without ever
materialising fp32 weights (``core.quant.checkpoint``).

``weight`` is offered as a read-only dequantized view for code that reads ``linear.weight`` (device /
dtype probes, MLA's absorbed attention); the hot path never uses it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.quant.formats import (
    QuantSpec,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    stored_bytes,
)
from core.quant.kernels import bind_decode, int4_linear, int8_linear

# Linears left in floating point unless asked: MLA's kv_b_proj is read as a matrix (absorb mode)
# at every decode step, and it is small (kv_lora_rank x heads*(d_nope+d_v)).
DEFAULT_SKIP: tuple[str, ...] = ("*kv_b_proj",)


class QuantLinear(nn.Module):
    """y = (x / input_scale) @ dequant(W')^T + b, with W' = W * input_scale stored in int8 or packed int4.

    Buffers: int8 -> ``qweight`` int8 (N, K), ``scale`` fp32 (N,);
    int4 -> ``qweight`` uint8 (N, K/2), ``scale``/``minv`` fp16|fp32 (N, K/G);
    optional ``input_scale`` fp32 (K,) (activation-aware scaling), optional ``bias`` fp32 (N,).
    """

    # The core LM's ``linear`` may call ``forward`` directly (no ``Module.__call__``) when this module
    # has no hooks and autograd is off: forward touches nothing ``__call__`` would set up.
    decode_direct = True

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, *, bias: bool = False,
                 input_scale: bool = False) -> None:
        super().__init__()
        if spec.bits not in (4, 8):
            raise ConfigError(f"QuantLinear stores 4 or 8 bits, not {spec.bits}")
        if spec.bits == 4 and in_features % spec.group_size:
            raise ConfigError(f"in_features={in_features} is not a multiple of group size {spec.group_size}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        N, K = out_features, in_features
        if spec.bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(N, dtype=torch.float32))
            self.minv = None
        else:
            sd = spec.torch_scale_dtype
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(N, K // spec.group_size, dtype=sd))
            self.register_buffer("minv", torch.zeros(N, K // spec.group_size, dtype=sd))
        self.register_buffer("bias", torch.zeros(N) if bias else None)
        self.register_buffer("input_scale", torch.ones(K) if input_scale else None)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec, *, bias: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None,
                    codes_and_grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    clip_search: bool = True) -> QuantLinear:
        """Quantize a float weight (N, K). With ``input_scale`` s (K,), ``weight * s`` is stored and the
        input is divided by s at run time (exact in float; it moves salient channels away from the
        rounding grid's coarse steps). ``codes_and_grid`` = (codes uint8 (N, K), scale, minv) lets a
        calibrated quantizer (GPTQ) hand over its own int4 rounding."""
        N, K = weight.shape
        m = cls(K, N, spec, bias=bias is not None, input_scale=input_scale is not None)
        w = weight.detach().float()
        if input_scale is not None:
            m.input_scale.copy_(input_scale.float())
            w = w * input_scale.float()[None, :]
        if spec.bits == 8:
            q, s = quantize_int8(w)
            m.qweight.copy_(q)
            m.scale.copy_(s)
        elif codes_and_grid is not None:
            codes, s, mn = codes_and_grid
            m.qweight.copy_(pack_int4(codes, spec.group_size))
            m.scale.copy_(s.to(m.scale.dtype))
            m.minv.copy_(mn.to(m.minv.dtype))
        else:
            p, s, mn = quantize_int4(w, spec.group_size, clip_search=clip_search, scale_dtype=spec.torch_scale_dtype)
            m.qweight.copy_(p)
            m.scale.copy_(s)
            m.minv.copy_(mn)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, **kw: object) -> QuantLinear:
        return cls.from_weight(linear.weight, spec, bias=linear.bias, **kw)  # type: ignore[arg-type]

    # -- compute -------------------------------------------------------------------------------------
    def dequantized(self) -> torch.Tensor:
        """The effective float weight (N, K) this module multiplies by (AWQ scale divided back out)."""
        if self.spec.bits == 8:
            w = dequantize_int8(self.qweight, self.scale)
        else:
            w = dequantize_int4(self.qweight, self.scale, self.minv, self.spec.group_size)
        if self.input_scale is not None:
            w = w / self.input_scale[None, :]
        return w

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # direct dict reads: nn.Module.__getattr__ costs ~1 us each, ~80 calls per token
        if x.dtype == torch.float32 and b["input_scale"] is None:  # the common case, kept short (decode)
            qw = b["qweight"]
            fast = self.__dict__.get("_decode")
            if fast is None or fast[0] is not qw or fast[1] != qw.data_ptr() or fast[2] is not b["scale"] \
                    or fast[3] is not b.get("minv") or fast[4] is not b["bias"]:
                fast = self._bind_decode()
            if fast[5] is not None:
                y = fast[5](x)
                if y is not None:
                    return y
            if self.spec.bits == 8:
                return int8_linear(x, b["qweight"], b["scale"], b["bias"])
            return int4_linear(x, b["qweight"], b["scale"], b["minv"], self.spec.group_size, b["bias"])
        dt = x.dtype
        x = x.float()
        if self.input_scale is not None:
            x = x / self.input_scale
        if self.spec.bits == 8:
            y = int8_linear(x, self.qweight, self.scale, self.bias)
        else:
            y = int4_linear(x, self.qweight, self.scale, self.minv, self.spec.group_size, self.bias)
        return y.to(dt)

    def _bind_decode(self) -> tuple:
        """(the buffers it was bound to, qweight's address, the bound kernel call or None): the decode
        call's weight-side work done once, redone when a buffer is replaced or moved (``.to()``, loading)."""
        b = self._buffers
        qw, sc, mn, bias = b["qweight"], b["scale"], b.get("minv"), b["bias"]
        run = bind_decode(self.spec.bits, qw, sc, mn, self.spec.group_size, bias) if qw is not None else None
        fast = (qw, qw.data_ptr() if qw is not None else 0, sc, mn, bias, run)
        self.__dict__["_decode"] = fast
        return fast

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_decode", None)  # holds raw pointers and a ctypes function: never pickled or copied
        return state

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        g = f", group={self.spec.group_size}" if self.spec.bits == 4 else ""
        return (f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}{g}, "
                f"awq={self.input_scale is not None}")


class QuantEmbedding(nn.Module):
    """int8 per-row embedding table: a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding) -> QuantEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim)
        q, s = quantize_int8(emb.weight)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        return m

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * self.scale[ids][..., None]


# ---------------------------------------------------------------------------------------------------
# Walking a module tree
# ---------------------------------------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` by qualified name, minus names matching a ``skip`` glob."""
    skip = tuple(skip)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _matches(n, skip)}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fp32_bytes(model: nn.Module, names: Iterable[str]) -> int:
    """fp32 bytes of the named Linears (weights + biases) in their original form."""
    total = 0
    for n in names:
        m = model.get_submodule(n)
        total += stored_bytes(m.out_features, m.in_features, QuantSpec(bits=16), m.bias is not None)
    return total


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of all Linear-like weights (+scales, biases) as held now: what a decode step streams."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.stored_bytes()
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (the checkpoint's tensor payload)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def quantize_rtn(model: nn.Module, plan: dict[str, QuantSpec],
                 input_scales: dict[str, torch.Tensor] | None = None,
                 int4_grids: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
                 weights: dict[str, torch.Tensor] | None = None, clip_search: bool = True) -> nn.Module:
    """Replace each Linear named in ``plan`` (in place) by a QuantLinear with its spec; bits=16 entries
    stay float. ``input_scales`` (AWQ), ``int4_grids`` and ``weights`` (GPTQ) come from calibration."""
    input_scales, int4_grids, weights = input_scales or {}, int4_grids or {}, weights or {}
    for name, spec in plan.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"{name} is not an nn.Linear (got {type(lin).__name__})")
        if spec.bits == 16:
            continue
        q = QuantLinear.from_weight(weights.get(name, lin.weight), spec, bias=lin.bias,
                                    input_scale=input_scales.get(name),
                                    codes_and_grid=int4_grids.get(name) if spec.bits == 4 else None,
                                    clip_search=clip_search)
        set_submodule(model, name, q)
    return model


def quantize_embeddings(model: nn.Module) -> list[str]:
    """Swap every nn.Embedding for an int8 QuantEmbedding (skipped when its weight is tied)."""
    head_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)}
    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Embedding) and m.weight.data_ptr() not in head_ptrs:
            set_submodule(model, name, QuantEmbedding.from_embedding(m))
            done.append(name)
    return done
