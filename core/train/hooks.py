"""Trainer hooks: the one way to extend training (EWC, replay, distillation, logging, ...).

The core trainer (``core.train.trainer.Trainer``) calls these in order, for each task it is given::

    before_task(trainer, task_id)
      for each step:
        before_step(trainer, batch)
        loss = before_backward(trainer, loss)      # plugins may add penalty terms here
        after_backward(trainer)                    # grads exist (after unscaling under AMP)
        after_step(trainer, loss_value)            # optimizer has stepped
    after_task(trainer, task_id, loader)           # e.g. EWC consolidates (Fisher, anchors)

Hooks may keep state; ``state_dict``/``load_state_dict`` are saved with the trainer checkpoint
(e.g. EWC's Fisher and anchors), so learning can resume later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterable


class TrainerHook:
    """Base class: every method is optional. ``name`` keys the hook's state in checkpoints."""

    name: str = "hook"

    def before_task(self, trainer: Any, task_id: str) -> None: ...

    def before_step(self, trainer: Any, batch: Any) -> None: ...

    def before_backward(self, trainer: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_backward(self, trainer: Any) -> None: ...

    def after_step(self, trainer: Any, loss: float) -> None: ...

    def after_task(self, trainer: Any, task_id: str, loader: Iterable[Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
