"""``verticals core quantize | prune | eval-ppl | bench-quant``: thin Typer wrappers over core.quant.models.

Each command prints exactly one JSON object as the last line of stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _emit(obj: dict) -> None:
    typer.echo(json.dumps(obj, default=float))


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize(
        model: Annotated[Path, typer.Option("--model", help="Float model directory (core.model.hf layout).")],
        bits: Annotated[str, typer.Option("--bits", help="8, 4 or mixed.")],
        calibration_data: Annotated[Path, typer.Option("--calibration-data", help="Text file (.txt/.jsonl/.json[.gz]).")],
        out: Annotated[Path, typer.Option("--out", help="Output directory for the quantized checkpoint.")],
        group_size: Annotated[int, typer.Option("--group-size", help="int4 group size: 32, 64 or 128.")] = 64,
        method: Annotated[str, typer.Option("--method", help="int4 rounding: gptq, awq or rtn.")] = "gptq",
        size_budget: Annotated[float, typer.Option("--size-budget", help="mixed: weights+scales <= this x fp32.")] = 0.18,
        scale_dtype: Annotated[str, typer.Option("--scale-dtype", help="fp16 or fp32 int4 scales.")] = "fp16",
        embeddings_int8: Annotated[bool, typer.Option("--embeddings-int8", help="Also store embeddings in int8.")] = False,
        max_calib_tokens: Annotated[int, typer.Option(help="Calibration tokens to use.")] = 16384,
    ) -> None:
        """Quantize a core LM to int8 / int4 / mixed precision with calibration; write safetensors + manifest."""
        from core.quant.models import quantize_dir

        _emit(quantize_dir(model, out, bits, calibration_data, group_size=group_size, method=method,  # type: ignore[arg-type]
                           size_budget=size_budget, scale_dtype=scale_dtype,  # type: ignore[arg-type]
                           embeddings_int8=embeddings_int8, max_calib_tokens=max_calib_tokens))

    @app.command("prune")
    def prune(
        model: Annotated[Path, typer.Option("--model", help="Float model directory.")],
        distill_data: Annotated[Path, typer.Option("--distill-data", help="Text file for distillation.")],
        out: Annotated[Path, typer.Option("--out", help="Output directory of the pruned model.")],
        sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of all parameters to remove.")] = 0.3,
        steps: Annotated[int, typer.Option("--steps", help="Distillation optimizer steps (0 = none).")] = 200,
        parts: Annotated[str, typer.Option("--parts", help="Comma list of ffn, experts, heads.")] = "ffn,experts,heads",
        hidden_weight: Annotated[float, typer.Option(help="Weight of the hidden-state MSE term.")] = 0.0,
    ) -> None:
        """Structured pruning (FFN channels, routed experts, heads) + knowledge distillation."""
        from core.quant.models import prune_dir

        _emit(prune_dir(model, out, sparsity, distill_data, steps=steps,
                        parts=tuple(p.strip() for p in parts.split(",") if p.strip()), hidden_weight=hidden_weight))

    @app.command("eval-ppl")
    def eval_ppl(
        model: Annotated[Path, typer.Option("--model", help="Float or quantized model directory.")],
        data: Annotated[Path, typer.Option("--data", help="Held-out text file.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (always the last line).")] = False,
        seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
        max_tokens: Annotated[int, typer.Option(help="Tokens of text to evaluate.")] = 32768,
    ) -> None:
        """Perplexity of a model (float or quantized) on a text file."""
        from core.quant.models import eval_ppl_dir

        res = eval_ppl_dir(model, data, seq_len=seq_len, max_tokens=max_tokens)
        if not as_json:
            typer.echo(f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens", err=True)
        _emit(res)

    @app.command("bench-quant")
    def bench_quant(
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (always the last line).")] = False,
        quick: Annotated[bool, typer.Option(help="Small sizes (smoke run, figures not comparable).")] = False,
        distill_steps: Annotated[int, typer.Option(help="Distillation steps for the pruning figure.")] = 300,
        decode_tokens: Annotated[int, typer.Option(help="Decode steps timed per format and round.")] = 24,
        lm: Annotated[str, typer.Option(help="default | bench (smaller LM) | auto (default if stored).")] = "default",
        threads: Annotated[int, typer.Option(help="torch + kernel threads for the decode timing, the same "
                                             "for every format (0 = what the kernel measurement picks).")] = 0,
    ) -> None:
        """fp32 / int8 / int4 / mixed / torch dynamic int8: perplexity, decode tokens/s, bytes, bandwidth
        fraction; kernel choice; pruning + distillation; engine batching. One run, side by side."""
        from core.quant.bench import run_bench

        if lm not in ("default", "bench", "auto"):
            from core.errors import ConfigError

            raise ConfigError(f"--lm must be default, bench or auto, not {lm!r}")
        res = run_bench(quick=quick, distill_steps=distill_steps, decode_tokens=decode_tokens, lm=lm,
                        threads=threads or None)
        if not as_json:
            typer.echo(json.dumps(res, indent=2, default=float), err=True)
        _emit(res)
