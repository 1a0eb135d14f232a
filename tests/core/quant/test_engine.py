from __future__ import annotations

import pytest
import torch

from core.errors import DataError
from core.model.generate import SamplingParams, generate
from core.quant.engine import Engine, normalize_prompt


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in (3, 9, 14, 1, 20)]


def test_batched_engine_matches_unbatched_greedy(tiny_model) -> None:
    prompts = _prompts()
    # The first request generates long enough that the others surely arrive while it is running,
    # whatever the machine's speed: they are submitted only once its first token has streamed.
    params = [SamplingParams(max_new_tokens=48)] + [SamplingParams(max_new_tokens=8)] * (len(prompts) - 1)
    ref = [generate(tiny_model, [p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    eng = Engine(tiny_model, max_batch=3, eos_token_id=None)
    with eng:
        first = eng.submit(prompts[0], params[0])
        next(iter(first.stream(timeout=60)))
        handles = [first]
        for p, sp in zip(prompts[1:], params[1:], strict=True):  # later requests join the running batch
            handles.append(eng.submit(p, sp))
        out = [h.result(120) for h in handles]
    assert out == ref
    assert eng.max_rows_seen >= 2


def test_streaming_cache_and_ttft(tiny_model) -> None:
    sp = SamplingParams(max_new_tokens=6)
    eng = Engine(tiny_model, eos_token_id=None)
    with eng:
        h = eng.submit([5, 6, 7], sp)
        streamed = list(h.stream(timeout=60))
        assert streamed == h.result(1) and len(streamed) == 6
        assert h.ttft_s is not None and h.ttft_s <= h.latency_s
        again = eng.submit([5, 6, 7], sp)
        assert again.result(60) == streamed and again.from_cache
    assert eng.cache_hits == 1


def test_engine_rejects_bad_prompts(tiny_model) -> None:
    eng = Engine(tiny_model)
    with pytest.raises(DataError):
        eng.submit([], SamplingParams())
    with pytest.raises(DataError):
        eng.submit([10_000], SamplingParams())
    with pytest.raises(DataError, match="tokenizer"):
        eng.submit("hello", SamplingParams())
    with pytest.raises(DataError, match="context"):
        eng.submit([1, 2], SamplingParams(max_new_tokens=10_000))


def test_normalize_prompt() -> None:
    assert normalize_prompt("  Hello\u00a0\n world  ") == "Hello world"
