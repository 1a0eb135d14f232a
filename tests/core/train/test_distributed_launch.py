"""The entry point ``core.train.launch``: config errors are one readable line, a run trains on real text,
saves a distributed checkpoint and resumes from it; under torchrun (slow) 2 tensor-parallel ranks hand
over to 1 process. Plus the communication-volume formulas' invariants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigError, DataError

# The helpers sit beside this file; found whether or not tests/core/train is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_helpers import REPORTS  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
MODEL = {"vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
         "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}


def _config(tmp_path: Path, steps: int, distributed: dict | None = None) -> dict:
    return {"model": MODEL,
            "data": {"path": str(REPORTS), "split": "train", "field": "report", "seq_len": 32, "max_documents": 200},
            "train": {"steps": steps, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 3e-3},
            "output": {"dir": str(tmp_path / "run")},
            "distributed": distributed or {"strategy": "ddp"}}


@pytest.mark.skipif(not REPORTS.exists(), reason="shared data not found")
def test_launch_trains_saves_and_resumes(tmp_path: Path) -> None:
    from core.train.launch import run

    first = run(_config(tmp_path, 3))
    assert first["steps"] == 3 and first["world_size"] == 1
    assert (tmp_path / "run" / "checkpoint" / ".metadata").is_file()
    again = run(_config(tmp_path, 5))  # resumes at step 3, trains 2 more
    assert again["steps"] == 5 and len([x for x in (again["loss_first"], again["loss_last"]) if x]) == 2
    state = json.loads((tmp_path / "run" / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 5 and state["scheduler"]["last_epoch"] == 5


def test_launch_config_errors(tmp_path: Path) -> None:
    from core.train.launch import main, run

    with pytest.raises(ConfigError, match="unknown config section"):
        run({"modle": {}})
    with pytest.raises(ConfigError, match="train: unknown key"):
        run({"train": {"stepz": 3}, "data": {"path": "x"}})
    with pytest.raises(ConfigError, match="vocab_size"):
        run(_config(tmp_path, 1) | {"model": {**MODEL, "vocab_size": 128}})
    with pytest.raises(DataError, match="does not exist"):
        run(_config(tmp_path, 1) | {"data": {"path": str(tmp_path / "nope.json")}})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"distributed": {"strategy": "3d_parallel", "tensor_parallel_size": 2,
                                               "data_parallel_size": 2}}))
    assert main(["--config", str(bad)]) == 2  # world size 1 != 2 x 2: one line, exit 2


def test_comm_volume_formulas() -> None:
    from core.model.deepseek import ModelArgs
    from core.train.distributed import DistributedConfig as C
    from core.train.parallel_comm import ModelShapes, comm_volume

    shapes = ModelShapes.from_args(ModelArgs(**{k: v for k, v in MODEL.items()}))
    kw = {"micro_batch": 4, "seq_len": 64, "device": "cuda"}
    ddp = comm_volume(shapes, C(strategy="ddp"), world_size=8, **kw)
    assert ddp["total_bytes"] == int(2 * 7 / 8 * shapes.params * 4)
    fsdp = comm_volume(shapes, C(strategy="fsdp"), world_size=8, **kw)
    # bf16 gather twice + fp32 reduce-scatter = the same bytes as the fp32 all-reduce
    assert abs(fsdp["total_bytes"] - ddp["total_bytes"]) <= 2
    tp2 = comm_volume(shapes, C(strategy="3d_parallel", tensor_parallel_size=2), world_size=8, **kw)
    tp2_long = comm_volume(shapes, C(strategy="3d_parallel", tensor_parallel_size=2), world_size=8,
                           micro_batch=8, seq_len=64, device="cuda")
    assert tp2_long["bytes"]["tp_allreduce"] == 2 * tp2["bytes"]["tp_allreduce"]  # grows with tokens
    assert tp2["params_per_rank"] < shapes.params
    ep = comm_volume(shapes, C(strategy="3d_parallel", expert_parallel_size=4), world_size=8, **kw)
    assert ep["bytes"]["ep_all_to_all"] > 0 and ep["mesh"] == {"pp": 1, "dp": 2, "ep": 4, "tp": 1}
    with pytest.raises(ConfigError, match="must divide"):
        comm_volume(shapes, C(strategy="3d_parallel", tensor_parallel_size=8), world_size=8, **kw)


@pytest.mark.slow
@pytest.mark.skipif(not REPORTS.exists(), reason="shared data not found")
def test_torchrun_tensor_parallel_then_one_process(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 4, {"strategy": "3d_parallel", "tensor_parallel_size": 2})
    cfg["model"] = {**MODEL, "num_nextn_predict_layers": 1}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    p = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "core.train.launch", "--config", str(path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["mesh"]["tp"] == 2 and summary["steps"] == 4
    cfg["train"]["steps"] = 6
    cfg["distributed"] = {"strategy": "ddp"}
    path.write_text(json.dumps(cfg))
    p = subprocess.run([sys.executable, "-m", "core.train.launch", "--config", str(path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["steps"] == 6
