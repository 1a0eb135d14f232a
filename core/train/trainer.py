"""The core trainer: AdamW, cosine schedule with warmup, clipping, mixed precision, gradient
checkpointing, checkpoint/resume and hooks (``core.train.hooks``).

Contract (agreed with the other areas; see ``docs`` in the brief)::

    trainer = Trainer(model, loss_fn, lr=..., total_steps=..., amp="auto", hooks=[...])
    stats = trainer.fit(loader, epochs=1, max_steps=None, task_id="default")
    # stats = {"loss": last, "losses": [...], "steps": n, "tokens_per_s": ...}
    trainer.save(path); trainer.load(path)

``loss_fn(model, batch) -> scalar tensor``. Hook order per optimizer step: ``before_step`` and
``before_backward`` for each micro-batch, then ``after_backward`` (grads unscaled) and ``after_step``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from core.errors import DataError, VerticalsError
from core.train.amp import AmpMode, choose_amp
from core.train.hooks import TrainerHook

log = logging.getLogger(__name__)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside dicts, lists, tuples and dataclass-like objects) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        moved = [move_to(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def count_tokens(batch: Any) -> int:
    """Default tokens-per-batch: ``input_ids`` numel (masked by ``attention_mask``) or the first tensor's."""
    if isinstance(batch, dict):
        if "attention_mask" in batch and isinstance(batch["attention_mask"], torch.Tensor):
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
        batch = next(iter(batch.values()), None)
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if isinstance(batch, torch.Tensor):  # float tensors (images, features) count samples; ids count tokens
        return int(batch.shape[0]) if batch.is_floating_point() and batch.dim() > 1 else int(batch.numel())
    return 0


def cosine_schedule(warmup_steps: int, total_steps: int | None, min_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warmup, then cosine from 1 to ``min_ratio`` at ``total_steps`` (constant if None)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not total_steps:
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _enable_checkpointing(model: nn.Module) -> None:
    """Use the model's own switch when it has one; otherwise checkpoint every block of every ModuleList."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        return
    for ml in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
        for block in ml:
            fwd = block.forward

            def wrapped(*a: Any, _fwd: Callable[..., Any] = fwd, **k: Any) -> Any:
                if torch.is_grad_enabled():
                    return checkpoint(_fwd, *a, use_reentrant=False, **k)
                return _fwd(*a, **k)

            block.forward = wrapped  # type: ignore[method-assign]


class Trainer:
    """Train ``model`` with ``loss_fn(model, batch)``; see the module docstring for the contract."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        total_steps: int | None = None,
        grad_clip: float | None = 1.0,
        amp: AmpMode = "auto",
        grad_accum_steps: int = 1,
        gradient_checkpointing: bool = False,
        hooks: Sequence[TrainerHook] = (),
        params: Iterable[nn.Parameter] | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        tokens_in_batch: Callable[[Any], int] | None = None,
    ) -> None:
        if grad_accum_steps < 1:
            raise VerticalsError("grad_accum_steps must be >= 1")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.hooks = list(hooks)
        self.grad_clip, self.grad_accum_steps = grad_clip, grad_accum_steps
        self.progress, self.tokens_in_batch = progress, tokens_in_batch or count_tokens
        self.amp_dtype, use_scaler = choose_amp(self.device, amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if gradient_checkpointing:
            _enable_checkpointing(self.model)
        ps = [p for p in (params if params is not None else self.model.parameters()) if p.requires_grad]
        if not ps:
            raise VerticalsError("no trainable parameters")
        # No weight decay on norms, biases and other vectors (standard AdamW practice).
        groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas,
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_schedule(warmup_steps, total_steps))
        self.total_steps = total_steps
        self.global_step = 0

    # -- one optimizer step ----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _step(self, micro_batches: list[Any]) -> float:
        self.model.train()
        total = 0.0
        for batch in micro_batches:
            for h in self.hooks:
                h.before_step(self, batch)
            with self._autocast():
                loss = self.loss_fn(self.model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise VerticalsError("loss_fn must return a scalar tensor")
            for h in self.hooks:
                loss = h.before_backward(self, loss)
            if not torch.isfinite(loss.detach()) and not self.scaler.is_enabled():
                raise VerticalsError(f"loss became {loss.item()} at step {self.global_step}; "
                                     "lower the learning rate or check the data")
            self.scaler.scale(loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        for h in self.hooks:
            h.after_backward(self)
        if self.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        for h in self.hooks:
            h.after_step(self, total)
        return total

    # -- loop ------------------------------------------------------------------------------------
    def fit(self, loader: Iterable[Any], *, epochs: int = 1, max_steps: int | None = None,
            task_id: str = "default") -> dict[str, Any]:
        """Train for ``epochs`` passes (or until ``max_steps`` optimizer steps in this call)."""
        for h in self.hooks:
            h.before_task(self, task_id)
        losses: list[float] = []
        tokens, t0 = 0, time.perf_counter()
        try:
            n_batches = len(loader)  # type: ignore[arg-type]
            total = epochs * math.ceil(n_batches / self.grad_accum_steps)
        except TypeError:
            total = None
        if max_steps is not None:
            total = min(total, max_steps) if total is not None else max_steps
        bar = tqdm(total=total, desc=f"train[{task_id}]", file=sys.stderr, disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        done = False
        try:
            for _ in range(epochs):
                pending: list[Any] = []
                for batch in loader:
                    pending.append(move_to(batch, self.device))
                    tokens += self.tokens_in_batch(batch)
                    if len(pending) < self.grad_accum_steps:
                        continue
                    losses.append(self._step(pending))
                    pending = []
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / dt:,.0f}")
                    if max_steps is not None and len(losses) >= max_steps:
                        done = True
                        break
                if pending and not done:
                    losses.append(self._step(pending))
                    bar.update(1)
                if done:
                    break
        finally:
            bar.close()
        if not losses:
            raise DataError("the training data loader produced no batches")
        for h in self.hooks:
            h.after_task(self, task_id, loader)
        dt = max(time.perf_counter() - t0, 1e-9)
        return {"loss": losses[-1], "losses": losses, "steps": len(losses), "tokens_per_s": tokens / dt,
                "seconds": dt}

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.global_step, "hooks": {h.name: h.state_dict() for h in self.hooks}}

    def save(self, path: str | Path) -> Path:
        """Model + optimizer + scheduler + scaler + step + each hook's state, written atomically."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(p)
        return p

    def load(self, path: str | Path) -> None:
        p = Path(path)
        if not p.exists():
            raise DataError(f"no trainer checkpoint at {p}")
        try:
            state = torch.load(p, map_location=self.device, weights_only=False)
        except Exception as e:  # corrupt / truncated file
            raise DataError(f"cannot read trainer checkpoint {p}: {e}") from e
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["step"])
        for h in self.hooks:
            if h.name in state.get("hooks", {}):
                h.load_state_dict(state["hooks"][h.name])
