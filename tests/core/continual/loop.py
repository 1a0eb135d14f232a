"""A tiny training loop that calls hooks in the order core/train/hooks.py documents.

Used by the unit tests so the hook protocol itself is exercised without the full Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from core.train.hooks import TrainerHook


class HookLoop:
    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
                 lr: float = 1e-2, hooks: Sequence[TrainerHook] = (),
                 params: Iterable[nn.Parameter] | None = None) -> None:
        self.model, self.loss_fn, self.hooks = model, loss_fn, list(hooks)
        ps = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(ps, lr=lr)
        self.device = torch.device("cpu")
        self.global_step = 0

    def fit(self, loader: Iterable[Any], *, epochs: int = 1, task_id: str = "default") -> dict[str, Any]:
        for h in self.hooks:
            h.before_task(self, task_id)
        losses = []
        for _ in range(epochs):
            for batch in loader:
                for h in self.hooks:
                    h.before_step(self, batch)
                loss = self.loss_fn(self.model, batch)
                for h in self.hooks:
                    loss = h.before_backward(self, loss)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for h in self.hooks:
                    h.after_backward(self)
                self.optimizer.step()
                self.global_step += 1
                for h in self.hooks:
                    h.after_step(self, float(loss.detach()))
                losses.append(float(loss.detach()))
        for h in self.hooks:
            h.after_task(self, task_id, loader)
        return {"loss": losses[-1] if losses else None, "losses": losses, "steps": len(losses)}
