"""Helpers for the distributed tests: spawn N gloo processes on this CPU, a tiny DeepSeek-V3, real text.

Imported by the spawned children too (they find it through the parent's ``sys.path``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPORTS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "medical" / "iu_xray_reports" / "reports.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, path: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    sys.path[:0] = [p for p in json.loads(path) if p not in sys.path]
    fn(rank, *args)


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes joined by a gloo group (torchrun's env vars)."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, free_port(), json.dumps(sys.path), fn, args), nprocs=world,
                       start_method="spawn", join=True)


def tiny_args(**over: Any) -> Any:
    from core.model.deepseek import ModelArgs

    kw: dict[str, Any] = dict(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_nextn_predict_layers=1,
                              max_position_embeddings=64, bias_update_speed=1e-2)
    kw.update(over)
    return ModelArgs(**kw)


def tiny_model(seed: int = 0, **over: Any) -> Any:
    from core.model.deepseek import DeepseekV3

    torch.manual_seed(seed)
    return DeepseekV3(tiny_args(**over))


def text_batches(n_batches: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Byte-level windows of real radiology report text: (batch, seq) int64 per batch."""
    reports = json.loads(REPORTS.read_text())["train"]
    data = " ".join(r["report"] for r in reports[:400]).encode("utf-8")
    ids = torch.tensor(list(data), dtype=torch.long)
    need = n_batches * batch * seq
    if ids.numel() < need:
        raise RuntimeError("not enough text for the requested batches")
    windows = ids[:need].view(n_batches, batch, seq)
    return [{"input_ids": w.clone()} for w in windows]
