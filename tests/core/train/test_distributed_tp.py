"""Tensor parallel and expert parallel on 2 gloo processes equal the unsharded model.

TP (tp=2): MLA heads and MLP/expert widths split with ColwiseParallel/RowwiseParallel; the loss and every
gradient (gathered from the shards) must equal the single-process ones, and 4 training steps with the
mesh-aware gradient clipping must give the same losses. EP (ep=2): each rank holds half of the routed
experts and reads half of the batch; tokens travel by all-to-all; losses and weights must again match.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The helpers sit beside this file; found whether or not tests/core/train is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPORTS, spawn, text_batches, tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not REPORTS.exists(), reason="shared data not found")

STEPS, BATCH, SEQ, LR, TOL = 4, 8, 16, 3e-3, 1e-5


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _fit(model, ctx, batches):
    from core.train.parallel_hooks import distributed_hooks
    from core.train.trainer import Trainer

    hooks, clip, loss_hook = distributed_hooks(model, ctx, grad_clip=1.0)
    tr = Trainer(model, lambda m, b: m(b), lr=LR, amp="fp32", grad_clip=clip, hooks=hooks, device="cpu",
                 progress=False)
    tr.fit(batches, max_steps=STEPS)
    return loss_hook.losses


def _tp_part(rank: int, out: str):
    from core.train.distributed import DistributedConfig, LossForward, init_distributed, parallelize, unwrap

    ctx = init_distributed(DistributedConfig(strategy="3d_parallel", tensor_parallel_size=2))
    batch = text_batches(1, BATCH, SEQ)[0]
    ref, tp = LossForward(tiny_model()), parallelize(tiny_model(), ctx)
    assert unwrap(tp).model.layers[0].self_attn.n_heads == 2  # 4 heads split over 2 ranks
    loss_ref, loss_tp = ref(batch), tp(batch)
    loss_ref.backward()
    loss_tp.backward()
    grads_tp = {n: _full(p.grad) for n, p in unwrap(tp).named_parameters() if p.grad is not None}
    grads_ref = {n: p.grad for n, p in unwrap(ref).named_parameters() if p.grad is not None}
    assert grads_tp.keys() == grads_ref.keys()
    worst = max(float((grads_tp[n] - g).abs().max()) for n, g in grads_ref.items())
    sharded = sum(type(p).__name__ == "DTensor" for p in unwrap(tp).parameters())

    batches = text_batches(STEPS, BATCH, SEQ)
    ref_ctx = init_distributed(DistributedConfig())  # plain single-process run beside the TP run
    ref_ctx.world_size = 1
    losses_ref = _fit(LossForward(tiny_model()), ref_ctx, batches)
    losses_tp = _fit(parallelize(tiny_model(), ctx), ctx, batches)
    if rank == 0:
        torch.save({"loss": (float(loss_ref), float(loss_tp)), "grad_diff": worst, "sharded": sharded,
                    "losses_ref": losses_ref, "losses_tp": losses_tp}, out)
    return ctx


def test_tensor_parallel_forward_backward_equal_unsharded(runs: dict) -> None:
    r = runs["tp"]
    assert r["sharded"] >= 10  # q/kv_b/o and every MLP/expert projection are DTensors
    assert abs(r["loss"][0] - r["loss"][1]) < TOL
    assert r["grad_diff"] < TOL
    diffs = [abs(a - b) for a, b in zip(r["losses_ref"], r["losses_tp"], strict=True)]
    assert max(diffs) < TOL, diffs


def _ep_part(rank: int, out: str) -> None:
    from core.train.distributed import DistributedConfig, init_distributed, parallelize, unwrap
    from core.train.parallel_tensor import ExpertParallelMoE

    ctx = init_distributed(DistributedConfig(strategy="3d_parallel", expert_parallel_size=2))
    assert ctx.data_world_size == 2 and ctx.data_rank == rank
    model = parallelize(tiny_model(), ctx)
    moe = unwrap(model).model.layers[1].mlp
    assert isinstance(moe, ExpertParallelMoE) and sorted(moe.experts) == ([str(2 * rank), str(2 * rank + 1)])
    batches = [{"input_ids": b["input_ids"].chunk(2)[rank]} for b in text_batches(STEPS, BATCH, SEQ)]
    losses = _fit(model, ctx, batches)
    state = {k: _full(v).clone() for k, v in unwrap(model).state_dict().items()}
    torch.save({"losses": losses, "state": state}, f"{out}.{rank}")


def _worker(rank: int, tp_out: str, ep_out: str) -> None:
    """One pair of processes for both checks (process start-up dominates on 2 cores)."""
    ctx = _tp_part(rank, tp_out)  # owns the process group; the EP part builds its own mesh on it
    _ep_part(rank, ep_out)
    ctx.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("tp_ep")
    spawn(_worker, 2, str(tmp / "tp.pt"), str(tmp / "ep.pt"))
    return {"tp": torch.load(tmp / "tp.pt", weights_only=False),
            "ep": [torch.load(tmp / f"ep.pt.{r}", weights_only=False) for r in range(2)]}


def test_expert_parallel_equals_single_process(runs: dict) -> None:
    from core.train.distributed import DistributedConfig, LossForward, init_distributed

    batches = text_batches(STEPS, BATCH, SEQ)
    ref_model = LossForward(tiny_model())
    ref_losses = _fit(ref_model, init_distributed(DistributedConfig()), batches)
    ref_state = ref_model.model.state_dict()
    for r in runs["ep"]:
        diffs = [abs(a - b) for a, b in zip(r["losses"], ref_losses, strict=True)]
        assert max(diffs) < TOL, diffs
        assert any(".experts." in k for k in r["state"])
        for k, v in r["state"].items():
            assert torch.allclose(v, ref_state[k], atol=TOL, rtol=0), k


def _four_rank_worker(rank: int, out: str) -> None:
    from core.train.distributed import DistributedConfig, init_distributed, parallelize

    base = None
    results = {}
    for name, layout in (("dp2_tp2", {"data_parallel_size": 2, "tensor_parallel_size": 2}),
                         ("ep2_tp2", {"expert_parallel_size": 2, "tensor_parallel_size": 2})):
        ctx = init_distributed(DistributedConfig(strategy="3d_parallel", **layout))
        base = base or ctx
        batches = [{"input_ids": b["input_ids"].chunk(ctx.data_world_size)[ctx.data_rank]}
                   for b in text_batches(STEPS, BATCH, SEQ)]
        results[name] = _fit(parallelize(tiny_model(), ctx), ctx, batches)
    if rank == 0:
        torch.save(results, out)
    base.close()


@pytest.mark.slow
def test_two_dimensional_layouts_on_four_ranks(tmp_path: Path) -> None:
    """The product's example layout (dp=2 x tp=2, FSDP2 + TP) and ep=2 x tp=2, 4 CPU processes."""
    from core.train.distributed import DistributedConfig, LossForward, init_distributed

    ref = _fit(LossForward(tiny_model()), init_distributed(DistributedConfig()), text_batches(STEPS, BATCH, SEQ))
    spawn(_four_rank_worker, 4, str(tmp_path / "four.pt"))
    for name, losses in torch.load(tmp_path / "four.pt", weights_only=False).items():
        diffs = [abs(a - b) for a, b in zip(losses, ref, strict=True)]
        assert max(diffs) < TOL, (name, diffs)
