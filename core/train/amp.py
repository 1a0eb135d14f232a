"""Mixed-precision choice: which autocast dtype (and whether to scale the loss) for a device.

- CUDA: bf16 when the GPU supports it (no loss scaling needed: bf16 has fp32's exponent range),
  otherwise fp16 autocast + ``torch.amp.GradScaler`` (dynamic loss scaling against fp16 underflow).
- CPU: bf16 only where the CPU has *fast* bf16 matrix units (Intel AMX: ``amx_bf16``). Everywhere
  else (including CPUs that only have the ``avx512_bf16`` dot-product instruction, like this project's
  2-core AMD VM) autocast's per-op casts cost more than they save, so ``auto`` falls back to fp32.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

import torch

from core.errors import ConfigError

log = logging.getLogger(__name__)

AmpMode = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None, capability: str | None = None) -> bool:
    """True when the CPU has AMX bf16 tiles (the only CPU path where bf16 training beats fp32)."""
    flags = cpu_flags() if flags is None else flags
    if capability is None:
        try:
            capability = torch.backends.cpu.get_cpu_capability()
        except Exception:  # older torch
            capability = ""
    return "amx_bf16" in flags or "AMX" in capability.upper()


def choose_amp(device: str | torch.device, requested: AmpMode = "auto", *,
               flags: frozenset[str] | None = None) -> tuple[torch.dtype, bool]:
    """Return ``(compute dtype, use_grad_scaler)`` for training on ``device``.

    ``requested`` other than "auto" is honoured (fp16 always gets a GradScaler); "auto" picks the fastest
    safe choice as described in the module docstring. ``flags`` overrides /proc/cpuinfo (for tests).
    """
    if requested not in ("auto", *_DTYPES):
        raise ConfigError(f"amp={requested!r}; choose auto, fp32, fp16 or bf16")
    dev = torch.device(device)
    if requested != "auto":
        dtype = _DTYPES[requested]
        if dev.type == "cpu" and dtype != torch.float32 and not cpu_has_fast_bf16(flags):
            log.warning("amp=%s on a CPU without AMX: expect it to be much slower than fp32", requested)
        return dtype, dtype == torch.float16
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return torch.float16, True
    if dev.type == "cpu" and cpu_has_fast_bf16(flags):
        return torch.bfloat16, False
    return torch.float32, False
