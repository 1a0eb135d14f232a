"""Knowledge distillation: the full model teaches its pruned (or otherwise smaller) copy.

Loss per batch of token ids x (B, T)::

    T^2 * KL(softmax(z_t / T) || softmax(z_s / T))          logits of teacher t and student s
    + ce_weight * CE(z_s, next tokens)                      the plain LM loss on the same text
    + hidden_weight * MSE(h_s, h_t)                         final hidden states (same width)

The student trains with the core ``Trainer`` (AdamW, cosine schedule, clipping, progress bar); the
teacher runs in inference mode and is never updated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from core.model.deepseek import DeepseekV3


class DistillLoss:
    """``loss_fn(student, batch)`` for :class:`core.train.trainer.Trainer`."""

    def __init__(self, teacher: DeepseekV3, *, temperature: float = 2.0, ce_weight: float = 0.5,
                 hidden_weight: float = 0.0) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.T, self.ce_weight, self.hidden_weight = temperature, ce_weight, hidden_weight

    def __call__(self, student: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        ids = batch
        with torch.inference_mode():
            t_out = self.teacher(ids, return_hidden=True)
        t_logits, t_hidden = t_out.logits.clone(), t_out.hidden.clone()
        s_out = student(ids, return_hidden=True)
        V = s_out.logits.shape[-1]
        T = self.T
        s_logp = F.log_softmax(s_out.logits[:, :-1].reshape(-1, V).float() / T, -1)
        t_logp = F.log_softmax(t_logits[:, :-1].reshape(-1, V).float() / T, -1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * T * T
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(s_out.logits[:, :-1].reshape(-1, V).float(),
                                                           ids[:, 1:].reshape(-1))
        if self.hidden_weight:
            loss = loss + self.hidden_weight * F.mse_loss(s_out.hidden.float(), t_hidden.float())
        return loss


def _cycle(batches: Sequence[torch.Tensor], steps: int) -> Iterator[torch.Tensor]:
    i = 0
    while i < steps:
        for b in batches:
            if i >= steps:
                return
            yield b
            i += 1


def distill(student: DeepseekV3, teacher: DeepseekV3, batches: Sequence[torch.Tensor], *, steps: int = 200,
            lr: float = 5e-4, temperature: float = 2.0, ce_weight: float = 0.5, hidden_weight: float = 0.0,
            progress: bool = True) -> dict[str, float]:
    """Train ``student`` in place for ``steps`` optimizer steps over ``batches`` (cycled)."""
    from core.train.trainer import Trainer

    loss = DistillLoss(teacher, temperature=temperature, ce_weight=ce_weight, hidden_weight=hidden_weight)
    trainer = Trainer(student, loss, lr=lr, warmup_steps=max(1, steps // 20), total_steps=steps,
                      weight_decay=0.0, device="cpu", progress=progress,
                      tokens_in_batch=lambda b: int(b.numel()))
    res = trainer.fit(_cycle(batches, steps), max_steps=steps, task_id="distill")
    student.eval()
    return {"first_loss": res["losses"][0], "final_loss": res["loss"], "steps": res["steps"],
            "tokens_per_s": res["tokens_per_s"]}


@torch.inference_mode()
def perplexity(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every position of the given (B, T) token batches."""
    nll, n = 0.0, 0
    for ids in batches:
        logits = model(ids)
        V = logits.shape[-1]
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1),
                                     reduction="sum"))
        n += ids[:, 1:].numel()
    if n == 0:
        return float("nan")
    return math.exp(nll / n)
