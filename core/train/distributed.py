"""Distributed training on ``torch.distributed``: config, process group, device mesh, DDP and FSDP2.

One entry point runs unchanged on one process, under ``torchrun --nproc_per_node N`` and on several
machines (``torchrun --nnodes M --rdzv-endpoint host:port``). The strategy comes from the ``distributed``
section of the training config, as the product documents describe it::

    distributed:
      strategy: 3d_parallel          # ddp | fsdp | 3d_parallel
      data_parallel_size: 2          # omitted -> world_size / (tp * pp * ep)
      tensor_parallel_size: 2
      pipeline_parallel_size: 1
      expert_parallel_size: 1

Mesh layout (outermost first): ``("pp", "dp", "ep", "tp")``. ``tp`` is innermost so that tensor-parallel
peers sit on one machine (NVLink); ``pp`` is outermost because it sends the least. Ranks in ``dp`` and
``ep`` read different data (``ep`` borrows data-parallel ranks, as in DeepSeek-V3 and torchtitan), ranks
in ``tp`` and ``pp`` read the same micro-batches.

Data contract: :func:`init_distributed` -> :class:`DistContext` (rank, world, device, mesh);
:func:`parallelize` (model, ctx) -> the wrapped model; everything else (optimizer, loss, hooks) is the
single-process trainer's, unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp", "3d_parallel"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
MESH_DIMS: tuple[str, ...] = ("pp", "dp", "ep", "tp")
_STRATEGIES: tuple[str, ...] = ("ddp", "fsdp", "3d_parallel")
_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b")


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedConfig:
    """The ``distributed`` section of a training config. Every key is a field (loaded with ``from_dict``).

    ``data_parallel_size=None`` means "whatever is left": ``world_size / (tp * pp * ep)``.
    """

    strategy: Strategy = "ddp"
    data_parallel_size: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    mixed_precision: Precision = "auto"
    grad_accum_steps: int = 1
    pipeline_schedule: PipelineSchedule = "1f1b"
    pipeline_microbatches: int | None = None  # default: 2 * pipeline_parallel_size
    pipeline_stages_per_rank: int = 1  # >1 only with interleaved_1f1b (virtual stages)
    reshard_after_forward: bool = True  # FSDP2: ZeRO-3 (True) or ZeRO-2-like (False)
    timeout_s: int = 1800

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DistributedConfig:
        """Build from a mapping (the YAML/JSON ``distributed`` section); unknown keys are an error."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"distributed: unknown key(s) {unknown}; known keys are {sorted(known)}")
        cfg = cls(**data)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Validate what can be checked without knowing the world size."""
        if self.strategy not in _STRATEGIES:
            raise ConfigError(f"distributed.strategy must be one of {list(_STRATEGIES)}, got {self.strategy!r}")
        if self.mixed_precision not in _PRECISIONS:
            raise ConfigError(f"distributed.mixed_precision must be one of {list(_PRECISIONS)}, "
                              f"got {self.mixed_precision!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"distributed.backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.pipeline_schedule not in _SCHEDULES:
            raise ConfigError(f"distributed.pipeline_schedule must be one of {list(_SCHEDULES)}, "
                              f"got {self.pipeline_schedule!r}")
        sizes = {"tensor_parallel_size": self.tensor_parallel_size,
                 "pipeline_parallel_size": self.pipeline_parallel_size,
                 "expert_parallel_size": self.expert_parallel_size,
                 "grad_accum_steps": self.grad_accum_steps,
                 "pipeline_stages_per_rank": self.pipeline_stages_per_rank,
                 "timeout_s": self.timeout_s}
        if self.data_parallel_size is not None:
            sizes["data_parallel_size"] = self.data_parallel_size
        if self.pipeline_microbatches is not None:
            sizes["pipeline_microbatches"] = self.pipeline_microbatches
        for name, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"distributed.{name} must be a positive integer, got {v!r}")
        if self.strategy in ("ddp", "fsdp"):
            extra = {k: v for k, v in (("tensor_parallel_size", self.tensor_parallel_size),
                                        ("pipeline_parallel_size", self.pipeline_parallel_size),
                                        ("expert_parallel_size", self.expert_parallel_size)) if v != 1}
            if extra:
                raise ConfigError(f"distributed.strategy={self.strategy} is pure data parallel, but {extra} "
                                  "is set; use strategy: 3d_parallel for tensor/pipeline/expert parallel")
        if self.pipeline_schedule != "interleaved_1f1b" and self.pipeline_stages_per_rank != 1:
            raise ConfigError("distributed.pipeline_stages_per_rank > 1 needs pipeline_schedule: interleaved_1f1b")
        if self.pipeline_schedule == "interleaved_1f1b" and self.pipeline_stages_per_rank < 2 \
                and self.pipeline_parallel_size > 1:
            raise ConfigError("distributed.pipeline_schedule: interleaved_1f1b needs pipeline_stages_per_rank >= 2")

    def resolve(self, world_size: int) -> DistributedConfig:
        """Fill ``data_parallel_size`` and check that the mesh covers exactly ``world_size`` ranks."""
        self.check()
        other = self.tensor_parallel_size * self.pipeline_parallel_size * self.expert_parallel_size
        dp = self.data_parallel_size
        if dp is None:
            if world_size % other:
                raise ConfigError(
                    f"distributed: world size {world_size} is not divisible by tensor x pipeline x expert "
                    f"parallel = {self.tensor_parallel_size} x {self.pipeline_parallel_size} x "
                    f"{self.expert_parallel_size} = {other}")
            dp = world_size // other
        if dp * other != world_size:
            raise ConfigError(
                f"distributed: data x tensor x pipeline x expert parallel sizes = {dp} x "
                f"{self.tensor_parallel_size} x {self.pipeline_parallel_size} x {self.expert_parallel_size} = "
                f"{dp * other}, but the world size is {world_size} (torchrun --nproc_per_node x --nnodes); "
                "make the product equal the number of processes or leave data_parallel_size out")
        return dataclasses.replace(self, data_parallel_size=dp)

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """Sizes along ``MESH_DIMS`` (pp, dp, ep, tp); call on a resolved config."""
        if self.data_parallel_size is None:
            raise ConfigError("distributed: call resolve(world_size) before asking for the mesh shape")
        return (self.pipeline_parallel_size, self.data_parallel_size, self.expert_parallel_size,
                self.tensor_parallel_size)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a training config from YAML (``.yaml``/``.yml``) or JSON; returns the whole mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"config {p} is not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                          f"{str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a mapping at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------
# Process group and mesh
# ---------------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    """Where this process sits: rank, world, device, and the mesh (None when running alone)."""

    config: DistributedConfig
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: DeviceMesh | None = None
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def coord(self, dim: str) -> int:
        """This rank's index along one mesh dimension (0 when alone)."""
        if self.mesh is None:
            return 0
        return int(self.mesh[dim].get_local_rank())

    def size(self, dim: str) -> int:
        return dict(zip(MESH_DIMS, self.config.mesh_shape, strict=True))[dim]

    @property
    def data_rank(self) -> int:
        """Which data shard this rank reads: its position in the flattened (dp, ep) grid."""
        return self.coord("dp") * self.size("ep") + self.coord("ep")

    @property
    def data_world_size(self) -> int:
        """How many different data shards are read per step (dp * ep)."""
        return self.size("dp") * self.size("ep")

    def submesh(self, *dims: str) -> DeviceMesh | None:
        """A sub-mesh over ``dims`` (several dims are flattened into one); None when alone."""
        if self.mesh is None:
            return None
        if len(dims) == 1:
            return self.mesh[dims[0]]
        name = "_".join(dims)
        try:
            return self.mesh[name]
        except (KeyError, RuntimeError):
            return self.mesh[dims]._flatten(name)

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from None


