from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from core.continual.ewc import EWC
from core.errors import ConfigError, DataError
from core.train.trainer import Trainer
from tests.core.continual.loop import HookLoop


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def task_data(seed: int, n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = (x @ w).argmax(-1)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_zero_penalty_before_first_consolidation(net: Net) -> None:
    ewc = EWC(10.0)
    assert float(ewc.penalty(net)) == 0.0
    loss = torch.tensor(1.5)
    assert ewc.before_backward(type("T", (), {"model": net})(), loss) is loss


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_penalty_positive_after_consolidation_and_zero_at_anchor(net: Net, mode: str) -> None:
    ewc = EWC(10.0, mode=mode)  # type: ignore[arg-type]
    ewc.consolidate(net, loss_fn, task_data(1), "a")
    assert float(ewc.penalty(net)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    pen = ewc.penalty(net)
    assert float(pen) > 0.0
    pen.backward()  # differentiable: gradients pull back towards the anchor (grad has the sign of theta - a)
    assert all(p.grad is not None and bool((p.grad >= 0).all()) for p in net.parameters())


@pytest.mark.parametrize("kind", ["empirical", "empirical_per_sample", "true"])
def test_fisher_non_negative_and_informative(net: Net, kind: str) -> None:
    fisher = EWC(1.0, fisher=kind).estimate_fisher(net, loss_fn, task_data(2))  # type: ignore[arg-type]
    assert set(fisher) == {n for n, _ in net.named_parameters()}
    for name, f in fisher.items():
        assert f.shape == dict(net.named_parameters())[name].shape
        assert bool((f >= 0).all())
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_per_sample_fisher_is_mean_of_squared_sample_gradients(net: Net) -> None:
    batches = task_data(3, n=32)
    fisher = EWC(1.0, fisher="empirical_per_sample").estimate_fisher(net, loss_fn, batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    expected = torch.zeros_like(net.head.weight)
    for i in range(len(y)):
        net.zero_grad()
        loss_fn(net, (x[i : i + 1], y[i : i + 1])).backward()
        expected += net.head.weight.grad.square()
    torch.testing.assert_close(fisher["head.weight"], expected / len(y))


def assert_grad_mode_matches_loss_mode(net: Net, make_ewc, tasks: list, batch, shift: float) -> None:  # noqa: ANN001
    """apply='grad' (penalty gradient added after backward) == apply='loss' (penalty in the loss), after
    consolidating each of ``tasks`` and moving every weight by ``shift`` after each."""
    grads = {}
    for apply in ("loss", "grad"):
        ewc = make_ewc(apply)
        model = copy.deepcopy(net)
        for i, data in enumerate(tasks):
            ewc.consolidate(model, loss_fn, data, f"t{i}")
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(shift)
        trainer = type("T", (), {"model": model})()
        loss = ewc.before_backward(trainer, loss_fn(model, batch))
        loss.backward()
        ewc.after_backward(trainer)
        grads[apply] = [p.grad.clone() for p in model.parameters()]
    for g_loss, g_grad in zip(grads["loss"], grads["grad"], strict=True):
        torch.testing.assert_close(g_grad, g_loss, rtol=1e-4, atol=1e-6)


def test_grad_mode_adds_exactly_the_penalty_gradient(net: Net) -> None:
    assert_grad_mode_matches_loss_mode(net, lambda apply: EWC(50.0, apply=apply), [task_data(15)],
                                       task_data(14)[0], 0.2)


def test_online_decay_arithmetic(net: Net) -> None:
    data_a, data_b = task_data(4), task_data(5)
    f_a = EWC(1.0).estimate_fisher(net, loss_fn, data_a)
    ewc = EWC(3.0, mode="online", decay=0.25)
    ewc.consolidate(net, loss_fn, data_a, "a")
    with torch.no_grad():
        net.head.weight.add_(0.3)
    f_b = EWC(1.0).estimate_fisher(net, loss_fn, data_b)
    ewc.consolidate(net, loss_fn, data_b, "b")
    assert list(ewc.fishers) == ["online"] and ewc.tasks == ["a", "b"]
    for name in f_a:
        torch.testing.assert_close(ewc.fishers["online"][name], 0.25 * f_a[name] + f_b[name])
        torch.testing.assert_close(ewc.anchors["online"][name], dict(net.named_parameters())[name].detach())
    # penalty = lam/2 * sum F (theta - anchor)^2 with the single (latest) anchor
    with torch.no_grad():
        net.body[0].bias.add_(0.5)
    f = ewc.fishers["online"]["body.0.bias"]
    assert float(ewc.penalty(net)) == pytest.approx(0.5 * 3.0 * float((f * 0.25).sum()), rel=1e-5)


def test_separate_mode_is_sum_of_per_task_penalties(net: Net) -> None:
    ewc = EWC(7.0, mode="separate")
    for i, seed in enumerate((6, 7, 8)):
        ewc.consolidate(net, loss_fn, task_data(seed), f"t{i}")
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    explicit = sum(
        0.5 * 7.0 * sum(float((ewc.fishers[t][n] * (p.detach() - ewc.anchors[t][n]).square()).sum())
                        for n, p in net.named_parameters())
        for t in ewc.fishers
    )
    assert len(ewc.fishers) == 3
    assert float(ewc.penalty(net)) == pytest.approx(explicit, rel=1e-4)


def test_param_filter_covers_only_matching_parameters(net: Net) -> None:
    ewc = EWC(1.0, params=["body.*"])
    ewc.consolidate(net, loss_fn, task_data(9), "a")
    assert set(ewc.fishers["a"]) == {"body.0.weight", "body.0.bias"}
    with torch.no_grad():
        net.head.weight.add_(1.0)  # not protected: no penalty
    assert float(ewc.penalty(net)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError):
        EWC(1.0, params=["nothing.*"]).consolidate(net, loss_fn, task_data(9), "a")


def test_true_fisher_on_sequence_logits() -> None:
    """An LM-like model: logits (B, T, V); labels are sampled per position."""
    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    batches = [torch.randint(0, 11, (4, 5)) for _ in range(2)]

    def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))

    ewc = EWC(1.0, fisher="true", output_fn=lambda m, ids: m(ids[:, :-1]))
    fisher = ewc.consolidate(lm, lm_loss, batches, "lm")
    assert all(bool((f >= 0).all()) for f in fisher.values()) and float(fisher["1.weight"].sum()) > 0


def test_resume_from_saved_state(net: Net, tmp_path) -> None:  # noqa: ANN001
    ewc = EWC(5.0, mode="separate")
    ewc.consolidate(net, loss_fn, task_data(10), "a")
    ewc.consolidate(net, loss_fn, task_data(11), "b")
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05)
    expected = float(ewc.penalty(moved))
    # through the trainer checkpoint (Trainer.save stores each hook's state_dict)
    Trainer(net, loss_fn, hooks=[ewc], progress=False, device="cpu").save(tmp_path / "ckpt.pt")
    fresh = EWC(5.0, mode="separate")
    Trainer(copy.deepcopy(net), loss_fn, hooks=[fresh], progress=False, device="cpu").load(tmp_path / "ckpt.pt")
    assert fresh.tasks == ["a", "b"]
    assert float(fresh.penalty(moved)) == pytest.approx(expected, rel=1e-6)
    # and through the standalone safetensors file
    ewc.save(tmp_path / "ewc.safetensors")
    again = EWC(5.0)
    again.load(tmp_path / "ewc.safetensors")
    assert float(again.penalty(moved)) == pytest.approx(expected, rel=1e-6)
    for t in ("a", "b"):
        for n in ewc.fishers[t]:
            assert torch.equal(again.fishers[t][n], ewc.fishers[t][n])


