"""The core LM's ``linear`` calls a hook-free QuantLinear's ``forward`` directly at inference (no
``Module.__call__``, ~2-3 us a call): same outputs as the module call, and a registered hook, autograd
or ``deepseek.DIRECT_FORWARD = False`` put the module call back (hooks still fire)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.model import deepseek
from core.model.deepseek import DeepseekV3, LatentCache
from core.quant.formats import QuantSpec
from core.quant.linear import QuantLinear, quantizable_linears, quantize_rtn


def _decode(model: DeepseekV3, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    args = model.args
    cache = LatentCache(args.num_hidden_layers, 1, 32, args.kv_lora_rank + args.qk_rope_head_dim,
                        dtype=torch.float32, device="cpu")
    toks, logits = [], []
    with torch.inference_mode():
        tok = model(prompt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out = model(tok, cache=cache)[:, -1]
            logits.append(out)
            tok = out.argmax(-1, keepdim=True)
            toks.append(int(tok))
    return toks, torch.cat(logits)


def _count_module_calls(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    calls: list[nn.Module] = []
    orig = nn.Module._call_impl

    def counting(self: nn.Module, *a: object, **k: object) -> object:
        if type(self) is QuantLinear:
            calls.append(self)
        return orig(self, *a, **k)

    monkeypatch.setattr(nn.Module, "__call__", counting)
    return calls


def test_quantlinear_forward_called_directly_with_identical_output(
        quant_home, tiny_model: DeepseekV3, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model
    quantize_rtn(model, {n: QuantSpec(4, 64) for n in quantizable_linears(model)})
    assert any(type(m) is QuantLinear for m in model.modules())
    prompt = torch.randint(0, model.args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    calls = _count_module_calls(monkeypatch)
    monkeypatch.setattr(deepseek, "DIRECT_FORWARD", False)
    toks_old, logits_old = _decode(model, prompt, 4)
    n_old = len(calls)
    assert n_old > 0  # the module path calls QuantLinear through __call__
    calls.clear()
    monkeypatch.setattr(deepseek, "DIRECT_FORWARD", True)
    toks_new, logits_new = _decode(model, prompt, 4)
    assert toks_new == toks_old
    torch.testing.assert_close(logits_new, logits_old, rtol=0, atol=0)
    # the prefill (6 rows) may still use module calls; the 4 one-token steps must not
    assert len(calls) < n_old


def test_hooks_and_autograd_restore_the_module_call(
        quant_home, tiny_model: DeepseekV3, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model
    quantize_rtn(model, {n: QuantSpec(8) for n in quantizable_linears(model)})
    q = next(m for m in model.modules() if type(m) is QuantLinear)
    seen: list[int] = []
    h = q.register_forward_hook(lambda mod, inp, out: seen.append(1))
    try:
        x = torch.randn(1, q.in_features)
        with torch.no_grad():
            y_hooked = deepseek.linear(q, x)
        assert seen == [1]
        _decode(model, torch.randint(0, model.args.vocab_size, (1, 4)), 2)
        assert len(seen) > 1  # every step ran the hook
    finally:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(deepseek.linear(q, x), y_hooked, rtol=0, atol=0)
    # with autograd on, the module call (and its autograd-aware path) is kept
    calls = _count_module_calls(monkeypatch)
    with torch.enable_grad():
        deepseek.linear(q, x)
    assert calls == [q]
    calls.clear()
    with torch.no_grad():
        deepseek.linear(q, x)
    assert calls == []
