"""Trainer: hooks order, loss goes down, checkpoint/resume, accumulation, checkpointing, AMP choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.errors import DataError, VerticalsError
from core.train.amp import choose_amp, cpu_has_fast_bf16
from core.train.hooks import TrainerHook
from core.train.trainer import Trainer, cosine_schedule


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 16), nn.Linear(16, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.tanh(self.layers[0](x)))


def data(n: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x, x.sum(1, keepdim=True)))
    return out


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


class Recorder(TrainerHook):
    name = "rec"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.count = 0

    def before_task(self, trainer, task_id):
        self.events.append(f"before_task:{task_id}")

    def before_step(self, trainer, batch):
        self.events.append("before_step")

    def before_backward(self, trainer, loss):
        self.events.append("before_backward")
        return loss + 0.0 * loss

    def after_backward(self, trainer):
        assert all(p.grad is not None for p in trainer.model.parameters())
        self.events.append("after_backward")

    def after_step(self, trainer, loss):
        self.count += 1
        self.events.append("after_step")

    def after_task(self, trainer, task_id, loader):
        self.events.append("after_task")

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_fit_lowers_loss_and_calls_hooks_in_order() -> None:
    torch.manual_seed(0)
    rec = Recorder()
    t = Trainer(Net(), mse, lr=1e-2, hooks=[rec], progress=False, warmup_steps=2, total_steps=36)
    stats = t.fit(data(), epochs=3, task_id="a")
    assert stats["steps"] == 36 == t.global_step and stats["tokens_per_s"] > 0
    assert sum(stats["losses"][-5:]) < 0.5 * sum(stats["losses"][:5])
    assert rec.events[:6] == ["before_task:a", "before_step", "before_backward", "after_backward", "after_step",
                              "before_step"]
    assert rec.events[-1] == "after_task" and t.amp_dtype == torch.float32


def test_max_steps_and_accumulation() -> None:
    torch.manual_seed(0)
    t = Trainer(Net(), mse, grad_accum_steps=3, progress=False)
    assert t.fit(data(12), max_steps=2)["steps"] == 2
    with pytest.raises(DataError):
        t.fit([])


def test_checkpoint_resume_restores_everything(tmp_path) -> None:
    torch.manual_seed(0)
    rec = Recorder()
    t = Trainer(Net(), mse, hooks=[rec], progress=False, total_steps=20, warmup_steps=3)
    t.fit(data(5))
    t.save(tmp_path / "ck.pt")
    rec2 = Recorder()
    t2 = Trainer(Net(), mse, hooks=[rec2], progress=False, total_steps=20, warmup_steps=3)
    t2.load(tmp_path / "ck.pt")
    assert t2.global_step == 5 and rec2.count == 5
    assert t2.scheduler.get_last_lr() == t.scheduler.get_last_lr()
    for a, b in zip(t.model.parameters(), t2.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # Continuing from the checkpoint gives exactly what continuing the original gives.
    t.fit(data(3, seed=1))
    t2.fit(data(3, seed=1))
    for a, b in zip(t.model.parameters(), t2.model.parameters(), strict=True):
        assert torch.allclose(a, b)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(DataError):
        t2.load(tmp_path / "bad.pt")


def test_gradient_checkpointing_gives_same_gradients() -> None:
    batch = data(1)[0]
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        t = Trainer(Net(), mse, gradient_checkpointing=gc, progress=False, grad_clip=None)
        t.loss_fn(t.model, batch).backward()
        grads.append([p.grad.clone() for p in t.model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_non_finite_loss_is_a_clear_error() -> None:
    t = Trainer(Net(), lambda m, b: m(b[0]).sum() * float("nan"), progress=False)
    with pytest.raises(VerticalsError, match="lower the learning rate"):
        t.fit(data(2))


def test_cosine_schedule_shape() -> None:
    f = cosine_schedule(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_amp_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    no_bf16 = frozenset({"avx2", "avx512f", "avx512_bf16"})  # dot-product bf16 only (this VM): not fast
    amx = frozenset({"avx512f", "amx_bf16", "amx_tile"})
    assert not cpu_has_fast_bf16(no_bf16, capability="AVX512")
    assert cpu_has_fast_bf16(amx, capability="AVX512")
    assert choose_amp("cpu", "auto", flags=no_bf16) == (torch.float32, False)
    monkeypatch.setattr("core.train.amp.cpu_has_fast_bf16", lambda flags=None, capability=None: bool(flags and "amx_bf16" in flags))
    assert choose_amp("cpu", "auto", flags=amx) == (torch.bfloat16, False)
    assert choose_amp("cpu", "fp16") == (torch.float16, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_amp("cuda", "auto") == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_amp("cuda", "auto") == (torch.float16, True)
    with pytest.raises(Exception, match="amp="):
        choose_amp("cpu", "int8")  # type: ignore[arg-type]
