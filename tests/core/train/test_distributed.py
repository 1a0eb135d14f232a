"""Data parallel on 2 gloo processes equals one process with the same global batch; DCP reshards 2 -> 1.

Each test spawns 2 CPU processes (torchrun's environment variables, gloo), trains the tiny DeepSeek-V3
(MLA, MoE with routed + shared experts, MTP) on byte-level windows of real radiology reports.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, DataError
from core.train.distributed import DistributedConfig, load_config

# The helpers sit beside this file; found whether or not tests/core/train is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPORTS, spawn, text_batches, tiny_model  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ, LR = 10, 8, 16, 3e-3

pytestmark = pytest.mark.skipif(not REPORTS.exists(), reason="shared data not found")


def _train(model_to_train, ctx, batches, accum: int):
    from core.train.parallel_hooks import distributed_hooks
    from core.train.trainer import Trainer

    hooks, clip, loss_hook = distributed_hooks(model_to_train, ctx, grad_clip=1.0)
    trainer = Trainer(model_to_train, lambda m, b: m(b), lr=LR, grad_accum_steps=accum, amp="fp32",
                      grad_clip=clip, hooks=hooks, device="cpu", progress=False)
    trainer.fit(batches, max_steps=STEPS)
    return trainer, loss_hook.losses


def _local_batches(batches, rank: int, world: int, accum: int):
    """Split each global batch into this rank's rows, then into ``accum`` micro-batches."""
    out = []
    for b in batches:
        rows = b["input_ids"].chunk(world)[rank]
        out.extend({"input_ids": m} for m in rows.chunk(accum))
    return out


