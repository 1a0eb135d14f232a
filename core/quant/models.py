"""Opening any core LM directory (float or quantized) and running the quantize / prune / eval steps on it.

These are the functions behind the CLI (``core.quant.commands``) and the workers: pure compute plus
file IO, no Typer. Every user-facing failure is a ``DataError`` / ``ConfigError`` with a clear line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from core.errors import ConfigError, DataError
from core.quant.checkpoint import MANIFEST, file_sha256, load_quantized, read_manifest, save_quantized
from core.quant.data import load_tokenizer, token_batches


def is_quantized(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MANIFEST).exists()


def load_model(model_dir: str | Path) -> nn.Module:
    """A float checkpoint (core.model.hf layout) or a quantized one, ready for inference."""
    d = Path(model_dir)
    if is_quantized(d):
        return load_quantized(d)
    from core.model.hf import load_pretrained

    return load_pretrained(d)


def _eos(model: nn.Module) -> int | None:
    e = getattr(getattr(model, "args", None), "eos_token_id", None)
    return e[0] if isinstance(e, list) else e


def model_batches(model_dir: str | Path, model: nn.Module, data: str | Path, *, seq_len: int, batch_size: int,
                  max_tokens: int) -> list[torch.Tensor]:
    tok = load_tokenizer(model_dir)
    batches = token_batches(data, tok, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                            eos_id=_eos(model))
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and max(int(b.max()) for b in batches) >= vocab:
        raise DataError(f"the tokenizer beside {model_dir} produces ids beyond the model's vocabulary ({vocab})")
    return batches


def quantize_dir(model_dir: str | Path, out_dir: str | Path, bits: str | int, calibration_data: str | Path, *,
                 group_size: int = 64, method: Literal["rtn", "awq", "gptq"] = "gptq", size_budget: float = 0.18,
                 scale_dtype: Literal["fp16", "fp32"] = "fp16", embeddings_int8: bool = False,
                 seq_len: int = 128, max_calib_tokens: int = 16384, progress: bool = True) -> dict[str, Any]:
    """Quantize a float checkpoint directory into ``out_dir``; returns the manifest summary."""
    from core.model.hf import hf_config
    from core.quant.pipeline import parse_bits, quantize_model

    mode = parse_bits(bits)  # bits=3 fails here, before any file is read
    calib = Path(calibration_data)
    if not calib.exists():
        raise DataError(f"calibration data file not found: {calib}")
    if is_quantized(model_dir):
        raise DataError(f"{model_dir} is already quantized; quantize the float model")
    t0 = time.perf_counter()
    model = load_model(model_dir)
    batches = model_batches(model_dir, model, calib, seq_len=seq_len, batch_size=4, max_tokens=max_calib_tokens)
    report = quantize_model(model, mode, group_size=group_size, method=method, calib_batches=batches,
                            size_budget=size_budget, scale_dtype=scale_dtype, embeddings_int8=embeddings_int8,
                            progress=progress)
    calibration = {"file": str(calib.resolve()), "sha256": file_sha256(calib),
                   "tokens": int(sum(b.numel() for b in batches)), "seq_len": seq_len}
    save_quantized(model, out_dir, report.to_dict(), config=hf_config(model.args), source_dir=model_dir,
                   calibration=calibration)
    m = read_manifest(out_dir)
    return {"out": str(out_dir), "bits": m["bits"], "method": m["method"], "group_size": m["group_size"],
            "linear_bytes_ratio": m["linear_bytes_ratio"], "payload_bytes": m["payload_bytes"],
            "calibration_sha256": calibration["sha256"], "seconds": time.perf_counter() - t0}


def eval_ppl_dir(model_dir: str | Path, data: str | Path, *, seq_len: int = 128, max_tokens: int = 32768
                 ) -> dict[str, Any]:
    from core.quant.distill import perplexity

    if not Path(data).exists():
        raise DataError(f"data file not found: {data}")
    model = load_model(model_dir)
    batches = model_batches(model_dir, model, data, seq_len=seq_len, batch_size=4, max_tokens=max_tokens)
    t0 = time.perf_counter()
    ppl = perplexity(model, batches)
    quant = read_manifest(model_dir) if is_quantized(model_dir) else None
    return {"model": str(model_dir), "data": str(data), "ppl": ppl, "tokens": int(sum(b.numel() for b in batches)),
            "quantized": None if quant is None else {"bits": quant["bits"], "method": quant["method"]},
            "seconds": time.perf_counter() - t0}


def prune_dir(model_dir: str | Path, out_dir: str | Path, sparsity: float, distill_data: str | Path, *,
              steps: int = 200, parts: tuple[str, ...] = ("ffn", "experts", "heads"), seq_len: int = 128,
              batch_size: int = 8, max_tokens: int = 131072, lr: float = 5e-4, hidden_weight: float = 0.0,
              progress: bool = True) -> dict[str, Any]:
    """Prune a float checkpoint by ``sparsity`` of its parameters, distil it from the original, save it."""
    from core.model.hf import save_pretrained
    from core.quant.distill import distill
    from core.quant.prune import prune_model

    if not Path(distill_data).exists():
        raise DataError(f"distillation data file not found: {distill_data}")
    if is_quantized(model_dir):
        raise DataError(f"{model_dir} is quantized; prune the float model, then quantize the result")
    if steps < 0:
        raise ConfigError("steps must be >= 0")
    teacher = load_model(model_dir)
    batches = model_batches(model_dir, teacher, distill_data, seq_len=seq_len, batch_size=batch_size,
                            max_tokens=max_tokens)
    student, plan = prune_model(teacher, batches[:8], sparsity, parts, progress=progress)
    res: dict[str, Any] = {}
    if steps:
        res = distill(student, teacher, batches, steps=steps, lr=lr, hidden_weight=hidden_weight, progress=progress)
    tok = load_tokenizer(model_dir)
    save_pretrained(student, out_dir, tokenizer=tok if hasattr(tok, "save") else None)
    if not hasattr(tok, "save"):
        for f in Path(model_dir).glob("tokenizer*.json"):
            (Path(out_dir) / f.name).write_bytes(f.read_bytes())
    summary = {"out": str(out_dir), "sparsity": plan.sparsity, "params_before": plan.params_before,
               "params_after": plan.params_after, "keep_fraction": plan.keep_fraction,
               "config": {"intermediate_size": plan.intermediate_size,
                          "moe_intermediate_size": plan.moe_intermediate_size,
                          "n_routed_experts": plan.n_routed_experts,
                          "num_attention_heads": plan.num_attention_heads},
               "distill": res}
    (Path(out_dir) / "prune_report.json").write_text(json.dumps(summary, indent=2))
    return summary
