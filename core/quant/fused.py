"""A quantized gated MLP whose gate and up projections run as one kernel call at decode.

``silu(gate(x)) * up(x)`` with both projections quantized the same way (int8, or int4 with one group
size) is one call of the integer-dot kernels (``kernels.bind_gate_up``): the activation row is quantized
once, both weight matrices are read in the same pass over output rows, and silu and the product are
applied in C, so the two Linear calls, their two output tensors, the silu and the multiply (four
dispatched ops per MLP, ~16 MLPs per decoded token of the bench's speed model) become one call.
Everything else (many rows, autograd, hooks on a projection, differing formats, AWQ input scales) runs
the plain ``MLP.forward``: the same maths.

:func:`fuse_gated_mlps` turns every plain ``MLP`` whose gate and up projections are
:class:`~core.quant.linear.QuantLinear` into :class:`QuantGatedMLP` (the same module, parameters and
state dict; only its class changes), after quantization and when a quantized checkpoint is loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from core.model.deepseek import MLP, linear
from core.quant.kernels import bind_gate_up
from core.quant.linear import QuantLinear

_hooks = nn.modules.module


class QuantGatedMLP(MLP):
    """``MLP`` with a fused gate+up decode path (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            mods = self._modules
            g, u = mods["gate_proj"], mods["up_proj"]
            fast = self.__dict__.get("_gate_up")
            if fast is None or fast[0] is not g or fast[1] is not u or not _same_buffers(fast[2], g, u):
                fast = self._bind(g, u)
            if (fast[3] is not None and not g._forward_hooks and not g._forward_pre_hooks and not u._forward_hooks
                    and not u._forward_pre_hooks and not _hooks._global_forward_hooks
                    and not _hooks._global_forward_pre_hooks):
                h = fast[3](x)
                if h is not None:
                    return linear(mods["down_proj"], h)
        return super().forward(x)

    def _bind(self, g: nn.Module, u: nn.Module) -> tuple:
        run = None
        if (type(g) is QuantLinear and type(u) is QuantLinear and g.spec == u.spec and g.input_scale is None
                and u.input_scale is None):
            gb, ub = g._buffers, u._buffers
            run = bind_gate_up(g.spec.bits, (gb["qweight"], gb["scale"], gb.get("minv"), gb["bias"]),
                               (ub["qweight"], ub["scale"], ub.get("minv"), ub["bias"]), g.spec.group_size)
        bufs = (*g._buffers.values(), *u._buffers.values())  # kept alive: their ids stay unique while cached
        fast = (g, u, _buffers_key(g, u), run, bufs)
        self.__dict__["_gate_up"] = fast
        return fast

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_gate_up", None)  # raw pointers and a ctypes function: never pickled or copied
        return state


_NAMES = ("qweight", "scale", "minv", "bias", "input_scale")


def _buffers_key(g: nn.Module, u: nn.Module) -> tuple:
    """ids of the buffers the bound call reads, and the weights' addresses: rebound when one is replaced
    or moved. (The cache entry holds the modules, whose buffers it binds, alive while it is current; a
    replaced buffer changes its id in the module's dict.)"""
    gb, ub = g._buffers, u._buffers
    return (*map(id, map(gb.get, _NAMES)), *map(id, map(ub.get, _NAMES)), gb["qweight"].data_ptr(),
            ub["qweight"].data_ptr())


def _same_buffers(key: tuple, g: nn.Module, u: nn.Module) -> bool:
    return key == _buffers_key(g, u)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Make every plain ``MLP`` of ``model`` with quantized gate and up projections a
    :class:`QuantGatedMLP` (in place; returns how many)."""
    n = 0
    for m in model.modules():
        if type(m) is MLP and isinstance(m.gate_proj, QuantLinear) and isinstance(m.up_proj, QuantLinear):
            m.__class__ = QuantGatedMLP
            n += 1
    return n