def test_bad_saved_state_is_a_clear_error(net: Net, tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError):
        EWC(1.0).load(bad)
    with pytest.raises(DataError):
        EWC(1.0).load_state_dict({"mode": "separate"})
    with pytest.raises(ConfigError):
        EWC(1.0, mode="online").load_state_dict({"mode": "separate", "fishers": {}, "anchors": {}, "tasks": []})
    ewc = EWC(1.0)
    ewc.consolidate(net, loss_fn, task_data(1), "a")
    with pytest.raises(DataError):
        ewc.penalty(nn.Linear(2, 2))
    with pytest.raises(DataError):
        EWC(1.0).consolidate(net, loss_fn, [], "empty")


def test_ewc_hook_keeps_weights_near_old_task(net: Net) -> None:
    """Through the hook protocol: with EWC, task B moves the weights that matter for A (Fisher-weighted
    drift) much less than plain training does."""
    a, b = task_data(12, n=128), task_data(13, n=128)

    def drift(lam: float) -> float:
        model = copy.deepcopy(net)
        ewc = EWC(lam)
        loop = HookLoop(model, loss_fn, lr=0.1, hooks=[ewc])
        loop.fit(a, epochs=5, task_id="a")
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        loop.fit(b, epochs=5, task_id="b")
        assert ewc.tasks == ["a", "b"]
        f_a = ewc.fishers["a"]  # identical in both runs: training on A is unpenalised and seeded
        return sum(float((f_a[n] * (p.detach() - anchor[n]).square()).sum()) for n, p in model.named_parameters())

    assert drift(30.0) < 0.5 * drift(0.0)


