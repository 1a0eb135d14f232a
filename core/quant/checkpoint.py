"""Quantized checkpoints: safetensors + a JSON manifest, loadable without the fp32 weights.

Layout of a quantized model directory::

    <dir>/config.json           the float model's config (core.model.hf layout), unchanged
    <dir>/quant_manifest.json   format version, bits mode, method, group size, scale dtype, per-layer
                                specs (bits, AWQ/GPTQ, output error), calibration file + sha256, bytes
    <dir>/model.safetensors     packed weights: <layer>.qweight / .scale / .minv / .input_scale / .bias
                                for quantized Linears, the float tensors for everything else
    <dir>/tokenizer.json ...    copied from the source model when present

Loading builds the model skeleton on the ``meta`` device, swaps the planned Linears for empty
``QuantLinear`` shells of the recorded shapes, then assigns the stored tensors: fp32 weights of
quantized layers are never materialised. Any mismatch (wrong manifest version, missing or extra
tensors, wrong shapes) is a ``DataError`` naming the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import DataError, ModelNotReady
from core.quant.formats import QuantSpec
from core.quant.linear import QuantEmbedding, QuantLinear, set_submodule

MANIFEST = "quant_manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "verticals-quant"
FORMAT_VERSION = 1
_TOKENIZER_GLOBS = ("tokenizer*.json", "tokenizer*.model", "special_tokens_map.json", "vocab*")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_quantized(model: nn.Module, out_dir: str | Path, report: dict[str, Any], *,
                   config: dict[str, Any] | None = None, source_dir: str | Path | None = None,
                   calibration: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (already quantized in place) with its manifest. ``report`` is
    ``QuantReport.to_dict()``; ``config`` the float model's config dict (None for plain module trees)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen and t.numel():
            tied[name] = seen[key]  # tied weights are stored once
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS)
    if config is not None:
        (out / CONFIG).write_text(json.dumps(config, indent=2))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime()),
        "model_type": (config or {}).get("model_type"), "source_model": str(source_dir) if source_dir else None,
        "calibration": calibration, "tied": tied, "payload_bytes": sum(t.numel() * t.element_size()
                                                                       for t in tensors.values()),
        **report, **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=float))
    if source_dir is not None:
        for pat in _TOKENIZER_GLOBS:
            for f in Path(source_dir).glob(pat):
                shutil.copy2(f, out / f.name)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    if not (d / MANIFEST).exists():
        if (d / CONFIG).exists():
            raise DataError(f"{d} is a float checkpoint, not a quantized one (no {MANIFEST}); "
                            "run `verticals core quantize` first")
        raise ModelNotReady(f"no quantized model at {d} (missing {MANIFEST})")
    try:
        m = json.loads((d / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{d / MANIFEST} is not valid JSON: {e}") from e
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{d} holds an incompatible quantized checkpoint (format {m.get('format')!r} "
                        f"v{m.get('format_version')}; this runtime reads {FORMAT} v{FORMAT_VERSION})")
    if not isinstance(m.get("plan"), dict):
        raise DataError(f"{d / MANIFEST} has no per-layer plan")
    return m


def _deepseek_skeleton(d: Path) -> nn.Module:
    from core.model.deepseek import DeepseekV3, ModelArgs

    try:
        args = ModelArgs.from_json(d / CONFIG)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise DataError(f"{d / CONFIG} is missing or not a valid DeepSeek-V3 config: {e}") from e
    return DeepseekV3(args)


def apply_manifest(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Swap planned Linears / Embeddings for empty quantized shells (on the current default device)."""
    for name, p in manifest["plan"].items():
        if p["bits"] == 16:
            continue
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise DataError(f"the quantized checkpoint names layer {name!r}, which the model does not have") from e
        spec = QuantSpec(bits=p["bits"], group_size=p.get("group_size") or manifest.get("group_size", 64),
                         scale_dtype=manifest.get("scale_dtype", "fp16"))
        shell = QuantLinear(p["in_features"], p["out_features"], spec, bias=p["bias"], input_scale=p["awq"])
        if isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) != (p["in_features"],
                                                                                 p["out_features"]):
            raise DataError(f"layer {name}: checkpoint shape {p['out_features']}x{p['in_features']} does not "
                            f"match the model's {lin.out_features}x{lin.in_features}")
        set_submodule(model, name, shell)
    for name in manifest.get("embeddings_int8", []):
        emb = model.get_submodule(name)
        set_submodule(model, name, QuantEmbedding(emb.num_embeddings, emb.embedding_dim))


def load_quantized(path: str | Path, skeleton: Callable[[Path], nn.Module] | None = None) -> nn.Module:
    """Load a quantized checkpoint. ``skeleton(dir)`` builds the float architecture (default: the core
    DeepSeek-V3 from config.json); it is built on the meta device, so no fp32 weights are allocated."""
    d = Path(path)
    manifest = read_manifest(d)
    if not (d / WEIGHTS).exists():
        raise DataError(f"{d} has a manifest but no {WEIGHTS}")
    build = skeleton or _deepseek_skeleton
    with torch.device("meta"):
        model = build(d)
        apply_manifest(model, manifest)
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read {d / WEIGHTS}: {e}") from e
    tied = manifest.get("tied", {})
    expected = set(model.state_dict())
    missing = expected - set(state) - set(tied)
    unexpected = set(state) - expected
    if missing or unexpected:
        raise DataError(f"{d} does not match its manifest/config: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    cur = model.state_dict()
    for k, v in state.items():
        if tuple(cur[k].shape) != tuple(v.shape) or cur[k].dtype != v.dtype:
            raise DataError(f"{d}: tensor {k} is {tuple(v.shape)} {v.dtype}, the model expects "
                            f"{tuple(cur[k].shape)} {cur[k].dtype}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise DataError(f"{d}: {e}") from e
    for name, src in tied.items():
        mod_name, _, attr = name.rpartition(".")
        src_mod, _, src_attr = src.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(src_mod), src_attr))
    _rebuild_nonpersistent(model)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise DataError(f"tensors {still_meta[:5]} were not found in {d}")
    from core.quant.fused import fuse_gated_mlps

    fuse_gated_mlps(model)
    return model.eval()


def _rebuild_nonpersistent(model: nn.Module) -> None:
    """Buffers that are not saved (router load counters, RoPE frequencies) were created on meta."""
    try:
        from core.model.deepseek import DeepseekV3, rope_inv_freq
    except ImportError:  # pragma: no cover - core.model is part of the repo
        return
    if isinstance(model, DeepseekV3):
        for g in model.gates():
            g.load = torch.zeros(g.n_experts)
        model.inv_freq = rope_inv_freq(model.args)[0]
