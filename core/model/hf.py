"""Checkpoints in the Hugging Face DeepSeek-V3 layout, and the parity check against transformers.

Layout (what ``DeepseekV3ForCausalLM.save_pretrained`` writes and DeepSeek publishes)::

    <dir>/config.json          ModelArgs fields (HF key names) + rope_parameters
    <dir>/model.safetensors    model.embed_tokens.weight, model.layers.N.self_attn.kv_b_proj.weight,
                               model.layers.N.mlp.experts.E.gate_proj.weight, ..., lm_head.weight
                               MTP module k is stored as model.layers.{num_hidden_layers + k}.* with
                               enorm / hnorm / eh_proj / shared_head.{norm,head} / embed_tokens, as in
                               DeepSeek's release (transformers ignores those keys).
    <dir>/tokenizer.json       beside the weights when a tokenizer is saved (core.model.tokenizer)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.errors import DataError, ModelNotReady
from core.model.deepseek import DeepseekV3, ModelArgs, rope_inv_freq

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _to_hf_name(name: str, n_layers: int) -> str:
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    if not m:
        return name
    k, rest = int(m.group(1)), m.group(2)
    rest = rest[len("block."):] if rest.startswith("block.") else rest
    return f"model.layers.{n_layers + k}.{rest}"


def _from_hf_name(name: str, n_layers: int, n_mtp: int) -> str | None:
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if not m or int(m.group(1)) < n_layers:
        return name
    k, rest = int(m.group(1)) - n_layers, m.group(2)
    if k >= n_mtp:
        return None
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None  # shared with the main model
    if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head"):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def hf_config(args: ModelArgs) -> dict[str, Any]:
    d = args.to_dict()
    d["rope_parameters"] = args.rope
    d["rope_scaling"] = None if args.rope["rope_type"] == "default" else {
        **{k: v for k, v in args.rope.items() if k not in ("rope_type", "rope_theta")}, "type": args.rope["rope_type"]}
    d["torch_dtype"] = None
    return d


def save_pretrained(model: DeepseekV3, path: str | Path, tokenizer: Any | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) in the HF DeepSeek-V3 layout."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    L = model.args.num_hidden_layers
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if model.args.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[_to_hf_name(name, L)] = t.detach().to("cpu").contiguous()
    for k in range(len(model.mtp)):  # DeepSeek's release stores the shared tensors in each MTP layer
        tensors[f"model.layers.{L + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().cpu().clone()
        tensors[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight.detach().cpu().clone()
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(hf_config(model.args), indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def load_pretrained(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """Load a HF-layout DeepSeek-V3 checkpoint (ours or transformers'). Raises ModelNotReady when
    absent and DataError when the files are corrupt or do not match the config."""
    d = Path(path)
    if not (d / CONFIG).exists():
        raise ModelNotReady(f"no model at {d} (missing {CONFIG}); train one first")
    try:
        args = ModelArgs.from_json(d / CONFIG)
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"{d / CONFIG} is not a valid DeepSeek-V3 config: {e}") from e
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelNotReady(f"no *.safetensors weights in {d}")
    state: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            state.update(load_file(str(f)))
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read weights in {d}: {e}") from e
    with torch.device("meta"):
        model = DeepseekV3(args)
    L, n_mtp = args.num_hidden_layers, args.num_nextn_predict_layers
    mapped = {}
    for k, v in state.items():
        name = _from_hf_name(k, L, n_mtp)
        if name is not None:
            mapped[name] = v
    expected = set(model.state_dict())
    if args.tie_word_embeddings:
        mapped.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(mapped), set(mapped) - expected
    if missing or unexpected:
        raise DataError(f"weights in {d} do not match config.json: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(mapped, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers were created on the meta device: rebuild them for real.
    for g in model.gates():
        g.load = torch.zeros(g.n_experts)
    model.inv_freq = rope_inv_freq(args)[0]
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise DataError(f"weights {still_meta[:5]} were not loaded from {d}")
    return model.to(device=device, dtype=dtype).eval()


def to_transformers(model: DeepseekV3, tmp_dir: str | Path, attn_implementation: str = "eager") -> Any:
    """The same weights in transformers' ``DeepseekV3ForCausalLM`` (via a saved checkpoint)."""
    import transformers
    from transformers import DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    save_pretrained(model, tmp_dir)
    ref = DeepseekV3ForCausalLM.from_pretrained(str(tmp_dir), dtype=torch.float32, attn_implementation=attn_implementation)
    return ref.eval()