def test_prox_mode_is_the_proximal_step_and_stable_under_huge_lambda(net: Net) -> None:
    ewc = EWC(1e9, apply="prox")
    ewc.consolidate(net, loss_fn, task_data(20), "a")
    anchor = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3)
    moved = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    trainer = type("T", (), {"model": net, "optimizer": opt})()
    ewc.after_step(trainer, 0.0)
    w = [ewc._weight[n] for n, _ in net.named_parameters()]
    for p, a, m, wi in zip(net.parameters(), anchor, moved, w, strict=True):
        alpha = 0.5 * 1e9 * wi
        torch.testing.assert_close(p.detach(), (m + alpha * a) / (1 + alpha))  # closed form
        assert torch.isfinite(p).all()
        # never overshoots the anchor: each weight ends between where it was and its anchor
        assert bool(((p - a).abs() <= (m - a).abs() + 1e-6).all())
    assert any(bool((p - a).abs().max() < 1e-3) for p, a in zip(net.parameters(), anchor, strict=True))


def test_prox_mode_keeps_the_task_gradient_untouched(net: Net) -> None:
    ewc = EWC(50.0, apply="prox")
    ewc.consolidate(net, loss_fn, task_data(21), "a")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2)
    trainer = type("T", (), {"model": net})()
    loss = loss_fn(net, task_data(22)[0])
    assert ewc.before_backward(trainer, loss) is loss
    loss.backward()
    before = [p.grad.clone() for p in net.parameters()]
    ewc.after_backward(trainer)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("norm", ["max", "mean"])
def test_normalized_fisher_scales_each_task_to_one(net: Net, norm: str) -> None:
    raw = EWC(1.0).estimate_fisher(net, loss_fn, task_data(20))
    ewc = EWC(1.0, normalize=norm)  # type: ignore[arg-type]
    stored = ewc.consolidate(net, loss_fn, task_data(20), "a")
    if norm == "max":
        assert max(float(f.max()) for f in stored.values()) == pytest.approx(1.0)
    else:
        total = sum(float(f.sum()) for f in stored.values())
        assert total / sum(f.numel() for f in stored.values()) == pytest.approx(1.0)
    ratio = float(stored["head.weight"].sum() / raw["head.weight"].sum())  # same shape, one scale factor
    for n, f in stored.items():
        torch.testing.assert_close(f, raw[n] * ratio, rtol=1e-5, atol=1e-12)
    # a second task with a 100x larger loss scale weighs the same after normalisation
    ewc.consolidate(net, lambda m, b: 10.0 * loss_fn(m, b), task_data(21), "b")
    top = [max(float(f.max()) for f in ewc.fishers[t].values()) for t in ("a", "b")]
    if norm == "max":
        assert top == pytest.approx([1.0, 1.0])


def test_temperature_divides_the_logits_of_the_sampled_fisher(net: Net) -> None:
    data = task_data(22)
    torch.manual_seed(5)
    hot = EWC(1.0, fisher="true", temperature=3.0).estimate_fisher(net, loss_fn, data)
    torch.manual_seed(5)
    scaled = EWC(1.0, fisher="true", output_fn=lambda m, b: m(b[0]) / 3.0).estimate_fisher(net, loss_fn, data)
    torch.manual_seed(5)
    plain = EWC(1.0, fisher="true").estimate_fisher(net, loss_fn, data)
    for n in hot:
        torch.testing.assert_close(hot[n], scaled[n])
    assert any(not torch.allclose(hot[n], plain[n]) for n in hot)


