"""Pipeline parallel (torch.distributed.pipelining) on 2 gloo processes equals one process.

Stages: 4 decoder layers cut into 2 stages (1F1B) or 4 virtual stages, 2 per rank (interleaved 1F1B);
4 micro-batches per step. Losses of 3 optimizer steps, and the weights saved as a distributed checkpoint
and reloaded into the whole model on one process, must equal plain training on the same batches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

# The helpers sit beside this file; found whether or not tests/core/train is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPORTS, spawn, text_batches, tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not REPORTS.exists(), reason="shared data not found")

STEPS, BATCH, SEQ, LR, TOL = 3, 8, 16, 3e-3, 1e-5
MODEL = {"num_hidden_layers": 4, "num_nextn_predict_layers": 0}


def _pp_worker(rank: int, out: str) -> None:
    from core.train.distributed import DistributedConfig, init_distributed
    from core.train.parallel_checkpoint import save_checkpoint
    from core.train.parallel_hooks import distributed_hooks
    from core.train.parallel_pipeline import LocalStages, build_schedule, build_stages, pipeline_step
    from core.train.trainer import Trainer

    base = init_distributed(DistributedConfig(strategy="3d_parallel", pipeline_parallel_size=2))
    results = {}
    for schedule_name, per_rank in (("1f1b", 1), ("interleaved_1f1b", 2)):
        cfg = dataclasses.replace(base.config, pipeline_schedule=schedule_name, pipeline_stages_per_rank=per_rank)
        ctx = dataclasses.replace(base, config=cfg, owns_process_group=False)
        stages = build_stages(tiny_model(**MODEL), ctx)
        local = LocalStages(stages)
        schedule = build_schedule(stages, ctx, 4, (BATCH // 4, SEQ))
        hooks, clip, loss_hook = distributed_hooks(local, ctx, grad_clip=1.0, pp_group=ctx.submesh("pp").get_group())
        assert clip is None
        hooks = [h for h in hooks if type(h).__name__ != "GradSyncHook"]
        trainer = Trainer(local, lambda m, b: torch.zeros(()), lr=LR, grad_clip=None, amp="fp32", hooks=hooks,
                          device="cpu", progress=False)
        for b in text_batches(STEPS, BATCH, SEQ):
            pipeline_step(trainer, schedule, stages, ctx, b["input_ids"])
        save_checkpoint(f"{out}.{schedule_name}", local, trainer.optimizer, train_state={"step": STEPS})
        results[schedule_name] = {"losses": loss_hook.losses, "layers": sorted(local.model.layers)}
    if rank == 0:
        torch.save(results, out)
    base.close()


def test_pipeline_parallel_equals_single_process(tmp_path: Path) -> None:
    from core.train.distributed import DistributedConfig, LossForward, init_distributed
    from core.train.parallel_checkpoint import load_checkpoint
    from core.train.parallel_hooks import distributed_hooks
    from core.train.trainer import Trainer

    ref = LossForward(tiny_model(**MODEL))
    hooks, clip, loss_hook = distributed_hooks(ref, init_distributed(DistributedConfig()), grad_clip=1.0)
    Trainer(ref, lambda m, b: m(b), lr=LR, amp="fp32", grad_clip=clip, hooks=hooks, device="cpu",
            progress=False).fit(text_batches(STEPS, BATCH, SEQ), max_steps=STEPS)

    out = tmp_path / "pp.pt"
    spawn(_pp_worker, 2, str(out))
    results = torch.load(out, weights_only=False)
    assert results["1f1b"]["layers"] == ["0", "1"]  # rank 0 holds the first half
    assert results["interleaved_1f1b"]["layers"] == ["0", "2"]  # looped virtual stages
    for name, r in results.items():
        diffs = [abs(a - b) for a, b in zip(r["losses"], loss_hook.losses, strict=True)]
        assert max(diffs) < TOL, (name, diffs)
        # The pipeline checkpoint (2 ranks, stage-local names) reloads into the whole model on 1 process.
        whole = tiny_model(seed=7, **MODEL)
        assert load_checkpoint(f"{out}.{name}", whole)["step"] == STEPS
        for k, v in ref.model.state_dict().items():
            assert torch.allclose(whole.state_dict()[k], v, atol=TOL, rtol=0), (name, k)
