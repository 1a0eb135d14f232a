"""Parameter isolation: one set of low-rank adapters (LoRA, Hu et al. 2021) per task, line or tenant.

The shared weights stay frozen; each task owns small matrices ``A (r, in)`` and ``B (out, r)`` per
adapted linear layer, so its forward is ``y = W x + b + (alpha / r) * B A x``. Training task B only
touches B's adapters, so task A's outputs stay bit-identical: forgetting is zero by construction.
At inference the caller picks the adapter by id (``use_task(model, "line-7")``); ``None`` = base.

    add_task(model, "insurance", targets=["body.*"], rank=8)   # wraps matching nn.Linear, adds adapters
    params = task_parameters(model, "insurance")                # what the optimizer should train
    with use_task(model, "insurance"):
        logits = model(x)
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from core.errors import ConfigError


def _key(task_id: str) -> str:
    """nn.ModuleDict keys may not hold '.'; map any id to a safe, stable key."""
    return "t_" + re.sub(r"[^0-9A-Za-z_]", lambda m: f"_{ord(m.group()):x}_", task_id)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-task low-rank updates; ``active`` picks which one is applied."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.ParameterDict()  # task key -> (r, in)
        self.lora_b = nn.ParameterDict()  # task key -> (out, r)
        self.scales: dict[str, float] = {}
        self.active: str | None = None

    def add(self, task_id: str, rank: int, alpha: float) -> None:
        k = _key(task_id)
        if k in self.lora_a:
            raise ConfigError(f"task {task_id!r} already has an adapter on this layer")
        w = self.base.weight
        a = torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA: A random, B zero => starts as the base
        self.lora_a[k] = nn.Parameter(a)
        self.lora_b[k] = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        self.scales[k] = alpha / rank

    def has(self, task_id: str) -> bool:
        return _key(task_id) in self.lora_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        y = self.base(x)
        if self.active is None or self.active not in self.lora_a:
            return y
        k = self.active
        return y + self.scales[k] * (x @ self.lora_a[k].t() @ self.lora_b[k].t())

    def extra_repr(self) -> str:
        return f"tasks={list(self.lora_a.keys())}"


def _targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | LoRALinear)
             and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    # An nn.Linear already wrapped shows up as "<name>.base": adapt the wrapper, not its inside.
    return [n for n in names if not (n.endswith(".base") and n[: -len(".base")] in names)]


def add_task(model: nn.Module, task_id: str, targets: Sequence[str], rank: int = 8,
             alpha: float | None = None) -> list[nn.Parameter]:
    """Give ``task_id`` its own adapters on every ``nn.Linear`` whose name matches a glob in ``targets``.

    Wraps plain linears in :class:`LoRALinear` the first time, freezes every adapter of other tasks
    and the wrapped base weights, and returns the new task's trainable parameters.
    """
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, not {rank}")
    names = _targets(model, targets)
    if not names:
        raise ConfigError(f"no nn.Linear in the model matches {list(targets)}")
    new: list[nn.Parameter] = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if isinstance(layer, nn.Linear):
            layer = LoRALinear(layer)
            setattr(parent, child, layer)
        layer.add(task_id, rank, float(alpha if alpha is not None else 2 * rank))
        k = _key(task_id)
        for key in layer.lora_a:
            on = key == k
            layer.lora_a[key].requires_grad_(on)
            layer.lora_b[key].requires_grad_(on)
        new += [layer.lora_a[k], layer.lora_b[k]]
    return new


def task_parameters(model: nn.Module, task_id: str) -> list[nn.Parameter]:
    """Every adapter parameter owned by ``task_id``."""
    k = _key(task_id)
    return [p for m in model.modules() if isinstance(m, LoRALinear) and k in m.lora_a
            for p in (m.lora_a[k], m.lora_b[k])]


def set_task(model: nn.Module, task_id: str | None) -> None:
    """Route every adapted layer to ``task_id``'s adapters (``None``, or an id without adapters: base)."""
    k = None if task_id is None else _key(task_id)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.active = k


def active_task_key(model: nn.Module) -> str | None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            return m.active
    return None


@contextlib.contextmanager
def use_task(model: nn.Module, task_id: str | None) -> Iterator[nn.Module]:
    """``with use_task(model, "tenant-3"): model(x)`` -- restores the previous routing afterwards."""
    previous = active_task_key(model)
    set_task(model, task_id)
    try:
        yield model
    finally:
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.active = previous


def merge_task(model: nn.Module, task_id: str) -> None:
    """Fold ``task_id``'s adapters into the base weights (for a deployment that serves one task only).

    This changes every other task's outputs; use it on a copy of the model.
    """
    k = _key(task_id)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and k in m.lora_a:
                m.base.weight += m.scales[k] * (m.lora_b[k] @ m.lora_a[k])  # (out, r) @ (r, in)