def test_temperature_and_normalize_are_checked() -> None:
    with pytest.raises(ConfigError):
        EWC(1.0, fisher="empirical_per_sample", temperature=2.0)
    with pytest.raises(ConfigError):
        EWC(1.0, fisher="true", temperature=0.0)
    with pytest.raises(ConfigError):
        EWC(1.0, normalize="sum")  # type: ignore[arg-type]


# -- Kronecker-factored Fisher ------------------------------------------------------------------
def _kfac_brute(net: Net, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head layer's A = E[[h,1][h,1]^T] and G = E_x sum_y p(y|x) g_y g_y^T, one sample and label at a time."""
    x = torch.cat([b[0] for b in batches])
    a_sum, g_sum = torch.zeros(17, 17, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    for i in range(len(x)):
        h = net.body(x[i : i + 1])
        a = torch.cat([h.detach()[0], torch.ones(1)]).double()
        a_sum += torch.outer(a, a)
        out = net.head(h)
        p = torch.softmax(out, -1).detach()[0]
        for c in range(3):
            (g,) = torch.autograd.grad(-torch.log_softmax(out, -1)[0, c], out, retain_graph=True)
            g_sum += float(p[c]) * torch.outer(g[0].double(), g[0].double())
    return (a_sum / len(x)).float(), (g_sum / len(x)).float()


def test_kfac_factors_match_per_sample_expectation(net: Net) -> None:
    batches = task_data(20, n=32)
    factors = EWC(1.0, fisher="kfac").estimate_kfac(net, batches)
    assert set(factors) == {"body.0#A", "body.0#G", "head#A", "head#G"}
    a, g = _kfac_brute(net, batches)
    torch.testing.assert_close(factors["head#A"], a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(factors["head#G"], g, rtol=1e-4, atol=1e-7)
    for f in factors.values():  # symmetric positive semi-definite
        torch.testing.assert_close(f, f.T)
        assert float(torch.linalg.eigvalsh(f.double()).min()) > -1e-6


def test_kfac_penalty_is_the_kronecker_quadratic_form(net: Net) -> None:
    ewc = EWC(3.0, fisher="kfac", kfac_tol=0.0)  # no truncation: the exact A (x) G form
    factors = ewc.consolidate(net, loss_fn, task_data(21), "a")
    assert float(ewc.penalty(net)) == pytest.approx(0.0, abs=1e-6)
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = 0.0
    for layer, mod, old in (("body.0", moved.body[0], net.body[0]), ("head", moved.head, net.head)):
        dw = torch.cat([mod.weight - old.weight, (mod.bias - old.bias)[:, None]], dim=1).detach()
        a, g = factors[f"{layer}#A"], factors[f"{layer}#G"]
        expected += float(torch.trace(dw.T @ g @ dw @ a))  # = vec(dW)^T (A (x) G) vec(dW)
    assert expected > 0
    assert float(ewc.penalty(moved)) == pytest.approx(0.5 * 3.0 * expected, rel=1e-4)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_kfac_grad_mode_adds_exactly_the_penalty_gradient(net: Net, mode: str) -> None:
    # two consolidations: two terms (online: one shared anchor)
    assert_grad_mode_matches_loss_mode(net, lambda apply: EWC(40.0, fisher="kfac", apply=apply, mode=mode),
                                       [task_data(22), task_data(23)], task_data(24)[0], 0.1)


def test_kfac_online_shares_the_latest_anchor_and_decays(net: Net) -> None:
    ewc = EWC(1.0, fisher="kfac", mode="online", decay=0.5)
    f_a = ewc.consolidate(net, loss_fn, task_data(25), "a")
    with torch.no_grad():
        net.head.bias.add_(1.0)
    ewc.consolidate(net, loss_fn, task_data(26), "b")
    assert ewc.tasks == ["a", "b"]
    torch.testing.assert_close(ewc.fishers["a"]["head#G"], 0.5 * f_a["head#G"])
    torch.testing.assert_close(ewc.fishers["a"]["head#A"], f_a["head#A"])
    for t in ("a", "b"):
        assert torch.equal(ewc.anchors[t]["head.bias"], net.head.bias.detach())
    assert float(ewc.penalty(net)) == pytest.approx(0.0, abs=1e-6)


def _assert_resumes(ewc: EWC, net: Net, path: Path) -> Net:
    """Save ``ewc``, load it into a fresh hook of the same Fisher kind: same (positive) penalty on moved
    weights. Returns the moved model."""
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05)
    expected = float(ewc.penalty(moved))
    assert expected > 0
    ewc.save(path)
    again = EWC(ewc.lam, fisher=ewc.fisher_kind)
    again.load(path)
    assert float(again.penalty(moved)) == pytest.approx(expected, rel=1e-6)
    return moved


def test_kfac_resume_and_config_errors(net: Net, tmp_path) -> None:  # noqa: ANN001
    ewc = EWC(5.0, fisher="kfac", params=["head.*"])
    ewc.consolidate(net, loss_fn, task_data(27), "a")
    assert set(ewc.anchors["a"]) == {"head.weight", "head.bias"}
    _assert_resumes(ewc, net, tmp_path / "kfac.safetensors")
    with pytest.raises(ConfigError):  # diagonal hook cannot read KFAC factors
        EWC(5.0).load(tmp_path / "kfac.safetensors")
    with pytest.raises(ConfigError):
        EWC(1.0, fisher="kfac", apply="prox")
    with pytest.raises(ConfigError):
        EWC(1.0, fisher="kfac", params=["nothing.*"]).consolidate(net, loss_fn, task_data(1), "a")


@pytest.mark.parametrize("fisher", ["kfac", "kfac_merged"])
def test_kfac_hook_keeps_old_task_outputs(net: Net, fisher: str) -> None:
    """Through the hook protocol: with the KFAC (or merged) penalty, task B changes A's logits much less."""
    a, b = task_data(28, n=128), task_data(29, n=128)
    xa = torch.cat([x for x, _ in a])

    def change(lam: float) -> float:
        model = copy.deepcopy(net)
        loop = HookLoop(model, loss_fn, lr=0.1, hooks=[EWC(lam, fisher=fisher)])  # type: ignore[arg-type]
        loop.fit(a, epochs=5, task_id="a")
        before = model(xa).detach()
        loop.fit(b, epochs=5, task_id="b")
        return float((model(xa).detach() - before).square().mean())

    assert change(30.0) < 0.5 * change(0.0)


def test_kfac_on_sequence_logits_with_a_large_vocabulary() -> None:
    """LM-like logits (B, T, V) with V > 32: one sampled label per position; every position is a row."""
    torch.manual_seed(0)
    vocab = 40
    lm = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, vocab))
    batches = [torch.randint(0, vocab, (4, 6)) for _ in range(2)]

    def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, vocab), ids[:, 1:].reshape(-1))

    ewc = EWC(1.0, fisher="kfac", output_fn=lambda m, ids: m(ids[:, :-1]))
    factors = ewc.consolidate(lm, lm_loss, batches, "lm")
    assert set(factors) == {"1#A", "1#G", "3#A", "3#G"}  # the embedding is not an nn.Linear
    assert factors["1#A"].shape == (9, 9) and factors["3#G"].shape == (vocab, vocab)
    assert float(factors["1#A"][-1, -1]) == pytest.approx(1.0)  # the bias column: E[1 * 1]
    assert float(torch.trace(factors["3#G"])) > 0
    with torch.no_grad():
        lm[3].weight.add_(0.1)
    assert float(ewc.penalty(lm)) > 0


