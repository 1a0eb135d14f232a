"""One function that turns a float model into a quantized one: plan -> calibrate -> round -> swap.

Data contract:
    in:  a float ``nn.Module`` (any tree of nn.Linear; the core DeepSeek-V3 LM in practice), the bit
         mode (8, 4 or "mixed"), and calibration batches (LongTensor (B, T) of token ids) for 4/mixed
    out: the same module, Linears swapped in place for ``QuantLinear``, and a :class:`QuantReport`
         (per-layer spec, method, output error on calibration rows, bytes) that becomes the manifest
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from core.errors import ConfigError
from core.quant.calibrate import LayerStats, awq_scale, collect_stats, gptq_quantize, relative_output_error
from core.quant.formats import QuantSpec, check_bits
from core.quant.linear import (
    DEFAULT_SKIP,
    QuantLinear,
    fp32_bytes,
    quantizable_linears,
    quantize_embeddings,
    quantize_rtn,
)
from core.quant.mixed import assign_by_size, layer_shapes, plan_bytes, sensitivities

log = logging.getLogger(__name__)

Method = Literal["rtn", "awq", "gptq"]
BitsMode = Literal[8, 4, "mixed"]


@dataclass
class QuantReport:
    bits: str
    method: str
    group_size: int
    scale_dtype: str
    plan: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {bits, group_size, error, awq}
    linear_bytes: int = 0
    linear_fp32_bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    embeddings_int8: list[str] = field(default_factory=list)
    size_budget: float | None = None

    @property
    def linear_bytes_ratio(self) -> float:
        return self.linear_bytes / max(self.linear_fp32_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "method": self.method, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype, "plan": self.plan, "linear_bytes": self.linear_bytes,
                "linear_fp32_bytes": self.linear_fp32_bytes, "linear_bytes_ratio": self.linear_bytes_ratio,
                "skipped": self.skipped, "embeddings_int8": self.embeddings_int8,
                "size_budget": self.size_budget}


def parse_bits(bits: str | int) -> BitsMode:
    """'8' | '4' | 'mixed' from the command line; anything else -> ConfigError."""
    if str(bits).strip().lower() == "mixed":
        return "mixed"
    return check_bits(bits)  # type: ignore[return-value]


@torch.no_grad()
def quantize_model(model: nn.Module, bits: BitsMode, *, group_size: int = 64, method: Method = "gptq",
                   calib_batches: Sequence[torch.Tensor] | None = None, size_budget: float = 0.18,
                   scale_dtype: Literal["fp16", "fp32"] = "fp16", skip: Sequence[str] = DEFAULT_SKIP,
                   embeddings_int8: bool = False,
                   forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
                   max_rows: int = 512, clip_search: bool = True, progress: bool = True) -> QuantReport:
    """Quantize ``model`` in place. int8 is per-channel rounding (no calibration needed); int4 layers use
    ``method`` (AWQ scaling or GPTQ) on calibration activations; "mixed" keeps the most sensitive
    layers at int8 within ``size_budget`` (weights+scales as a fraction of fp32)."""
    if bits not in (8, 4, "mixed"):
        raise ConfigError(f"bits={bits!r} is not supported; choose 8, 4 or mixed")
    if method not in ("rtn", "awq", "gptq"):
        raise ConfigError(f"method {method!r} is not supported; choose rtn, awq or gptq")
    spec4 = QuantSpec(bits=4, group_size=group_size, scale_dtype=scale_dtype)
    spec8 = QuantSpec(bits=8)
    linears = quantizable_linears(model, skip)
    if not linears:
        raise ConfigError("the model has no nn.Linear layers to quantize")
    names = list(linears)
    bad = [n for n in names if linears[n].in_features % group_size] if bits != 8 else []
    report = QuantReport(bits=str(bits), method="rtn" if bits == 8 else method, group_size=group_size,
                         scale_dtype=scale_dtype, linear_fp32_bytes=fp32_bytes(model, names),
                         skipped=[n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears],
                         size_budget=size_budget if bits == "mixed" else None)
    needs_calib = bits == "mixed" or (bits == 4 and method != "rtn")
    if needs_calib and not calib_batches:
        raise ConfigError("int4 / mixed quantization with awq or gptq needs calibration data")
    stats: dict[str, LayerStats] = {}
    if needs_calib:
        stats = collect_stats(model, calib_batches or [], names, want_hessian=method == "gptq",
                              max_rows=max_rows, forward=forward, progress=progress)

    shapes = layer_shapes(model, names)
    if bits == 8:
        plan = {n: spec8 for n in names}
    elif bits == 4:
        plan = {n: spec4 for n in names}
    else:
        sens = sensitivities(model, stats, spec4, clip_search)
        plan = assign_by_size(shapes, sens, size_budget, group_size, scale_dtype)
    for n in bad:  # widths the int4 groups do not divide stay at int8
        if plan[n].bits == 4:
            log.warning("%s: in_features %d not divisible by %d, kept at int8", n, linears[n].in_features, group_size)
            plan[n] = spec8

    input_scales: dict[str, torch.Tensor] = {}
    grids: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    int4_names = [n for n in names if plan[n].bits == 4]
    from tqdm import tqdm

    for n in tqdm(int4_names, desc=f"int4 {method}", disable=not progress or method == "rtn"):
        st = stats.get(n)
        if st is None or st.rows == 0 or method == "rtn":
            continue
        w = linears[n].weight
        if method == "awq":
            s, _ = awq_scale(w, st, spec4)
            if s is not None:
                input_scales[n] = s
        elif st.hessian is not None:
            grids[n] = gptq_quantize(w, st.hessian, spec4)
    originals = {n: linears[n].weight.detach().clone() for n in names} if stats else {}
    quantize_rtn(model, plan, input_scales=input_scales, int4_grids=grids, clip_search=clip_search)

    for n in names:
        q = model.get_submodule(n)
        err = float("nan")
        if n in stats and isinstance(q, QuantLinear):
            err = relative_output_error(originals[n], q.dequantized(), stats[n].sample)
        report.plan[n] = {"bits": plan[n].bits, "group_size": plan[n].group_size if plan[n].bits == 4 else None,
                          "awq": n in input_scales, "gptq": n in grids, "rel_output_error": err,
                          "in_features": shapes[n].in_features, "out_features": shapes[n].out_features,
                          "bias": shapes[n].bias}
    report.linear_bytes = plan_bytes(shapes, plan) + sum(4 * shapes[n].in_features for n in input_scales)
    if embeddings_int8:
        report.embeddings_int8 = quantize_embeddings(model)
    from core.quant.fused import fuse_gated_mlps

    fuse_gated_mlps(model)  # gate + up of each quantized MLP in one decode call
    return report
