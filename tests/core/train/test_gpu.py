"""CUDA paths: mixed-precision choice and training, CPU/GPU numerical agreement, the single-GPU launch.

Marked ``gpu``: skipped by the default suite (CI has no GPU); run with ``pytest -m gpu`` on a CUDA
machine. Self-contained (no database, broker or shared data), so they run on a bare GPU box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[3]


def _tiny_args():
    from core.model.deepseek import ModelArgs

    return ModelArgs(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                     num_hidden_layers=3, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                     kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     num_nextn_predict_layers=1)


def _train(amp: str, steps: int = 40):
    from core.model.deepseek import DeepseekV3
    from core.train.trainer import Trainer

    torch.manual_seed(0)
    model = DeepseekV3(_tiny_args())
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 512, (8, 64), generator=g).cuda()
    tr = Trainer(model, lambda m, b: m.compute_loss(b)["loss"], lr=3e-3, amp=amp, device="cuda", progress=False)
    stats = tr.fit([batch] * steps)
    return tr, stats


def test_auto_amp_on_cuda_picks_half_precision() -> None:
    from core.train.amp import choose_amp

    dtype, scaler = choose_amp("cuda", "auto")
    if torch.cuda.is_bf16_supported():
        assert (dtype, scaler) == (torch.bfloat16, False)
    else:
        assert (dtype, scaler) == (torch.float16, True)
    assert choose_amp("cuda", "fp16") == (torch.float16, True)
    assert choose_amp("cuda", "fp32") == (torch.float32, False)


@pytest.mark.parametrize("amp", ["auto", "fp16", "fp32"])
def test_training_on_cuda_learns_and_keeps_fp32_master_weights(amp: str) -> None:
    tr, stats = _train(amp)
    losses = stats["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses  # memorising one batch: the loss must fall a lot
    assert all(p.dtype == torch.float32 and p.is_cuda for p in tr.model.parameters())
    assert tr.scaler.is_enabled() == (amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()))
    if amp == "fp16":
        assert tr.scaler.get_scale() > 0


def test_cuda_fp32_forward_matches_cpu() -> None:
    from core.model.deepseek import DeepseekV3

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = DeepseekV3(_tiny_args()).eval()
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cpu = model(ids)
        gpu = model.cuda()(ids.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4, rtol=1e-4), (cpu - gpu).abs().max()


def test_greedy_generation_on_cuda_matches_cpu() -> None:
    from core.model.deepseek import DeepseekV3
    from core.model.generate import SamplingParams, generate

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = DeepseekV3(_tiny_args()).eval()
    prompt = [5, 17, 42, 7, 99]
    sp = SamplingParams(max_new_tokens=16)
    cpu = generate(model, [prompt], sp)[0]
    gpu = generate(model.cuda(), [prompt], sp)[0]
    assert cpu == gpu


def test_single_gpu_launch_trains_on_nccl(tmp_path: Path) -> None:
    text = tmp_path / "corpus.json"
    text.write_text(json.dumps([{"report": "the heart size is normal. no focal consolidation. " * 8}] * 64))
    cfg = {"model": {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 4,
                     "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
           "data": {"path": str(text), "field": "report", "seq_len": 64},
           "train": {"steps": 20, "micro_batch_size": 8, "lr": 3e-3},
           "output": {"dir": str(tmp_path / "run")},
           "distributed": {"strategy": "ddp"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "-m", "core.train.launch", "--config", str(tmp_path / "cfg.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 1 and summary["steps"] == 20
    assert summary["loss_last"] < summary["loss_first"]
    assert summary["tokens_per_s"] > 0
