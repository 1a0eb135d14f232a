"""Calibration: what each Linear sees on real text, and the two ways to use it for int4.

- :func:`collect_stats` runs calibration batches through the float model with forward pre-hooks and
  keeps, per Linear, the mean |x| per input channel, a row sample of x, and (for GPTQ) the Hessian
  proxy ``H = 2/n X^T X``. Linears are visited in chunks so the K x K Hessians fit a memory budget.
- **AWQ-style scaling** (:func:`awq_scale`): salient input channels (large mean |x|) are scaled up
  before rounding and the input divided back at run time; the exponent alpha of ``s = mean|x|^alpha``
  is searched per layer to minimise the output error on the sampled rows.
- **GPTQ** (:func:`gptq_quantize`): columns are rounded one at a time onto their group's grid and
  the rounding error is pushed into the not-yet-rounded columns through the inverse Hessian
  (Frantar et al. 2022), with lazy block updates of 128 columns.

Experts in an MoE only see the tokens routed to them; an expert that saw none falls back to plain
rounding (its stats have ``rows == 0``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.quant.formats import QuantSpec, fake_quantize, int4_codes, int4_grid

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """What one Linear saw during calibration. x_abs_mean (K,), sample (R, K), hessian (K, K) | None."""

    x_abs_mean: torch.Tensor
    sample: torch.Tensor
    hessian: torch.Tensor | None
    rows: int


class _Collector:
    def __init__(self, K: int, want_hessian: bool, max_rows: int, gen: torch.Generator) -> None:
        self.abs_sum = torch.zeros(K, dtype=torch.float64)
        self.H = torch.zeros(K, K, dtype=torch.float64) if want_hessian else None
        self.rows = 0
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.max_rows, self.gen = max_rows, gen

    def __call__(self, _mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.abs_sum += x.abs().sum(0).double()
        if self.H is not None:
            self.H += (x.T @ x).double()
        self.rows += x.shape[0]
        room = self.max_rows - self.kept
        if room > 0:
            take = x if x.shape[0] <= room else x[torch.randperm(x.shape[0], generator=self.gen)[:room]]
            self.samples.append(take.clone())
            self.kept += take.shape[0]

    def result(self) -> LayerStats:
        n = max(self.rows, 1)
        K = self.abs_sum.shape[0]
        return LayerStats(
            x_abs_mean=(self.abs_sum / n).float(),
            sample=torch.cat(self.samples) if self.samples else torch.zeros(0, K),
            hessian=None if self.H is None else (2.0 * self.H / n).float(),
            rows=self.rows,
        )


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Sequence[torch.Tensor], names: Iterable[str], *,
                  want_hessian: bool = False, max_rows: int = 512, hessian_budget_bytes: int = 1 << 30,
                  forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
                  progress: bool = True) -> dict[str, LayerStats]:
    """Run ``batches`` (each a LongTensor (B, T) of token ids) through ``model`` and gather per-Linear
    input statistics for every name. ``forward(model, batch)`` defaults to ``model(batch)``."""
    from tqdm import tqdm

    names = list(names)
    fwd = forward or (lambda m, b: m(b))
    chunks: list[list[str]] = [[]]
    used = 0
    for n in names:
        K = model.get_submodule(n).in_features
        cost = 8 * K * K if want_hessian else 0
        if chunks[-1] and used + cost > hessian_budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(n)
        used += cost
    out: dict[str, LayerStats] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(chunks) * len(batches), desc="calibration", file=None, disable=not progress)
    try:
        for chunk in chunks:
            gen = torch.Generator().manual_seed(0)
            cols = {n: _Collector(model.get_submodule(n).in_features, want_hessian, max_rows, gen) for n in chunk}
            handles = [model.get_submodule(n).register_forward_pre_hook(c) for n, c in cols.items()]
            try:
                for b in batches:
                    fwd(model, b)
                    bar.update(1)
            finally:
                for h in handles:
                    h.remove()
            out.update({n: c.result() for n, c in cols.items()})
    finally:
        bar.close()
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------
# AWQ-style activation-aware scaling
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def awq_scale(weight: torch.Tensor, stats: LayerStats, spec: QuantSpec,
              grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> tuple[torch.Tensor | None, float]:
    """Best per-input-channel scale s (K,) for ``weight`` (N, K), or None when no scaling beats plain
    rounding. Returns (s, relative output error)."""
    W = weight.detach().float()
    X = stats.sample
    if stats.rows == 0 or X.shape[0] == 0:
        return None, float("nan")
    ref = X @ W.T
    denom = ref.pow(2).sum().clamp_min(1e-12)
    best_s, best_err = None, float("inf")
    base = stats.x_abs_mean.clamp_min(1e-6)
    for a in grid:
        if a == 0.0:
            s = None
            Wq = fake_quantize(W, spec, clip_search=False)
        else:
            s = base.pow(a)
            s = s / (s.max() * s.min()).sqrt()  # keep the scaled weight's range centred
            Wq = fake_quantize(W * s[None, :], spec, clip_search=False) / s[None, :]
        err = float(((X @ Wq.T) - ref).pow(2).sum() / denom)
        if err < best_err:
            best_s, best_err = s, err
    return best_s, best_err


# ---------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 GPTQ of ``weight`` (N, K) given H (K, K). Returns (codes uint8 (N, K), scale, minv (N, K/G))
    with scales in ``spec``'s dtype; the dequantized weight is what :class:`QuantLinear` will hold."""
    W = weight.detach().float().clone()
    N, K = W.shape
    G = spec.group_size
    block_size = max(G, (block_size // G) * G)
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(K) * damp * torch.diag(H).mean()
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:  # not positive definite even after damping: plain rounding
        log.warning("GPTQ: Hessian not positive definite, falling back to rounding for one layer")
        s, m = int4_grid(weight.float(), G, scale_dtype=spec.torch_scale_dtype)
        return int4_codes(weight.float(), s, m, G), s, m
    codes = torch.zeros(N, K, dtype=torch.uint8)
    scales = torch.zeros(N, K // G, dtype=spec.torch_scale_dtype)
    minvs = torch.zeros_like(scales)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        s = m = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0:  # new group: its grid from the columns as updated so far
                s, m = int4_grid(W1[:, i:i + G], G, scale_dtype=spec.torch_scale_dtype)
                scales[:, col // G], minvs[:, col // G] = s[:, 0], m[:, 0]
                s, m = s[:, 0].float(), m[:, 0].float()
            w = W1[:, i]
            q = torch.round((w - m) / s).clamp_(0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q * s + m)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, minvs


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, sample: torch.Tensor) -> float:
    """||X W~^T - X W^T||^2 / ||X W^T||^2 on the sampled rows (NaN without a sample)."""
    if sample.shape[0] == 0:
        return math.nan
    ref = sample @ weight.float().T
    return float((sample @ approx.float().T - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12))