def test_kfac_skips_layers_the_forward_does_not_run(net: Net) -> None:
    net.spare = nn.Linear(3, 3)  # registered but never called by forward
    factors = EWC(1.0, fisher="kfac").estimate_kfac(net, task_data(30))
    assert {k.split("#")[0] for k in factors} == {"body.0", "head"}


def test_kfac_refresh_reuses_the_gradient_for_k_steps(net: Net) -> None:
    """kfac_refresh=3: steps 1-3 add the penalty gradient of step 1's weights, step 4 recomputes it;
    a new consolidation forces a refresh."""
    ewc = EWC(7.0, fisher="kfac", kfac_refresh=3)
    exact = EWC(7.0, fisher="kfac")
    for e in (ewc, exact):
        e.consolidate(net, loss_fn, task_data(31), "a")

    class Loop:
        model = net

    def added(hook: EWC) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        hook.after_backward(Loop())
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    first = None
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        got, want = added(ewc), added(exact)
        assert float(want.abs().max()) > 0
        if step in (0, 3):  # a refresh: the exact gradient at the current weights
            torch.testing.assert_close(got, want)
            first = got
        else:  # lagged: the tensor of the last refresh, though the weights moved
            torch.testing.assert_close(got, first)
            assert not torch.allclose(got, want)
    ewc.consolidate(net, loss_fn, task_data(32), "b")
    exact.consolidate(net, loss_fn, task_data(32), "b")
    with torch.no_grad():
        net.head.bias.add_(0.3)
    torch.testing.assert_close(added(ewc), added(exact))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError):
            EWC(1.0, fisher="kfac", kfac_refresh=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", ["max", "mean"])
def test_kfac_normalize_scales_each_task_to_one(net: Net, norm: str) -> None:
    """normalize on KFAC: one scale per task (its G factors divided), so each task's Kronecker Fisher has
    mean diagonal entry 1 ("mean") or largest eigenvalue 1 ("max"), whatever its raw scale."""
    ewc = EWC(1.0, fisher="kfac", normalize=norm)  # type: ignore[arg-type]
    numel = sum(p.numel() for p in net.parameters())
    for t, seed in (("a", 33), ("b", 34)):
        raw = EWC(1.0, fisher="kfac").estimate_kfac(net, task_data(seed))
        ewc.consolidate(net, loss_fn, task_data(seed), t)
        with torch.no_grad():
            net.head.weight.mul_(3.0)  # a more confident net: a smaller raw Fisher for the next task
        fs = ewc.fishers[t]
        layers = ("body.0", "head")
        if norm == "max":
            top = max(float(torch.linalg.eigvalsh(fs[f"{n}#A"].double()).max()
                            * torch.linalg.eigvalsh(fs[f"{n}#G"].double()).max()) for n in layers)
            assert top == pytest.approx(1.0, rel=1e-4)
        else:
            mean = sum(float(fs[f"{n}#A"].trace() * fs[f"{n}#G"].trace()) for n in layers) / numel
            assert mean == pytest.approx(1.0, rel=1e-4)
        for n in layers:
            torch.testing.assert_close(fs[f"{n}#A"], raw[f"{n}#A"])  # A untouched, G one common scale
        ratio = float(fs["head#G"].trace() / raw["head#G"].trace())
        torch.testing.assert_close(fs["body.0#G"], raw["body.0#G"] * ratio, rtol=1e-4, atol=1e-10)


# -- kfac_merged: per-task Kronecker factors merged into one structured penalty per layer ----------------
LAYERS = (("body.0", lambda m: m.body[0]), ("head", lambda m: m.head))


def _merged_fisher(a: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """The structured Fisher of one layer on the row-major vec([W | b]), built the slow way."""
    if kind == "rows":  # one in' x in' block per output unit: diag(G) (x) A
        return torch.kron(torch.diag(g.diagonal()), a)
    if kind == "cols":  # one out x out block per input column: G (x) diag(A)
        return torch.kron(g, torch.diag(a.diagonal()))
    return torch.kron(torch.diag(g.diagonal()), torch.diag(a.diagonal()))


def _slow_merged_penalty(ewc: EWC, model: Net) -> torch.Tensor:
    """lambda/2 * sum_t sum_layers vec(X - X_t)^T F_t vec(X - X_t), one term per stored task."""
    total = torch.zeros((), dtype=torch.float64)
    for t, fs in ewc.fishers.items():
        for layer, get in LAYERS:
            if f"{layer}#A" not in fs:
                continue
            mod = get(model)
            x = torch.cat([mod.weight, mod.bias[:, None]], dim=1).double()
            anchor = ewc.anchors[t]
            x_t = torch.cat([anchor[f"{layer}.weight"], anchor[f"{layer}.bias"][:, None]], dim=1).double()
            a, g = fs[f"{layer}#A"].double(), fs[f"{layer}#G"].double()
            kind = ewc._merged_structure(a.shape[0], g.shape[0])
            f = _merged_fisher(a, g, kind)
            if layer in ewc._merged_sub:  # + the Kronecker Fisher projected on the shared subspace
                u_g, u_a = (u.double() for u in ewc._merged_sub[layer][:2])
                p_g, p_a = u_g @ u_g.T, u_a @ u_a.T
                f = f + torch.kron(p_g @ g @ p_g, p_a @ a @ p_a)
            d = (x - x_t).reshape(-1)
            total = total + d @ f @ d
    return 0.5 * ewc.lam * total


@pytest.mark.parametrize(("block_max", "kinds", "rank"), [(128, ("rows", "cols"), 0), (4, ("diag", "cols"), 0),
                                                          (0, ("diag", "diag"), 0), (4, ("diag", "cols"), 3)])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_kfac_merged_equals_the_sum_of_per_task_penalties(net: Net, block_max: int, kinds: tuple, rank: int,
                                                         mode: str) -> None:
    """Three tasks merged into one term per layer: penalty and its gradient (loss and grad paths) equal
    the per-task sum computed the slow way; every structure (rows / cols / diag, + the shared Kronecker
    subspace of kfac_rank) is exercised."""
    ewc = EWC(7.0, fisher="kfac_merged", kfac_block_max=block_max, mode=mode, decay=0.6,  # type: ignore[arg-type]
              kfac_rank=rank)
    if rank:
        assert not ewc._merged_sub
    assert float(ewc.penalty(net)) == 0.0  # zero before the first consolidation
    model = copy.deepcopy(net)
    for i in range(3):
        ewc.consolidate(model, loss_fn, task_data(40 + i), f"t{i}")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    assert tuple(ewc._merged[n][0] for n, _ in LAYERS) == kinds
    assert set(ewc._merged_sub) == ({"body.0", "head"} if rank else set())
    assert len(ewc.fishers) == 3 and all(len(terms) == 4 for terms in ewc._merged.values())  # one term
    slow = _slow_merged_penalty(ewc, model)
    fast = ewc.penalty(model)
    assert float(slow.detach()) > 0
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-4)
    want = [w.float() for w in torch.autograd.grad(slow, list(model.parameters()))]
    got = torch.autograd.grad(fast, list(model.parameters()))
    model.zero_grad(set_to_none=True)
    ewc.after_backward(type("T", (), {"model": model})())  # apply="grad": lambda * (M X - V) in .grad
    for w, g, p in zip(want, got, model.parameters(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)
    ewc.kfac_refresh = 3  # the lagged path (cached gradient buffers) adds the same exact gradient first
    model.zero_grad(set_to_none=True)
    ewc.after_backward(type("T", (), {"model": model})())
    for w, p in zip(want, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_kfac_merged_online_decay_and_latest_anchor(net: Net) -> None:
    """online: F <- decay * F_old + F_new (the G factor of the old task scaled), one anchor (the latest
    weights): the merged penalty is zero there and equals decay * F_a + F_b around it."""
    ewc = EWC(2.0, fisher="kfac_merged", mode="online", decay=0.5)
    f_a = ewc.consolidate(net, loss_fn, task_data(45), "a")
    with torch.no_grad():
        net.head.bias.add_(1.0)
    f_b = ewc.consolidate(net, loss_fn, task_data(46), "b")
    torch.testing.assert_close(ewc.fishers["a"]["head#G"], 0.5 * f_a["head#G"])
    assert float(ewc.penalty(net).detach()) == pytest.approx(0.0, abs=1e-5)
    moved, d = copy.deepcopy(net), torch.tensor([0.2, 0.0, -0.1])
    with torch.no_grad():
        moved.head.bias.add_(d)
    # head is "cols": the bias column j = in' - 1 has block A[j, j] * G = 1 * G per task
    expected = 0.5 * 2.0 * float(d @ (0.5 * f_a["head#G"] + f_b["head#G"]) @ d)
    assert expected > 0
    assert float(ewc.penalty(moved).detach()) == pytest.approx(expected, rel=1e-4)


def test_kfac_merged_resume_and_reads_kfac_state(net: Net, tmp_path) -> None:  # noqa: ANN001
    """Saved factors + anchors restore the same merged penalty; a plain kfac checkpoint (same factors)
    loads into kfac_merged too; a diagonal hook still refuses them."""
    ewc = EWC(5.0, fisher="kfac_merged", normalize="mean")
    for i in range(2):
        ewc.consolidate(net, loss_fn, task_data(47 + i), f"t{i}")
    moved = _assert_resumes(ewc, net, tmp_path / "merged.safetensors")
    state = EWC(5.0, fisher="kfac")
    state.load(tmp_path / "merged.safetensors")
    assert float(state.penalty(moved)) > 0
    with pytest.raises(ConfigError):
        EWC(5.0).load(tmp_path / "merged.safetensors")
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError):
            EWC(1.0, fisher="kfac_merged", kfac_block_max=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            EWC(1.0, fisher="kfac_merged", kfac_rank=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        EWC(1.0, fisher="kfac_merged", apply="prox")
