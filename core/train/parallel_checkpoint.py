"""Distributed checkpoints (``torch.distributed.checkpoint``) that reload at a different world size.

Each rank writes only the shards it owns (FSDP shards, tensor-parallel slices, its experts); the
checkpoint's metadata records every tensor's global shape, so a later run with another mesh (2 GPUs
-> 1 CPU, dp=4 -> dp=2 x tp=2, ...) reads back exactly the pieces it needs. State dicts go through
``torch.distributed.checkpoint.state_dict`` so that DDP's ``module.`` prefix and FSDP/DTensor sharding
are normalised to the plain model's keys.

Layout of a checkpoint directory::

    <dir>/.metadata          global shapes and where each shard lives (written by rank 0)
    <dir>/__<rank>_0.distcp  the bytes each rank owns
    <dir>/train_state.json   step, config and anything small the caller adds (rank 0)

``export_full_state_dict`` turns such a directory into one plain ``torch.save`` file (for inference,
``core.model`` loading or Hugging Face export) without any process group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from core.errors import DataError

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
_METADATA = ".metadata"


def _dcp() -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, train_state: dict[str, Any] | None = None) -> Path:
    """Save model (and optimizer) shards from every rank into directory ``path``; collective call.

    ``train_state`` (JSON-serialisable: step, config, losses) is written by rank 0 next to the shards.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        model_sd, _ = get_state_dict(model, [])
        state = {"model": model_sd}
    _dcp().save(state, checkpoint_id=str(out))
    if not _is_dist() or dist.get_rank() == 0:
        (out / TRAIN_STATE).write_text(json.dumps(train_state or {}, indent=2, default=str), encoding="utf-8")
    if _is_dist():
        dist.barrier()
    return out


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into an already parallelized ``model``
    (and ``optimizer``), whatever mesh it was saved with; collective call. Returns the train state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    src = Path(path)
    if not (src / _METADATA).is_file():
        raise DataError(f"{src} is not a distributed checkpoint (no {_METADATA}); "
                        "save one with core.train.parallel_checkpoint.save_checkpoint")
    options = StateDictOptions(strict=strict)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        model_sd, _ = get_state_dict(model, [])
        state = {"model": model_sd}
    _check_keys(src, state, strict=strict)
    try:
        _dcp().load(state, checkpoint_id=str(src))
    except Exception as e:  # CheckpointException wraps per-rank failures (shape mismatch, missing keys)
        raise DataError(f"cannot load distributed checkpoint {src}: {str(e).splitlines()[0][:300]}") from e
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={}, options=options)
    return read_train_state(src)


def read_train_state(path: str | Path) -> dict[str, Any]:
    """The small JSON written beside the shards ({} if absent)."""
    p = Path(path) / TRAIN_STATE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p} is corrupt: {e}") from None


def _check_keys(src: Path, state: dict[str, Any], *, strict: bool) -> None:
    """Fail with a readable message when the model's tensors are not in the checkpoint (wrong config)."""
    try:
        meta = _dcp().FileSystemReader(str(src)).read_metadata()
    except Exception as e:
        raise DataError(f"cannot read checkpoint metadata in {src}: {e}") from None
    stored = set(meta.state_dict_metadata)
    wanted = {f"model.{k}" for k in state["model"]}
    missing = sorted(wanted - stored)
    if missing and strict:
        raise DataError(f"checkpoint {src} lacks {len(missing)} model tensor(s) (first: {missing[:3]}); "
                        "was it saved from a model with another config?")
    for key, value in state["model"].items():
        md = meta.state_dict_metadata.get(f"model.{key}")
        if md is None or not hasattr(md, "size") or not isinstance(value, torch.Tensor):
            continue
        if tuple(md.size) != tuple(value.shape):
            raise DataError(f"checkpoint {src}: tensor {key} has shape {tuple(md.size)} but the model expects "
                            f"{tuple(value.shape)}; the model config differs from the one saved")
    if "optim" in state and not any(k.startswith("optim.") for k in stored):
        raise DataError(f"checkpoint {src} has no optimizer state; load it without an optimizer")


def export_full_state_dict(path: str | Path, out_file: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Gather a distributed checkpoint into one plain state dict (no process group needed).

    Returns the model tensors (keys as in the unwrapped model); also ``torch.save``s them to
    ``out_file`` when given.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src = Path(path)
    if not (src / _METADATA).is_file():
        raise DataError(f"{src} is not a distributed checkpoint (no {_METADATA})")
    tmp = Path(out_file) if out_file is not None else src / "_full.pt"
    dcp_to_torch_save(str(src), str(tmp))
    full = torch.load(tmp, map_location="cpu", weights_only=True)
    if out_file is None:
        tmp.unlink(missing_ok=True)
    model_sd = full.get("model", {})
    if out_file is not None:
        torch.save(model_sd, tmp)
    return model_sd
