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


# ---------------------------------------------------------------------------------------------------
# Mixed precision: fp32 vs bf16 vs fp16 + GradScaler, interleaved in one process
# ---------------------------------------------------------------------------------------------------
def run_amp_bench(device: str = "auto", model: str = "small", modes: tuple[str, ...] = ("fp32", "bf16", "fp16"),
                  steps: int = 10, batch_size: int = 8, seq_len: int = 256, rounds: int = 3,
                  tf32: bool = False) -> dict[str, Any]:
    """Training tokens/s of the same model under each precision mode on one device.

    Modes are interleaved over ``rounds`` (each round runs every mode for ``steps`` optimizer steps
    after one warm-up step) so machine noise hits them alike; the best round per mode is reported with
    the ratio to fp32 and the final loss (all modes start from the same weights and batches). ``model``
    is a size of ``core.train.dist_commands.MODEL_SIZES`` ("small" ~8M, "100m" ~108M). On a CPU
    without AMX, bf16/fp16 are expected to be far slower than fp32: that is what ``amp=auto`` avoids.
    """
    import torch

    from core.model.deepseek import DeepseekV3, ModelArgs
    from core.train.amp import choose_amp
    from core.train.dist_commands import MODEL_SIZES
    from core.train.trainer import Trainer

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    args = ModelArgs(**MODEL_SIZES[model])
    torch.manual_seed(0)
    init = DeepseekV3(args).state_dict()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (batch_size, seq_len), generator=g).to(dev) for _ in range(steps + 1)]
    trainers: dict[str, Trainer] = {}
    for mode in modes:
        m = DeepseekV3(args)
        m.load_state_dict(init)
        trainers[mode] = Trainer(m, lambda mod, b: mod.compute_loss(b)["loss"], amp=mode, device=dev, progress=False)  # type: ignore[arg-type]
        trainers[mode].fit(batches[:1])  # warm-up: optimizer state, kernels, autotuning

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    best: dict[str, float] = {}
    last_loss: dict[str, float] = {}
    for _ in range(rounds):
        for mode, tr in trainers.items():
            sync()
            t = time.perf_counter()
            stats = tr.fit(batches[1:])
            sync()
            dt = time.perf_counter() - t
            best[mode] = max(best.get(mode, 0.0), steps * batch_size * seq_len / dt)
            last_loss[mode] = float(stats["losses"][-1]) if stats.get("losses") else float("nan")
    rows = {}
    for mode, tr in trainers.items():
        rows[mode] = {"tokens_per_s": round(best[mode], 1),
                      "ratio_vs_fp32": round(best[mode] / best["fp32"], 3) if "fp32" in best else None,
                      "compute_dtype": str(tr.amp_dtype).removeprefix("torch."),
                      "grad_scaler": bool(tr.scaler.is_enabled()), "final_loss": round(last_loss[mode], 4)}
    auto_dtype, auto_scaler = choose_amp(dev, "auto")
    info: dict[str, Any] = {"device": str(dev), "model": model, "params": sum(p.numel() for p in DeepseekV3(args).parameters()),
                            "batch_size": batch_size, "seq_len": seq_len, "steps_per_round": steps, "rounds": rounds,
                            "tf32": tf32, "auto_picks": str(auto_dtype).removeprefix("torch."),
                            "auto_grad_scaler": auto_scaler, "modes": rows}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return info


if __name__ == "__main__":  # python -m core.train.bench amp [--device cuda] [--model 100m] ...
    import argparse

    p = argparse.ArgumentParser(prog="python -m core.train.bench")
    p.add_argument("what", choices=["amp", "checkpointing"])
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="fp32,bf16,fp16")
    a = p.parse_args()
    if a.what == "amp":
        out = run_amp_bench(a.device, a.model, tuple(a.modes.split(",")), a.steps, a.batch_size, a.seq_len, a.rounds)
    else:
        out = run_checkpointing_bench(a.steps, a.batch_size, a.seq_len)
    print(json.dumps(out))
