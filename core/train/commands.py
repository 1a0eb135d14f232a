"""``verticals core train``: train the core LM on the shared corpora (progress bar on stderr; the
result JSON is the last line of stdout). Heavy imports stay inside the command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        config: Annotated[Path | None, typer.Option(help="JSON training config: TrainConfig fields, with "
                                                    "a 'model' object of ModelArgs fields.")] = None,
        data: Annotated[Path | None, typer.Option(help="Data root (default: settings.data_root).")] = None,
        out: Annotated[Path | None, typer.Option(help="Output dir (default: models/core/lm-<name>).")] = None,
        name: str = "lm-custom",
        steps: Annotated[int | None, typer.Option(help="Override the config's optimizer steps.")] = None,
        gradient_checkpointing: Annotated[bool | None, typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing")] = None,
        balance_bias: Annotated[bool | None, typer.Option("--balance-bias/--no-balance-bias")] = None,
        default: Annotated[bool, typer.Option(help="(Re)train the default LM used by every area.")] = False,
    ) -> None:
        """Train a DeepSeek-V3 LM (tokenizer + model, HF layout) on our customer-service and medical text."""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from core.errors import DataError
        from core.model.default import TrainConfig, default_lm_dir, train_lm
        from core.settings import get_settings

        cfg = TrainConfig.from_file(config) if config else TrainConfig()
        if steps is not None:
            cfg.steps = steps
        if gradient_checkpointing is not None:
            cfg.gradient_checkpointing = gradient_checkpointing
        if balance_bias is not None:
            cfg.balance_bias = balance_bias
        root = data or get_settings().data_root
        if not Path(root).is_dir():
            raise DataError(f"data root {root} does not exist")
        dest = out or (default_lm_dir() if default else get_settings().model_dir("core", name))
        metrics = train_lm(dest, cfg, data_root=root, progress=True)
        metrics.pop("config", None)
        typer.echo(f"saved to {dest}", err=True)
        sys.stdout.write(json.dumps({"out": str(dest), **metrics}) + "\n")

    @app.command("train-bench")
    def train_bench(json_out: Annotated[bool, typer.Option("--json")] = False, steps: int = 6,
                    batch_size: int = 8, seq_len: int = 256) -> None:
        """Training tokens/s and peak memory with vs without gradient checkpointing (default LM shape,
        random token batches; each setting in its own subprocess so peak RSS is comparable)."""
        from core.train.bench import run_checkpointing_bench

        sys.stdout.write(json.dumps(run_checkpointing_bench(steps=steps, batch_size=batch_size,
                                                            seq_len=seq_len)) + "\n")

    @app.command("amp-bench")
    def amp_bench(json_out: Annotated[bool, typer.Option("--json")] = False,
                  device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
                  model: Annotated[str, typer.Option(help="small (~8M) or 100m (~108M)")] = "small",
                  modes: Annotated[str, typer.Option(help="comma-separated: fp32,bf16,fp16")] = "fp32,bf16,fp16",
                  steps: int = 10, batch_size: int = 8, seq_len: int = 256, rounds: int = 3) -> None:
        """Training tokens/s under fp32 / bf16 / fp16+GradScaler side by side on one device, and what
        ``amp=auto`` picks there (on a CPU without AMX, half precision is expected to be much slower)."""
        from core.train.bench import run_amp_bench

        res = run_amp_bench(device, model, tuple(m.strip() for m in modes.split(",") if m.strip()),
                            steps, batch_size, seq_len, rounds)
        if json_out:
            sys.stdout.write(json.dumps(res) + "\n")
            return
        typer.echo(f"{res['device']} {res.get('gpu', '')} model={res['model']} auto picks {res['auto_picks']}")
        for mode, row in res["modes"].items():
            typer.echo(f"  {mode:5s} {row['tokens_per_s']:>12,.1f} tok/s  x{row['ratio_vs_fp32']}  loss {row['final_loss']}")
