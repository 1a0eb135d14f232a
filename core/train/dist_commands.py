"""``verticals core dist-*``: distributed-training commands (mounted through ``register(app)``).

- ``dist-train --config cfg.yaml``: the training entry point on one process (for N processes or several
  machines run the same module under torchrun: ``torchrun --nproc_per_node N -m core.train.launch ...``).
- ``dist-comm-volume``: bytes each rank sends per optimizer step for a set of strategies and a model
  size, from the mesh and the tensor shapes (:mod:`core.train.parallel_comm`). Prints one JSON object.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

# A ~108M-parameter DeepSeek-V3 (MLA with q/kv LoRA, 8 routed experts top-2 + 1 shared, 1 dense layer, MTP).
MODEL_SIZES: dict[str, dict[str, object]] = {
    "small": {},  # ModelArgs defaults: hidden 256, 4 layers, 8 experts (~7.9M)
    "100m": {"vocab_size": 16384, "hidden_size": 768, "intermediate_size": 2048, "moe_intermediate_size": 384,
             "num_hidden_layers": 8, "num_attention_heads": 8, "n_routed_experts": 8, "num_experts_per_tok": 2,
             "kv_lora_rank": 256, "q_lora_rank": 384, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
             "v_head_dim": 64, "num_nextn_predict_layers": 1},
}

# Strategies compared on 8 ranks (one 8-GPU machine).
DEFAULT_LAYOUTS: tuple[dict[str, object], ...] = (
    {"strategy": "ddp"},
    {"strategy": "fsdp"},
    {"strategy": "3d_parallel", "tensor_parallel_size": 2},
    {"strategy": "3d_parallel", "tensor_parallel_size": 4},
    {"strategy": "3d_parallel", "expert_parallel_size": 4},
    {"strategy": "3d_parallel", "pipeline_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_microbatches": 8},
)


def register(app: typer.Typer) -> None:
    @app.command("dist-train")
    def dist_train(config: Annotated[str, typer.Option(help="training config (YAML or JSON)")]) -> None:
        """Train with the distributed entry point (one process; use torchrun for more)."""
        from core.train.distributed import load_config
        from core.train.launch import run

        typer.echo(json.dumps(run(load_config(config)), default=str))

    @app.command("dist-comm-volume")
    def dist_comm_volume(
        model: Annotated[str, typer.Option(help=f"model size: {', '.join(MODEL_SIZES)}")] = "small",
        world_size: Annotated[int, typer.Option(help="number of ranks")] = 8,
        micro_batch: Annotated[int, typer.Option(help="sequences per micro-batch per data rank")] = 4,
        seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 1024,
        grad_accum: Annotated[int, typer.Option(help="micro-batches per step (non-pipeline)")] = 1,
        device: Annotated[str, typer.Option(help="cuda (bf16 compute) or cpu (fp32)")] = "cuda",
        layouts: Annotated[str | None, typer.Option(help="JSON list of distributed sections")] = None,
    ) -> None:
        """Bytes each rank sends per optimizer step, per strategy (analytic, from mesh and shapes)."""
        from core.errors import ConfigError
        from core.model.deepseek import ModelArgs
        from core.train.distributed import DistributedConfig
        from core.train.parallel_comm import ModelShapes, comm_volume

        if model not in MODEL_SIZES:
            raise ConfigError(f"--model must be one of {list(MODEL_SIZES)}")
        try:
            chosen = json.loads(layouts) if layouts else list(DEFAULT_LAYOUTS)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--layouts is not valid JSON: {e}") from None
        shapes = ModelShapes.from_args(ModelArgs(**MODEL_SIZES[model]))
        rows = []
        for layout in chosen:
            cfg = DistributedConfig.from_dict(layout)
            rows.append(comm_volume(shapes, cfg, world_size=world_size, micro_batch=micro_batch, seq_len=seq_len,
                                    grad_accum_steps=grad_accum, device=device))
        for r in rows:
            mesh = " ".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "single"
            typer.echo(f"{r['strategy']:<12} {mesh:<14} {r['total_bytes'] / 2**20:10.1f} MiB/step/rank "
                       f"{r['bytes_per_token']:10.0f} B/token/rank  {r['bytes']}", err=True)
        typer.echo(json.dumps({"model": model, "params": shapes.params, "expert_params": shapes.expert_params,
                               "world_size": world_size, "micro_batch": micro_batch, "seq_len": seq_len,
                               "device": device, "results": rows}))


if __name__ == "__main__":  # python -m core.train.dist_commands dist-comm-volume ... (before the CLI mounts it)
    _app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(_app)
    _app()
