from __future__ import annotations

import pytest
import torch
from torch import nn

from core.continual.replay import Replay, ReservoirBuffer
from core.errors import ConfigError, DataError
from tests.core.continual.loop import HookLoop


def stream(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return ids.float().unsqueeze(1), ids


def test_capacity_and_count() -> None:
    buf = ReservoirBuffer(50, seed=1)
    for s in range(0, 1000, 25):
        buf.add(stream(s, 25))
        assert len(buf) == min(50, s + 25)
    assert buf.seen == 1000
    ids = sorted(int(item[1]) for item in buf.items)
    assert len(set(ids)) == 50 and all(0 <= i < 1000 for i in ids)


def test_reservoir_is_uniform_over_the_stream() -> None:
    """Each of n items survives with probability capacity / n: early and late items alike."""
    n, cap, runs = 200, 20, 400
    counts = torch.zeros(n)
    for seed in range(runs):
        buf = ReservoirBuffer(cap, seed=seed)
        for s in range(0, n, 10):
            buf.add(stream(s, 10))
        for item in buf.items:
            counts[int(item[1])] += 1
    freq = counts / runs
    assert float(freq.mean()) == pytest.approx(cap / n, abs=1e-6)
    # first vs last quarter of the stream: equal inclusion rates (the reservoir has no recency bias)
    assert float(freq[:50].mean()) == pytest.approx(float(freq[-50:].mean()), abs=0.02)
    assert float(freq.min()) > 0.03 and float(freq.max()) < 0.2


def test_sample_keeps_structure_and_is_distinct() -> None:
    buf = ReservoirBuffer(30, seed=0)
    buf.add({"x": torch.randn(40, 3), "y": torch.arange(40)})
    batch = buf.sample(8)
    assert batch["x"].shape == (8, 3) and batch["y"].shape == (8,)
    assert len(set(batch["y"].tolist())) == 8
    assert buf.sample(100)["y"].shape == (30,)


def test_state_round_trip_and_errors() -> None:
    buf = ReservoirBuffer(10, seed=3)
    buf.add(stream(0, 30))
    copy = ReservoirBuffer(1)
    copy.load_state_dict(buf.state_dict())
    buf.add(stream(30, 30))
    copy.add(stream(30, 30))
    assert [int(i[1]) for i in buf.items] == [int(i[1]) for i in copy.items]
    with pytest.raises(ConfigError):
        ReservoirBuffer(0)
    with pytest.raises(DataError):
        ReservoirBuffer(4).sample(2)
    with pytest.raises(DataError):
        ReservoirBuffer(4).load_state_dict({"capacity": 4})


def test_replay_hook_rehearses_old_samples() -> None:
    torch.manual_seed(0)
    model = nn.Linear(1, 2)
    seen: list[int] = []

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.extend(batch[1].tolist())
        return nn.functional.cross_entropy(m(batch[0] / 100), batch[1] % 2)

    hook = Replay(ReservoirBuffer(16, seed=0), batch_size=4)
    loop = HookLoop(model, loss_fn, hooks=[hook])
    loop.fit([stream(0, 8), stream(8, 8)], task_id="a")
    seen.clear()
    loop.fit([stream(100, 8)], task_id="b")
    # the step on task b evaluated its own 8 samples plus 4 replayed ones from task a
    assert len(seen) == 12 and all(i < 16 for i in seen[8:])
    assert hook.buffer.seen == 24
