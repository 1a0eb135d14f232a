"""A small rehearsal buffer filled by reservoir sampling, and the trainer hook that replays from it.

Regularisation alone (EWC) fails when tasks share one output space and classes arrive over time
(class-incremental; van de Ven et al. 2022); keeping a few old examples is the honest alternative.

Reservoir sampling (Vitter's Algorithm R): after ``n`` samples have streamed past, each of them is in
the buffer with probability ``capacity / n``, whatever task it came from, with O(1) work per sample
and no need to know the stream length in advance.

Data contract: a batch is a tensor, a tuple/list of tensors, or a dict of tensors, all with the batch
on dim 0 (the same batch the trainer's ``loss_fn`` takes). Samples are stored detached on the CPU
and replayed as a batch of the same structure.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from core.continual.ewc import batch_size_of, slice_batch
from core.errors import ConfigError, DataError
from core.train.hooks import TrainerHook


def _detach_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _detach_cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_detach_cpu(v) for v in x)
    return x


def collate(samples: list[Any]) -> Any:
    """Stack single-sample batches (leading dim 1) back into one batch."""
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(samples, dim=0)
    if isinstance(first, dict):
        return {k: collate([s[k] for s in samples]) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(collate([s[i] for s in samples]) for i in range(len(first)))
    return first


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    return x


class ReservoirBuffer:
    """Fixed-capacity uniform sample of everything ever offered to :meth:`add`."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ConfigError(f"replay buffer capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self.seen = 0  # samples offered so far (the stream length n)
        self.items: list[Any] = []
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, batch: Any) -> None:
        """Offer every sample of ``batch`` to the reservoir."""
        for i in range(batch_size_of(batch)):
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(_detach_cpu(slice_batch(batch, i)))
            else:
                j = self._rng.randrange(self.seen)  # uniform in [0, n): keep with prob capacity / n
                if j < self.capacity:
                    self.items[j] = _detach_cpu(slice_batch(batch, i))

    def sample(self, n: int) -> Any:
        """A batch of ``min(n, len)`` distinct stored samples, drawn uniformly."""
        if not self.items:
            raise DataError("the replay buffer is empty: nothing to sample")
        picks = self._rng.sample(range(len(self.items)), min(n, len(self.items)))
        return collate([self.items[i] for i in picks])

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "items": list(self.items),
                "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.capacity, self.seen, self.items = int(state["capacity"]), int(state["seen"]), list(state["items"])
            self._rng.setstate(state["rng"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed replay buffer state: {e}") from e


class Replay(TrainerHook):
    """Experience replay: each step adds ``weight * loss_fn(model, replayed batch)`` to the loss, then
    offers the step's own batch to the reservoir.

    Args:
        buffer: the reservoir (shared across tasks; its size bounds memory).
        batch_size: replayed samples per step.
        weight: weight of the replay loss relative to the current batch's loss.
    """

    name = "replay"

    def __init__(self, buffer: ReservoirBuffer, batch_size: int = 32, weight: float = 1.0) -> None:
        self.buffer, self.batch_size, self.weight = buffer, batch_size, float(weight)
        self._batch: Any = None

    def before_step(self, trainer: Any, batch: Any) -> None:
        self._batch = batch

    def before_backward(self, trainer: Any, loss: torch.Tensor) -> torch.Tensor:
        if len(self.buffer) == 0 or self.weight == 0.0:
            return loss
        device = next(trainer.model.parameters()).device
        replayed = _to(self.buffer.sample(self.batch_size), device)
        return loss + self.weight * trainer.loss_fn(trainer.model, replayed).to(loss.dtype)

    def after_step(self, trainer: Any, loss: float) -> None:
        if self._batch is not None:
            self.buffer.add(self._batch)
            self._batch = None

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
