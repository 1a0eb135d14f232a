"""Training throughput and peak memory, with and without gradient checkpointing.

Each setting runs in a fresh subprocess: CPU memory is measured as the growth of peak RSS
(``ru_maxrss``) from after model construction to the end of training, i.e. activations + grads +
optimizer state; on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any


def _one(gc: bool, steps: int, batch_size: int, seq_len: int) -> dict[str, Any]:
    import torch

    from core.model.deepseek import DeepseekV3, ModelArgs
    from core.model.default import DEFAULT_LM_ARGS
    from core.train.trainer import Trainer

    torch.manual_seed(0)
    model = DeepseekV3(ModelArgs(**DEFAULT_LM_ARGS))
    batches = [torch.randint(0, model.args.vocab_size, (batch_size, seq_len)) for _ in range(steps + 1)]
    trainer = Trainer(model, lambda m, b: m.compute_loss(b)["loss"], gradient_checkpointing=gc, progress=False)
    trainer.fit(batches[:1])  # warm-up step (allocates optimizer state)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    trainer.fit(batches[1:])
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"gradient_checkpointing": gc, "tokens_per_s": round(steps * batch_size * seq_len / dt, 1),
            "peak_rss_growth_mb": round((peak - base) / 1024, 1),
            "peak_rss_mb": round(peak / 1024, 1)}


def run_checkpointing_bench(steps: int = 6, batch_size: int = 8, seq_len: int = 256) -> dict[str, Any]:
    rows = []
    for gc in (False, True):
        code = (f"import json; from core.train.bench import _one; "
                f"print(json.dumps(_one({gc}, {steps}, {batch_size}, {seq_len})))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    off, on = rows
    return {"batch_size": batch_size, "seq_len": seq_len, "steps": steps, "without": off, "with": on,
            "throughput_ratio_with_over_without": round(on["tokens_per_s"] / off["tokens_per_s"], 3)}
