from __future__ import annotations

import pytest
import torch
from torch import nn

from core.continual import adapters
from core.errors import ConfigError
from tests.core.continual.loop import HookLoop


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def data(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(-1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def test_training_task_b_leaves_task_a_bit_identical() -> None:
    torch.manual_seed(0)
    net = Net()
    probe = torch.randn(20, 8)
    params_a = adapters.add_task(net, "line.A", targets=["body.*", "head"], rank=4)
    adapters.set_task(net, "line.A")
    HookLoop(net, loss_fn, lr=0.05, params=params_a).fit(data(1), epochs=3)
    with adapters.use_task(net, "line.A"):
        out_a = net(probe).detach().clone()
    with adapters.use_task(net, None):
        out_base = net(probe).detach().clone()
    assert not torch.equal(out_a, out_base)  # A's adapters learned something

    params_b = adapters.add_task(net, "line.B", targets=["body.*", "head"], rank=4)
    assert {id(p) for p in params_b} == {id(p) for p in adapters.task_parameters(net, "line.B")}
    # Every parameter that requires grad now belongs to B: A's adapters and the base are frozen.
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params_b}
    adapters.set_task(net, "line.B")
    # Default parameter selection (all requires_grad) -- the isolation must not depend on the caller.
    HookLoop(net, loss_fn, lr=0.05).fit(data(2), epochs=3)

    with adapters.use_task(net, "line.A"):
        assert torch.equal(net(probe), out_a)
    with adapters.use_task(net, None):
        assert torch.equal(net(probe), out_base)
    with adapters.use_task(net, "line.B"):
        assert not torch.equal(net(probe), out_a)
    assert adapters.active_task_key(net) is not None  # use_task restored the routing to B


def test_new_adapter_starts_as_the_base_model() -> None:
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(5, 8)
    before = net(x).detach()
    adapters.add_task(net, "tenant/7", targets=["body.0"], rank=2)
    with adapters.use_task(net, "tenant/7"):
        torch.testing.assert_close(net(x), before)  # B is zero-initialised


def test_merge_folds_adapter_into_base() -> None:
    torch.manual_seed(0)
    net = Net()
    adapters.add_task(net, "a", targets=["head"], rank=2)
    with torch.no_grad():
        net.head.lora_b[adapters._key("a")].normal_()
    x = torch.randn(5, 8)
    with adapters.use_task(net, "a"):
        expected = net(x).detach()
    adapters.merge_task(net, "a")
    with adapters.use_task(net, None):
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_targets_and_duplicates_are_clear_errors() -> None:
    net = Net()
    with pytest.raises(ConfigError):
        adapters.add_task(net, "a", targets=["decoder.*"])
    adapters.add_task(net, "a", targets=["head"])
    with pytest.raises(ConfigError):
        adapters.add_task(net, "a", targets=["head"])
    with pytest.raises(ConfigError):
        adapters.add_task(net, "b", targets=["head"], rank=0)