def pick_backend(requested: str = "auto") -> str:
    """NCCL when CUDA is usable, gloo otherwise (CPU). An explicit request is honoured if possible."""
    if requested == "nccl":
        if not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise ConfigError("distributed.backend: nccl needs CUDA GPUs and a CUDA build of torch; use gloo on CPU")
        return "nccl"
    if requested == "gloo":
        return "gloo"
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(config: DistributedConfig | Mapping[str, Any] | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
    and build the device mesh. Without those variables this is one process and no group is created.

    The device is ``cuda:LOCAL_RANK`` under NCCL, the CPU under gloo.
    """
    cfg = config if isinstance(config, DistributedConfig) else DistributedConfig.from_dict(config)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    cfg = cfg.resolve(world)
    backend = pick_backend(cfg.backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    ctx = DistContext(config=cfg, rank=rank, world_size=world, local_rank=local_rank, device=device)
    if world == 1:
        return ctx
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed support")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start with torchrun "
                              "(see docs/DISTRIBUTED.md)")
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=cfg.timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        ctx.owns_process_group = True
    ctx.backend = dist.get_backend()
    ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    ctx.mesh = build_mesh(cfg, device.type)
    log.info("rank %d/%d on %s, mesh %s", ctx.rank, ctx.world_size, device, dict(zip(MESH_DIMS, cfg.mesh_shape,
                                                                                     strict=True)))
    return ctx


def build_mesh(cfg: DistributedConfig, device_type: str) -> DeviceMesh:
    """A 4-D mesh ``(pp, dp, ep, tp)`` over the default process group (size-1 dims are kept: uniform code)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, cfg.mesh_shape, mesh_dim_names=MESH_DIMS)


