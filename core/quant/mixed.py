"""Mixed precision by sensitivity: which Linears keep 8 bits when the rest go to 4.

Sensitivity of a Linear is the relative error of its output on calibration activations when only
its weight is rounded to int4 (``||X Q4(W)^T - X W^T||^2 / ||X W^T||^2``). Layers are upgraded to
int8 greedily by sensitivity per extra byte until the size budget (bytes of weights + scales, as a
fraction of the same layers in fp32) would be exceeded; a quality budget is handled by the caller
(``core.quant.pipeline``) by walking the same order until perplexity is within bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError
from core.quant.calibrate import LayerStats, relative_output_error
from core.quant.formats import QuantSpec, fake_quantize, stored_bytes


@dataclass(frozen=True)
class LayerShape:
    out_features: int
    in_features: int
    bias: bool

    def bytes(self, spec: QuantSpec) -> int:
        return stored_bytes(self.out_features, self.in_features, spec, self.bias)


def layer_shapes(model: nn.Module, names: list[str]) -> dict[str, LayerShape]:
    out = {}
    for n in names:
        m = model.get_submodule(n)
        out[n] = LayerShape(m.out_features, m.in_features, m.bias is not None)
    return out


@torch.no_grad()
def sensitivities(model: nn.Module, stats: dict[str, LayerStats], spec4: QuantSpec,
                  clip_search: bool = True) -> dict[str, float]:
    """Relative output error of each Linear under int4 (``spec4``), on its calibration sample.
    Layers that saw no calibration rows (unrouted experts) get the median of the others."""
    sens: dict[str, float] = {}
    for n, st in stats.items():
        w = model.get_submodule(n).weight
        if w.shape[1] % spec4.group_size:  # cannot be int4 (stays int8 in the plan): nothing to measure
            continue
        sens[n] = relative_output_error(w, fake_quantize(w, spec4, clip_search), st.sample)
    known = sorted(v for v in sens.values() if v == v)
    fill = known[len(known) // 2] if known else 0.0
    return {n: (v if v == v else fill) for n, v in sens.items()}


def upgrade_order(shapes: dict[str, LayerShape], sens: dict[str, float], spec4: QuantSpec,
                  spec8: QuantSpec) -> list[str]:
    """Names sorted by sensitivity gained per extra byte of going 4 -> 8 bits, best first."""
    def gain(n: str) -> float:
        extra = shapes[n].bytes(spec8) - shapes[n].bytes(spec4)
        return sens[n] / max(extra, 1)

    return sorted(shapes, key=gain, reverse=True)


def assign_by_size(shapes: dict[str, LayerShape], sens: dict[str, float], budget_fraction: float,
                   group_size: int = 64, scale_dtype: str = "fp16") -> dict[str, QuantSpec]:
    """Plan {name: spec} with total stored bytes <= budget_fraction x fp32 bytes of these layers.

    Raises ConfigError when even all-int4 does not fit (the budget is below what int4 can reach).
    """
    spec4 = QuantSpec(bits=4, group_size=group_size, scale_dtype=scale_dtype)  # type: ignore[arg-type]
    spec8 = QuantSpec(bits=8)
    fp32 = sum(s.bytes(QuantSpec(bits=16)) for s in shapes.values())
    budget = budget_fraction * fp32
    # Widths the int4 groups do not divide are fixed at int8; their bytes count against the budget.
    fixed = {n for n, s in shapes.items() if s.in_features % group_size}
    plan = {n: (spec8 if n in fixed else spec4) for n in shapes}
    total = sum(shapes[n].bytes(spec) for n, spec in plan.items())
    if total > budget:
        raise ConfigError(f"size budget {budget_fraction:.3f} x fp32 is below what all-int4 reaches "
                          f"({total / fp32:.3f} x fp32); raise --size-budget")
    free = {n: s for n, s in shapes.items() if n not in fixed}
    for n in upgrade_order(free, {n: sens.get(n, 0.0) for n in free}, spec4, spec8):
        extra = shapes[n].bytes(spec8) - shapes[n].bytes(spec4)
        if total + extra <= budget:
            plan[n] = spec8
            total += extra
    return plan


def plan_bytes(shapes: dict[str, LayerShape], plan: dict[str, QuantSpec]) -> int:
    return sum(shapes[n].bytes(spec) for n, spec in plan.items())