def _reference(batches) -> tuple[list[float], dict[str, torch.Tensor]]:
    from core.train.distributed import DistributedConfig, init_distributed, parallelize

    ctx = init_distributed(DistributedConfig())
    m = parallelize(tiny_model(), ctx)
    _, losses = _train(m, ctx, batches, 1)
    return losses, {k: v.detach().clone() for k, v in m.model.state_dict().items()}


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _dp_worker(rank: int, out: str, ckpt: str) -> None:
    from torch.distributed.tensor import DTensor

    from core.train.distributed import DistributedConfig, init_distributed, parallelize, unwrap
    from core.train.parallel_checkpoint import save_checkpoint

    batches = text_batches(STEPS, GLOBAL_BATCH, SEQ)
    ctx = init_distributed(DistributedConfig(strategy="ddp"))
    results = {}
    for name, strategy, accum in (("ddp", "ddp", 1), ("ddp_accum2", "ddp", 2), ("fsdp_accum2", "fsdp", 2)):
        c = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, strategy=strategy))
        m = parallelize(tiny_model(), c)
        sent: list[int] = []
        if strategy == "ddp":  # measure what DDP all-reduces, to check the comm-volume formula
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting_hook(state, bucket, sent=sent):
                sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
                return allreduce_hook(state, bucket)

            m.register_comm_hook(c.submesh("dp").get_group(), counting_hook)
        trainer, losses = _train(m, c, _local_batches(batches, rank, 2, accum), accum)
        sd = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
              for k, v in unwrap(m).state_dict().items()}
        results[name] = {"losses": losses, "state": sd, "allreduced_bytes": sum(sent)}
        if strategy == "fsdp":  # sharded over the 2 ranks: save, and keep what each parameter held
            assert isinstance(next(unwrap(m).parameters()), DTensor)
            save_checkpoint(ckpt, unwrap(m), trainer.optimizer, train_state={"step": trainer.global_step})
            results["exp_avg"] = {n: _full_tensor(trainer.optimizer.state[p]["exp_avg"])
                                  for n, p in unwrap(m).named_parameters() if p in trainer.optimizer.state}
    if rank == 0:
        torch.save(results, out)
    ctx.close()


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-process run for the module: DDP, DDP + accumulation, FSDP2 + accumulation (+ its checkpoint)."""
    tmp = tmp_path_factory.mktemp("dp")
    spawn(_dp_worker, 2, str(tmp / "dp.pt"), str(tmp / "ckpt"))
    return {"results": torch.load(tmp / "dp.pt", weights_only=False), "ckpt": tmp / "ckpt"}


def test_data_parallel_equals_single_process(dp_run: dict) -> None:
    batches = text_batches(STEPS, GLOBAL_BATCH, SEQ)
    ref_losses, ref_state = _reference(batches)
    results = {k: v for k, v in dp_run["results"].items() if k != "exp_avg"}
    assert ref_losses[-1] < ref_losses[0] - 0.05  # it learns, so the comparison means something
    for name, res in results.items():
        assert len(res["losses"]) == STEPS, name
        diffs = [abs(a - b) for a, b in zip(res["losses"], ref_losses, strict=True)]
        assert max(diffs) < 1e-5, (name, diffs)
        for k, v in ref_state.items():
            assert torch.allclose(res["state"][k], v, atol=1e-5, rtol=0), (name, k)
    # Measured DDP payload = the formula's: fp32 gradients of every parameter, once per optimizer step
    # (with accumulation too: no_sync on the first micro-batch).
    from core.train.distributed import DistributedConfig as DC
    from core.train.parallel_comm import ModelShapes, comm_volume

    shapes = ModelShapes.from_model(tiny_model())
    vol = comm_volume(shapes, DC(strategy="ddp"), world_size=2, micro_batch=4, seq_len=SEQ, device="cpu")
    for name in ("ddp", "ddp_accum2"):
        assert results[name]["allreduced_bytes"] == STEPS * shapes.params * 4, name
    assert vol["bytes"]["dp_grad_allreduce"] == int(2 * (2 - 1) / 2 * shapes.params * 4)


def test_checkpoint_saved_at_world_2_reloads_at_world_1(dp_run: dict) -> None:
    from core.train.parallel_checkpoint import export_full_state_dict, load_checkpoint
    from core.train.trainer import Trainer

    ckpt = dp_run["ckpt"]
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    want_model = dp_run["results"]["fsdp_accum2"]["state"]
    want_exp_avg = dp_run["results"]["exp_avg"]
    assert want_exp_avg

    model = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    trainer = Trainer(model, lambda m, b: m.compute_loss(**b)["loss"], lr=LR, amp="fp32", device="cpu",
                      progress=False)
    state = load_checkpoint(ckpt, model, trainer.optimizer)
    assert state["step"] == STEPS
    for k, v in want_model.items():
        assert torch.equal(model.state_dict()[k], v), k
    for n, p in model.named_parameters():
        if n in want_exp_avg:
            assert torch.equal(trainer.optimizer.state[p]["exp_avg"], want_exp_avg[n]), n
    exported = export_full_state_dict(ckpt)
    assert set(exported) == set(want_model) and all(torch.equal(exported[k], v) for k, v in want_model.items())
    # Training goes on from the restored state.
    trainer.fit(text_batches(1, GLOBAL_BATCH, SEQ), max_steps=1)


def test_checkpoint_errors_are_readable(tmp_path: Path) -> None:
    from core.train.parallel_checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(DataError, match="not a distributed checkpoint"):
        load_checkpoint(tmp_path, tiny_model())
    save_checkpoint(tmp_path / "c", tiny_model())
    with pytest.raises(DataError, match="shape"):
        load_checkpoint(tmp_path / "c", tiny_model(hidden_size=48))


# --- config -------------------------------------------------------------------------------------------
def test_config_resolves_data_parallel_and_checks_world_size(tmp_path: Path) -> None:
    cfg = DistributedConfig.from_dict({"strategy": "3d_parallel", "tensor_parallel_size": 2})
    assert cfg.resolve(8).data_parallel_size == 4
    assert cfg.resolve(8).mesh_shape == (1, 4, 1, 2)
    bad = DistributedConfig.from_dict({"strategy": "3d_parallel", "data_parallel_size": 2,
                                       "tensor_parallel_size": 2, "pipeline_parallel_size": 1})
    with pytest.raises(ConfigError, match="world size is 2"):
        bad.resolve(2)
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.resolve(3)
    with pytest.raises(ConfigError, match="unknown key"):
        DistributedConfig.from_dict({"strategy": "ddp", "tensor_parallel": 2})
    with pytest.raises(ConfigError, match="3d_parallel"):
        DistributedConfig.from_dict({"strategy": "ddp", "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match="positive integer"):
        DistributedConfig.from_dict({"strategy": "fsdp", "data_parallel_size": 0})
    with pytest.raises(ConfigError, match="strategy must be one of"):
        DistributedConfig.from_dict({"strategy": "zero"})

    y = tmp_path / "c.yaml"
    y.write_text("distributed:\n  strategy: 3d_parallel\n  data_parallel_size: 2\n  tensor_parallel_size: 2\n"
                 "  pipeline_parallel_size: 1\n")
    c = DistributedConfig.from_dict(load_config(y)["distributed"])
    assert c.resolve(4).mesh_shape == (1, 2, 1, 2)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"distributed": {"strategy": "fsdp"}}))
    assert load_config(j)["distributed"]["strategy"] == "fsdp"
    (tmp_path / "bad.yaml").write_text("distributed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