# ---------------------------------------------------------------------------------------------------
# Data parallel wrappers
# ---------------------------------------------------------------------------------------------------
def resolve_precision(requested: Precision, device: torch.device) -> torch.dtype:
    """Compute dtype for parameters in forward/backward: fp32 on CPU (bf16 is ~100x slower there),
    bf16 on GPUs that support it, else fp16."""
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units FSDP shards one by one: DeepseekV3's decoder layers and MTP blocks
    (``model.model.layers``, ``model.mtp[k].block``), or a generic ``model.layers``; empty if none."""
    found: list[nn.Module] = []
    for owner, name in ((getattr(model, "model", None), "layers"), (model, "layers")):
        layers = getattr(owner, name, None) if owner is not None else None
        if isinstance(layers, nn.ModuleDict):
            found.extend(layers.values())
        elif isinstance(layers, nn.ModuleList):
            found.extend(layers)
    # MTP: only the inner block is a unit; its norms/projection are used outside the block's forward.
    found.extend(mod.block for mod in getattr(model, "mtp", []) if hasattr(mod, "block"))
    return found


def has_moe(model: nn.Module) -> bool:
    return any(hasattr(m, "experts") and hasattr(m, "gate") for m in model.modules())


class LossForward(nn.Module):
    """Makes ``model.compute_loss(**batch)["loss"]`` the forward, so DDP's hooks see the whole training
    computation (MTP heads included). State-dict keys of the inner model are under ``model.``;
    :func:`unwrap` returns the inner model for checkpoints."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.compute_loss(**batch)["loss"]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / :class:`LossForward` wrappers (FSDP2 and TP work in place)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__.endswith(
                "DataParallel"):
            model = model.module
        elif isinstance(model, LossForward):
            model = model.model
        else:
            return model


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel`` over the data-parallel group (gradients all-reduced in buckets).

    MoE models set ``find_unused_parameters``: an expert that gets no token on one rank has no gradient
    there, and DDP then contributes zeros for it instead of waiting forever."""
    if not ctx.is_distributed or ctx.size("dp") == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    model.to(ctx.device)
    group = ctx.submesh("dp").get_group()
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, process_group=group, find_unused_parameters=has_moe(model))


def _touch_all_experts(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a MoE layer: add 0 x every expert weight, so each expert has a gradient on every
    rank (FSDP2 reduce-scatters only parameters that have one; ranks must agree)."""
    # One element per weight is enough for autograd to give the whole weight a (zero) gradient; it also
    # cannot overflow in half precision the way a sum over all weights could.
    from torch.distributed.tensor import DTensor

    zero = sum((p.to_local() if isinstance(p, DTensor) else p).reshape(-1)[:1].sum()
               for p in module.experts.parameters()) * 0.0  # TP-sharded experts: this rank's slice
    return output + zero.to(output.dtype)


