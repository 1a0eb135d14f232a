"""A decode step of a quantized model runs the kernels on the packed weights: it never dequantizes a
whole weight (``QuantLinear.weight`` / ``dequantized()`` is for probes and tools, ~50-80 ms for a
8192x1024 head). Guards the core LM's decode fast path, which once probed ``lm_head.weight.dtype``."""

from __future__ import annotations

import pytest
import torch

from core.model.deepseek import DeepseekV3, LatentCache
from core.quant.formats import QuantSpec
from core.quant.linear import QuantLinear, quantizable_linears, quantize_rtn


def test_decode_steps_do_not_dequantize(quant_home, tiny_model: DeepseekV3, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model
    args = model.args
    quantize_rtn(model, {n: QuantSpec(4, 64) for n in quantizable_linears(model)})
    calls = []
    orig = QuantLinear.dequantized
    monkeypatch.setattr(QuantLinear, "dequantized", lambda self: calls.append(self) or orig(self))
    cache = LatentCache(args.num_hidden_layers, 1, 32, args.kv_lora_rank + args.qk_rope_head_dim,
                        dtype=torch.float32, device="cpu")
    with torch.inference_mode():
        tok = model(torch.randint(0, args.vocab_size, (1, 6)), cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        calls.clear()
        for _ in range(3):
            tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
    assert not calls, f"{len(calls)} dequantizations in 3 decode steps"