def wrap_fsdp(model: nn.Module, ctx: DistContext, mesh: DeviceMesh | None = None,
              *, expert_mesh: DeviceMesh | None = None, expert_divide_factor: float | None = None) -> nn.Module:
    """FSDP2 (``fully_shard``): each block is its own unit (all-gathered just before use), then the root.

    Mixed precision: parameters are cast to ``config.mixed_precision`` for compute, gradients are
    reduced in fp32. ``expert_mesh``: experts of expert-parallel MoE layers are sharded over this mesh
    instead (they are already partitioned across ``ep``), their gradients divided by
    ``expert_divide_factor`` (the number of data shards, like every other gradient).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from core.train.parallel_tensor import ExpertParallelMoE

    mesh = mesh if mesh is not None else ctx.submesh("dp")
    if mesh is None:
        return model
    param_dtype = resolve_precision(ctx.config.mixed_precision, ctx.device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw: dict[str, Any] = {"mp_policy": mp, "reshard_after_forward": ctx.config.reshard_after_forward}
    for block in transformer_blocks(model):
        for m in block.modules():
            if isinstance(m, ExpertParallelMoE) and expert_mesh is not None:
                for expert in m.experts.values():
                    fully_shard(expert, mesh=expert_mesh, **kw)
                    if expert_divide_factor is not None:
                        expert.set_gradient_divide_factor(expert_divide_factor)
            elif hasattr(m, "experts") and hasattr(m, "gate") and not isinstance(m, ExpertParallelMoE):
                m.register_forward_hook(_touch_all_experts)
        fully_shard(block, mesh=mesh, **kw)
    # The root unit holds embedding, final norm and head; it stays gathered after forward (used first in backward).
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Skip the gradient reduction for a micro-batch of gradient accumulation (DDP ``no_sync`` or
    FSDP2 ``set_requires_gradient_sync(False)``); the last micro-batch reduces the accumulated sum."""
    if not enabled:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def parallelize(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Apply the configured strategy to ``model`` (same init on every rank) and return the module to
    train: its forward takes a batch dict and returns the scalar loss (:class:`LossForward`), so the
    trainer's ``loss_fn`` is ``lambda m, batch: m(batch)`` under every strategy.

    ``ddp``: DDP over dp. ``fsdp``: FSDP2 over dp. ``3d_parallel``: tensor parallel over tp
    (:mod:`core.train.parallel_tensor`), expert parallel over ep, then FSDP2 over the data ranks.
    Pipeline parallel splits the model first (:mod:`core.train.parallel_pipeline`).
    """
    cfg = ctx.config
    model.to(ctx.device)
    if not ctx.is_distributed:
        return LossForward(model)
    if cfg.strategy == "ddp":
        return wrap_ddp(LossForward(model), ctx)
    if cfg.strategy == "fsdp":
        return LossForward(wrap_fsdp(model, ctx))
    shard_model(model, ctx)
    return LossForward(model)


def shard_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """3-D sharding of one model (or pipeline stage) in place: TP over tp, EP over ep, FSDP2 over data."""
    from core.train import parallel_tensor

    if ctx.size("tp") > 1:
        parallel_tensor.apply_tensor_parallel(model, ctx.submesh("tp"))
    if ctx.size("ep") > 1:
        parallel_tensor.apply_expert_parallel(model, ctx.submesh("ep"))
    if ctx.data_world_size > 1:
        # Dense weights are replicated over dp x ep (both read different data); routed experts only over dp.
        if ctx.size("ep") > 1:
            wrap_fsdp(model, ctx, ctx.submesh("dp", "ep"), expert_mesh=ctx.submesh("dp"),
                      expert_divide_factor=float(ctx.data_world_size))
        else:
            wrap_fsdp(model, ctx, ctx.submesh("dp"))
    return model


def data_group(ctx: DistContext) -> Any:
    """The process group of the ranks that read different data (dp x ep), None when alone."""
    if not ctx.is_distributed:
        return None
    return ctx.submesh("dp", "ep").get_group() if ctx.size("ep") > 1 else ctx.submesh("dp").get_group()


# ---------------------------------------------------------------------------------------------------
# Small collectives the entry point needs
# ---------------------------------------------------------------------------------------------------
def mean_over_data_ranks(value: float, ctx: DistContext) -> float:
    """Average a per-rank scalar (the local loss) over the ranks that read different data."""
    if not ctx.is_distributed or ctx.data_world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, group=data_group(ctx))
    return float(t.item()) / ctx.data_world_size


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Send one picklable object from rank ``src`` to all ranks (e.g. a run id or a resume step)."""
    if not ctx.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
