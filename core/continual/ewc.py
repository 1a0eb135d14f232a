"""Elastic Weight Consolidation as a trainer hook (Kirkpatrick et al. 2017; online: Schwarz et al. 2018).

After each task the hook estimates the diagonal Fisher information ``F`` of the parameters it covers
and remembers their values ``theta*`` (the anchors). While later tasks train it adds

    penalty = lambda / 2 * sum_t sum_i F_t,i * (theta_i - theta*_t,i)^2

to the training objective, so weights that mattered for old tasks stay near their old values: either
as a loss term in ``before_backward`` (``apply="loss"``), or, cheaper and with the same update, as its
exact gradient added to ``.grad`` in ``after_backward`` (``apply="grad"``, the default), or as its
proximal map after each optimizer step (``apply="prox"``: stable under any lambda with SGD).

Modes:
  * ``separate``: one (F_t, theta*_t) pair per past task (the original paper).
  * ``online``: one running Fisher ``F <- decay * F_old + F_new`` and one anchor (the latest weights).

Fisher estimators (``fisher``):
  * ``empirical``: squared gradient of the mini-batch mean loss, averaged over batches. Cheapest; it
    squares a *mean* gradient, so it underestimates the per-sample Fisher by roughly the batch size.
  * ``empirical_per_sample``: mean of squared per-sample gradients of the training loss (true labels).
  * ``true``: mean of squared per-sample gradients of ``-log p(y|x)`` with ``y`` drawn from the
    model's own predictive distribution (the "true" Fisher, needs ``output_fn`` -> logits ``(..., C)``).
  * ``kfac``: Kronecker-factored (not diagonal) true Fisher of every covered ``nn.Linear`` (Martens &
    Grosse 2015; as an EWC/Laplace penalty: Ritter et al. 2018): per layer ``F ~= A (x) G`` with
    ``A = E[a a^T]`` (layer inputs, a 1 appended for the bias) and ``G = E[g g^T]`` (gradients of
    ``-log p(y|x)`` w.r.t. the layer's outputs, the expectation over ``y ~ p(y|x)`` taken exactly for
    up to 32 classes, else one sampled label). The penalty ``sum_t tr(dW_t^T G_t dW_t A_t)`` keeps
    the correlations between weights that the diagonal drops; its gradient ``G_t dW_t A_t`` is applied
    in the factors' eigenbases, truncated to eigenvalues >= ``kfac_tol`` times the largest. Its step
    cost grows with the number of past tasks (one term each; online mode shares one anchor).
  * ``kfac_merged``: the same Kronecker factors per task, but every layer's penalty is a structured
    approximation that is closed under addition, so all past tasks are merged exactly into one term
    (``sum_t F_t (theta - theta_t) = (sum_t F_t) theta - sum_t F_t theta_t``) and the step cost does not
    grow with the number of tasks. Per ``nn.Linear`` ``[W | b]`` (out x in'), chosen from its shape:
    ``rows`` when ``in' <= out`` and ``in' <= kfac_block_max`` (one ``in' x in'`` block per output unit:
    ``F_i = sum_t G_t[i, i] A_t``), ``cols`` when ``out < in'`` and ``out <= kfac_block_max`` (one
    ``out x out`` block per input column: ``sum_t A_t[j, j] G_t``), else ``diag`` (the diagonal of the
    Kronecker Fisher, ``sum_t diag(G_t) diag(A_t)^T``). Every block's diagonal is the KFAC diagonal, so
    ``normalize`` means the same as for ``kfac``.

Separate mode costs the same per step as online mode: ``sum_t F_t (theta - a_t)^2`` is rewritten as
``W (theta - c)^2 + k`` with ``W = sum_t F_t``, ``c = sum_t F_t a_t / W`` and a constant ``k``, so the
step cost does not grow with the number of tasks. The per-task Fisher and anchors are still kept
(``state_dict``) so the checkpoint holds exactly what the paper's penalty needs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from core.errors import ConfigError, DataError
from core.train.hooks import TrainerHook

EWCMode = Literal["separate", "online"]
ApplyMode = Literal["grad", "loss", "prox"]
FisherKind = Literal["empirical", "empirical_per_sample", "true", "kfac", "kfac_merged"]
KFAC_KINDS = ("kfac", "kfac_merged")  # Fisher kinds estimated as Kronecker factors (stored as #A / #G)
KFAC_EXACT_CLASSES = 32  # up to this many classes the KFAC G factor sums over every label exactly
FisherNorm = Literal["none", "max", "mean"]
ParamFilter = Callable[[str], bool] | Sequence[str] | None
OutputFn = Callable[[nn.Module, Any], torch.Tensor]


def default_output_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Logits of an ``(inputs, targets, ...)`` batch: ``model(batch[0])``; a bare tensor is the input."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, list | tuple):
        return model(batch[0])
    raise ConfigError("EWC fisher='true' needs output_fn(model, batch) -> logits for this batch type")


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            if isinstance(item, torch.Tensor | list | tuple | dict):
                return batch_size_of(item)
    raise DataError("cannot find a tensor in the batch to read its size from")


def slice_batch(batch: Any, i: int) -> Any:
    """Sample ``i`` of a batch as a batch of one (tensors keep a leading dim of 1)."""
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if isinstance(batch, dict):
        return {k: slice_batch(v, i) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(slice_batch(v, i) for v in batch)
    return batch


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (tensors sliced on dim 0)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _head(v, n) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_head(v, n) for v in batch)
    return batch


def _matcher(params: ParamFilter) -> Callable[[str], bool]:
    if params is None:
        return lambda name: True
    if callable(params):
        return params
    patterns = list(params)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class EWC(TrainerHook):
    """EWC penalty + Fisher consolidation, plugged into ``core.train.trainer.Trainer`` via ``hooks=``.

    Args:
        lam: penalty strength ``lambda``.
        mode: ``separate`` (one penalty per past task) or ``online`` (decayed running Fisher).
        fisher: which Fisher estimator to use (see module docstring).
        decay: online-mode decay ``gamma`` of the old Fisher (1.0 = plain accumulation).
        params: which parameters are protected: a predicate on the parameter name, or glob patterns
            such as ``["body.*"]`` (default: every parameter that requires grad at consolidation).
        fisher_samples: at most this many samples (per-sample kinds) or batch samples (empirical)
            are used to estimate the Fisher at the end of a task; ``None`` = the whole loader.
        output_fn: ``(model, batch) -> logits (..., C)``, needed by ``fisher='true'``.
        apply: ``"loss"`` adds the penalty to the loss in ``before_backward`` (autograd differentiates
            it; the reported loss includes it); ``"grad"`` (default, cheaper) adds its exact gradient
            ``lambda * W * (theta - c)`` to ``.grad`` in ``after_backward`` with three fused ``_foreach``
            ops (after AMP unscaling, before clipping: the same update as ``"loss"``); ``"prox"`` leaves
            the gradient alone and, after each optimizer step, applies the penalty's exact proximal map
            ``theta <- (theta + a * c) / (1 + a)`` with ``a = lr * lambda * W`` (``lr`` of the parameter's
            optimizer group). With SGD this is the implicit (backward-Euler) step of the same objective:
            same stationary point, but stable for any ``lr * lambda * W`` (an explicit step diverges
            once it exceeds ~2), so ``lambda`` can be large enough to also hold the many weights whose
            individual Fisher is tiny.
        kfac_tol: ``fisher="kfac"`` only: eigenvalues of each Kronecker factor below ``kfac_tol`` times
            its largest are dropped (those directions are left unprotected; fewer kept = cheaper step).
        kfac_refresh: ``fisher="kfac"``, ``apply="grad"`` only: recompute the penalty gradient every
            ``kfac_refresh`` steps and add the same tensor on the steps in between (1 = every step, exact).
            A KFAC gradient costs about ``4 * out * in * rank`` flops per layer and past task, more than
            a mini-batch step of a wide layer; refreshing every k steps divides that by k. Unsafe with
            Adam: on permuted-digits k = 16 made training collapse (the stale gradient overshoots in
            stiff directions and its bursts swamp Adam's second moment), so only for small k or SGD.
        kfac_block_max: ``fisher="kfac_merged"`` only: the largest block side: a layer whose smaller
            side (``in + 1`` or ``out``) exceeds it gets the diagonal (memory ``numel * side`` per layer).
        kfac_rank: ``fisher="kfac_merged"`` only: > 0 adds to every layer's block / diagonal penalty the
            tasks' Kronecker Fisher compressed onto the top ``kfac_rank`` eigenvectors of the summed A and
            G factors (one dense ``(r_G r_A)^2`` term per layer; ~``4 * out * in * r`` flops per step).
        normalize: ``"max"`` / ``"mean"``: each task's Fisher is divided by its largest / mean entry
            (diagonal kinds) or, for ``kfac``, its ``G`` factors by the largest eigenvalue / mean diagonal
            entry of its Kronecker-factored Fisher, so every task weighs the same in the penalty.
        consolidate_at_task_end: consolidate in ``after_task`` (turn off to call :meth:`consolidate`
            yourself, e.g. on a held-out loader or once per several trainer.fit calls).
    """

    name = "ewc"

    def __init__(
        self,
        lam: float = 100.0,
        *,
        mode: EWCMode = "separate",
        fisher: FisherKind = "empirical_per_sample",
        decay: float = 1.0,
        params: ParamFilter = None,
        fisher_samples: int | None = 1024,
        output_fn: OutputFn | None = None,
        apply: ApplyMode = "grad",
        consolidate_at_task_end: bool = True,
        temperature: float = 1.0,
        normalize: FisherNorm = "none",
        kfac_tol: float = 1e-3,
        kfac_refresh: int = 1,
        kfac_block_max: int = 128,
        kfac_rank: int = 0,
    ) -> None:
        if mode not in ("separate", "online"):
            raise ConfigError(f"EWC mode must be 'separate' or 'online', not {mode!r}")
        if fisher not in ("empirical", "empirical_per_sample", "true", *KFAC_KINDS):
            raise ConfigError("EWC fisher must be empirical, empirical_per_sample, true, kfac or kfac_merged, "
                              f"not {fisher!r}")
        if fisher in KFAC_KINDS and (apply == "prox" or temperature != 1.0):
            raise ConfigError(f"EWC fisher={fisher!r} supports apply='grad' or 'loss', no temperature")
        if isinstance(kfac_block_max, bool) or not isinstance(kfac_block_max, int) or kfac_block_max < 0:
            raise ConfigError(f"EWC kfac_block_max must be an integer >= 0, not {kfac_block_max!r}")
        if isinstance(kfac_rank, bool) or not isinstance(kfac_rank, int) or kfac_rank < 0:
            raise ConfigError(f"EWC kfac_rank must be an integer >= 0, not {kfac_rank!r}")
        if isinstance(kfac_refresh, bool) or not isinstance(kfac_refresh, int) or kfac_refresh < 1:
            raise ConfigError(f"EWC kfac_refresh must be an integer >= 1, not {kfac_refresh!r}")
        if not 0.0 <= kfac_tol < 1.0:
            raise ConfigError(f"EWC kfac_tol must be in [0, 1), not {kfac_tol!r}")
        if apply not in ("grad", "loss", "prox"):
            raise ConfigError(f"EWC apply must be 'grad', 'loss' or 'prox', not {apply!r}")
        if lam < 0 or not 0.0 <= decay <= 1.0:
            raise ConfigError("EWC needs lam >= 0 and 0 <= decay <= 1")
        if not temperature > 0.0:
            raise ConfigError(f"EWC temperature must be > 0, not {temperature!r}")
        if temperature != 1.0 and fisher != "true":
            raise ConfigError("EWC temperature applies to fisher='true' only (labels drawn from the model)")
        if normalize not in ("none", "max", "mean"):
            raise ConfigError(f"EWC normalize must be 'none', 'max' or 'mean', not {normalize!r}")
        self.temperature, self.normalize, self.kfac_tol = float(temperature), normalize, float(kfac_tol)
        self.kfac_block_max = kfac_block_max
        # kfac_merged, per layer: (structure, M, V, k): the merged penalty sum(X * M X) - 2 sum(V * X) + k
        # with X = [W | b] ("rows", "diag") or its transpose ("cols"); M (n, m, m) blocks or (n, m) diagonal
        self._merged: dict[str, tuple[str, torch.Tensor, torch.Tensor, float]] = {}
        # kfac_rank > 0, per layer: (U_G, U_A, H, hv, c): + z^T H z - 2 hv^T z + c with z = U_G^T [W | b] U_A
        self._merged_sub: dict[str, tuple[Any, ...]] = {}
        self.kfac_rank = kfac_rank
        # KFAC, per layer: (every task's stacked U_A, per task (U_G, s_G s_A^T, U_G^T [W* | b*] U_A, cols)).
        self._kfac: dict[str, tuple[torch.Tensor, list[tuple[Any, ...]]]] = {}
        # apply="grad" with kfac_refresh > 1: (model id, {layer: (weight grad, bias grad)}) of the last
        # exact penalty gradient, and how many steps it has been applied for
        self.kfac_refresh = kfac_refresh
        self._kfac_cache: tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] | None = None
        self._kfac_age = 0
        self.lam, self.mode, self.fisher_kind, self.decay = float(lam), mode, fisher, float(decay)
        self.fisher_samples = fisher_samples
        self.consolidate_at_task_end = consolidate_at_task_end
        self.apply = apply
        self._bound: tuple[int, list[nn.Parameter], list[torch.Tensor], list[torch.Tensor]] | None = None
        self.output_fn = output_fn or default_output_fn
        self._select = _matcher(params)
        # Per past task (separate) or the single key "online": {param name: tensor}.
        self.fishers: dict[str, dict[str, torch.Tensor]] = {}
        self.anchors: dict[str, dict[str, torch.Tensor]] = {}
        self.tasks: list[str] = []
        # The penalty in the collapsed form W * (theta - c)^2 + k (see module docstring).
        self._weight: dict[str, torch.Tensor] = {}
        self._center: dict[str, torch.Tensor] = {}
        self._const = 0.0
        self.last_penalty = 0.0

    # -- the penalty ---------------------------------------------------------------------------
    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lambda/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``: a differentiable scalar (0 before
        the first consolidation)."""
        named = dict(model.named_parameters())
        device = next(iter(named.values())).device if named else torch.device("cpu")
        if self.fisher_kind in KFAC_KINDS:
            return self._kfac_penalty(model, device)
        if not self._weight:
            return torch.zeros((), device=device)
        total = torch.zeros((), device=device)
        for name, w in self._weight.items():
            p = named.get(name)
            if p is None:
                raise DataError(f"EWC state covers parameter {name!r} which this model does not have")
            if w.device != p.device:  # first use after load / device move
                self._weight[name], self._center[name] = w.to(p.device), self._center[name].to(p.device)
                w = self._weight[name]
            total = total + (w * (p - self._center[name]).square()).sum()
        return 0.5 * self.lam * (total + self._const)

    def before_backward(self, trainer: Any, loss: torch.Tensor) -> torch.Tensor:
        if self.apply != "loss" or not (self._weight or self._kfac or self._merged) or self.lam == 0.0:
            return loss
        pen = self.penalty(trainer.model)
        self.last_penalty = float(pen.detach())
        return loss + pen.to(loss.dtype)

    @torch.no_grad()
    def after_backward(self, trainer: Any) -> None:
        if self.apply != "grad" or not (self._weight or self._kfac or self._merged) or self.lam == 0.0:
            return
        if self.fisher_kind in KFAC_KINDS:
            self._kfac_add_grad(trainer.model)
            return
        params, weights, centers = self._bind(trainer.model)
        for p in params:
            if p.grad is None:  # not reached by this step's loss: the penalty still pulls it back
                p.grad = torch.zeros_like(p)
        diffs = torch._foreach_sub([p.detach() for p in params], centers)  # theta - c
        torch._foreach_mul_(diffs, weights)  # W * (theta - c)
        torch._foreach_add_([p.grad for p in params], diffs, alpha=self.lam)  # d/dtheta of the penalty

    @torch.no_grad()
    def after_step(self, trainer: Any, loss: float) -> None:
        if self.apply != "prox" or not self._weight or self.lam == 0.0:
            return
        params, weights, centers = self._bind(trainer.model)
        lrs = {id(p): float(g["lr"]) for g in trainer.optimizer.param_groups for p in g["params"]}
        for p, w, c in zip(params, weights, centers, strict=True):
            lr = lrs.get(id(p))
            if lr is None:  # not trained by this optimizer: nothing moved it
                continue
            a = w * (lr * self.lam)  # (shape of p)
            p.add_(a * c).div_(1.0 + a)  # argmin_x |x - p|^2 / (2 lr) + lam/2 * W (x - c)^2

    def _bind(self, model: nn.Module) -> tuple[list[nn.Parameter], list[torch.Tensor], list[torch.Tensor]]:
        """The covered parameters of ``model`` with W and c on their devices (cached per model)."""
        if self._bound is None or self._bound[0] != id(model):
            named = dict(model.named_parameters())
            missing = sorted(set(self._weight) - set(named))
            if missing:
                raise DataError(f"EWC state covers parameter {missing[0]!r} which this model does not have")
            names = [n for n in self._weight if named[n].requires_grad]
            params = [named[n] for n in names]
            weights = [self._weight[n].to(named[n].device, named[n].dtype) for n in names]
            centers = [self._center[n].to(named[n].device, named[n].dtype) for n in names]
            self._bound = (id(model), params, weights, centers)
        return self._bound[1], self._bound[2], self._bound[3]

    # -- consolidation -------------------------------------------------------------------------
    def after_task(self, trainer: Any, task_id: str, loader: Iterable[Any]) -> None:
        if self.consolidate_at_task_end:
            self.consolidate(trainer.model, trainer.loss_fn, loader, task_id)

    def consolidate(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        loader: Iterable[Any],
        task_id: str,
    ) -> dict[str, torch.Tensor]:
        """Estimate the Fisher on ``loader``, store it with the current weights as anchors. Returns F
        (for ``kfac``: ``{"<layer>#A": A, "<layer>#G": G}``)."""
        if self.fisher_kind in KFAC_KINDS:
            return self._kfac_consolidate(model, loader, task_id)
        fisher = self._normalized(self.estimate_fisher(model, loss_fn, loader))
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
        if self.mode == "online":
            old = self.fishers.get("online", {})
            fisher = {n: f + self.decay * old[n] if n in old else f for n, f in fisher.items()}
            self.fishers, self.anchors = {"online": fisher}, {"online": anchor}
        else:
            key = task_id if task_id not in self.fishers else f"{task_id}#{len(self.tasks)}"
            self.fishers[key], self.anchors[key] = fisher, anchor
        self.tasks.append(task_id)
        self._rebuild()
        return fisher

    def _normalized(self, fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``normalize="max"``: divide the task's Fisher by its largest entry (over every covered
        parameter); ``"mean"``: by its mean entry. Each task then weighs the same in the penalty whatever
        the estimator's scale (which shrinks as a task's training loss goes to 0), and ``lam`` is the
        stiffness of the task's most (max) or typically (mean) important weight."""
        if self.normalize == "none":
            return fisher
        if self.normalize == "max":
            scale = max(float(f.max()) for f in fisher.values())
        else:
            scale = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
        if scale <= 0.0:
            return fisher  # an all-zero Fisher stays zero
        return {n: f / scale for n, f in fisher.items()}

    def estimate_fisher(
        self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], loader: Iterable[Any]
    ) -> dict[str, torch.Tensor]:
        """Diagonal Fisher ``{name: tensor like the parameter}``, all entries >= 0."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad and self._select(n)}
        if not params:
            raise ConfigError("EWC covers no parameter: check the params filter and requires_grad")
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = model.training
        model.eval()  # dropout off: the Fisher of the deterministic model
        seen, budget = 0, self.fisher_samples
        try:
            for batch in loader:
                if budget is not None and seen >= budget:
                    break
                if self.fisher_kind == "empirical":
                    # One gradient per mini-batch; weight by its size so the result is a sample mean.
                    n = batch_size_of(batch)
                    self._accumulate(model, params, fisher, loss_fn(model, batch), float(n))
                    seen += n
                    continue
                take = batch_size_of(batch) if budget is None else min(batch_size_of(batch), budget - seen)
                for i in range(take):
                    one = slice_batch(batch, i)
                    self._accumulate(model, params, fisher, self._sample_loss(model, loss_fn, one), 1.0)
                    seen += 1
        finally:
            model.train(was_training)
            model.zero_grad(set_to_none=True)
        if seen == 0:
            raise DataError("EWC consolidation got an empty loader: no data to estimate the Fisher on")
        return {n: f / seen for n, f in fisher.items()}

    def _sample_loss(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                     one: Any) -> torch.Tensor:
        if self.fisher_kind == "empirical_per_sample":
            return loss_fn(model, one)
        logits = self.output_fn(model, one)  # (1, ..., C)
        flat = logits.reshape(-1, logits.shape[-1]).float() / self.temperature  # (N, C): one prediction each
        with torch.no_grad():
            drawn = torch.multinomial(torch.softmax(flat, dim=-1), 1).squeeze(-1)  # y ~ p(y|x)
        return nn.functional.cross_entropy(flat, drawn)

    @staticmethod
    def _accumulate(model: nn.Module, params: dict[str, nn.Parameter], fisher: dict[str, torch.Tensor],
                    loss: torch.Tensor, weight: float) -> None:
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[name].add_(g.detach().float().square(), alpha=weight)

    def _rebuild(self) -> None:
        """Collapse the stored (F_t, a_t) into W, c, k so the per-step penalty is one term."""
        self._weight, self._center, self._const, self._bound = {}, {}, 0.0, None
        self._kfac, self._merged, self._merged_sub, self._kfac_cache = {}, {}, {}, None
        if self.fisher_kind == "kfac":
            self._kfac_rebuild()
            return
        if self.fisher_kind == "kfac_merged":
            self._merged_rebuild()
            return
        names = {n for f in self.fishers.values() for n in f}
        const = 0.0
        for n in sorted(names):
            pairs = [(self.fishers[t][n].double(), self.anchors[t][n].double()) for t in self.fishers
                     if n in self.fishers[t]]
            w = sum(f for f, _ in pairs)
            fa = sum(f * a for f, a in pairs)
            # Where W = 0 no task cares about the weight; any center gives a zero term.
            c = torch.where(w > 0, fa / w.clamp_min(1e-300), pairs[-1][1])
            const += float(sum((f * a.square()).sum() for f, a in pairs) - (w * c.square()).sum())
            self._weight[n], self._center[n] = w.float(), c.float()
        self._const = max(const, 0.0)  # >= 0 by Cauchy-Schwarz; clamp float64 rounding

    # -- Kronecker-factored Fisher (fisher="kfac") ----------------------------------------------
    def _kfac_layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The covered ``nn.Linear`` modules (their weight's name passes the ``params`` filter)."""
        layers = {n: m for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and m.weight.requires_grad and self._select(f"{n}.weight")}
        if not layers:
            raise ConfigError(f"EWC fisher={self.fisher_kind!r} covers no nn.Linear: check the params filter and requires_grad")
        return layers

    def estimate_kfac(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, torch.Tensor]:
        """KFAC factors ``{"<layer>#A": E[a a^T], "<layer>#G": E[g g^T]}`` of the covered linear layers,
        from at most ``fisher_samples`` samples of ``loader``, in eval mode (dropout off).

        ``a`` is the layer input (with a trailing 1 when the layer has a bias), ``g`` the gradient of
        ``-log p(y|x)`` w.r.t. the layer output; ``G`` averages ``g g^T`` over ``y ~ p(y|x)`` exactly
        (one backward per class, each sample weighted by ``sqrt p``) for up to ``KFAC_EXACT_CLASSES``
        classes, else over one sampled label per prediction. Rows of sequence inputs ``(B, T, D)`` count
        as predictions of their own."""
        layers = self._kfac_layers(model)
        seen_in: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [m.register_forward_hook(lambda _m, args, out, n=n: seen_in.__setitem__(n, (args[0], out)))
                   for n, m in layers.items()]
        dims = {n: m.in_features + (m.bias is not None) for n, m in layers.items()}
        a_sum = {n: torch.zeros(d, d, dtype=torch.float64) for n, d in dims.items()}
        g_sum = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in layers.items()}
        rows = dict.fromkeys(layers, 0)
        was_training = model.training
        model.eval()  # dropout off: the Fisher of the deterministic model
        seen, budget = 0, self.fisher_samples
        try:
            with torch.enable_grad():
                for batch in loader:
                    if budget is not None and seen >= budget:
                        break
                    n = batch_size_of(batch) if budget is None else min(batch_size_of(batch), budget - seen)
                    part = _head(batch, n)
                    seen_in.clear()
                    logits = self.output_fn(model, part)
                    flat = logits.reshape(-1, logits.shape[-1]).float()  # (N, C)
                    logp = torch.log_softmax(flat, dim=-1)
                    prob = logp.detach().exp()
                    outs, reached = [], [(name, m) for name, m in layers.items() if name in seen_in]
                    for name, m in reached:  # layers this forward did not run get no statistics
                        x, out = seen_in[name]
                        a = x.detach().reshape(-1, m.in_features).double()
                        if m.bias is not None:
                            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                        a_sum[name] += (a.T @ a).cpu()
                        rows[name] += a.shape[0]
                        outs.append(out)
                    # masked classes (logit -inf, p = 0) get weight 0; clamp keeps 0 * -inf out of the sum
                    safe = logp.clamp_min(-1e4)
                    if flat.shape[-1] <= KFAC_EXACT_CLASSES:
                        weights = prob.sqrt()  # (N, C)
                        losses = [-(weights[:, c] * safe[:, c]).sum() for c in range(flat.shape[-1])
                                  if bool((prob[:, c] > 0).any())]
                    else:
                        drawn = torch.multinomial(prob, 1)  # (N, 1): y ~ p(y|x)
                        losses = [-safe.gather(1, drawn).sum()]
                    for k, loss in enumerate(losses):
                        grads = torch.autograd.grad(loss, outs, retain_graph=k < len(losses) - 1,
                                                    allow_unused=True)
                        for (name, m), g in zip(reached, grads, strict=True):
                            if g is None:  # output does not reach the logits: zero gradient
                                continue
                            g = g.reshape(-1, m.out_features).double()
                            g_sum[name] += (g.T @ g).cpu()
                    seen += n
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            model.zero_grad(set_to_none=True)
        if seen == 0:
            raise DataError("EWC consolidation got an empty loader: no data to estimate the Fisher on")
        out: dict[str, torch.Tensor] = {}
        for name in (n for n in layers if rows[n] > 0):
            out[f"{name}#A"] = (a_sum[name] / rows[name]).float()
            out[f"{name}#G"] = (g_sum[name] / rows[name]).float()  # one prediction per input row
        return out

    def _kfac_normalized(self, factors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """``normalize="mean"``: divide the task's ``G`` factors by the mean diagonal entry of its
        Kronecker-factored Fisher (``sum_layers tr(A) tr(G) / sum_layers numel``); ``"max"``: by its
        largest eigenvalue (``max_layers lmax(A) lmax(G)``). Every task then weighs the same in the
        penalty: the raw Fisher of a task shrinks with its training loss, so the first task (fit with no
        penalty, most confidently) would otherwise count least."""
        if self.normalize == "none":
            return factors
        layers = sorted({k.rsplit("#", 1)[0] for k in factors})
        if self.normalize == "max":
            scale = max(float(torch.linalg.eigvalsh(factors[f"{n}#A"].double()).max())
                        * float(torch.linalg.eigvalsh(factors[f"{n}#G"].double()).max()) for n in layers)
        else:
            mods = dict(model.named_modules())
            numel = sum(mods[n].weight.numel() + (mods[n].bias.numel() if mods[n].bias is not None else 0)
                        for n in layers)
            scale = sum(float(factors[f"{n}#A"].double().trace() * factors[f"{n}#G"].double().trace())
                        for n in layers) / numel
        if scale <= 0.0:
            return factors  # an all-zero Fisher stays zero
        return {k: v / scale if k.endswith("#G") else v for k, v in factors.items()}

    def _kfac_consolidate(self, model: nn.Module, loader: Iterable[Any], task_id: str) -> dict[str, torch.Tensor]:
        factors = self._kfac_normalized(self.estimate_kfac(model, loader), model)
        params = dict(model.named_parameters())
        layers = sorted({k.rsplit("#", 1)[0] for k in factors})
        anchor = {f"{n}.{p}": params[f"{n}.{p}"].detach().clone() for n in layers for p in ("weight", "bias")
                  if f"{n}.{p}" in params}
        if self.mode == "online":
            # F <- decay * F_old + F_new as a sum of Kronecker products (a sum of two is no Kronecker
            # product), all anchored at the latest weights
            for t in self.fishers:
                self.fishers[t] = {k: v * self.decay if k.endswith("#G") else v for k, v in self.fishers[t].items()}
                self.anchors[t] = anchor
        key = task_id if task_id not in self.fishers else f"{task_id}#{len(self.tasks)}"
        self.fishers[key], self.anchors[key] = factors, anchor
        self.tasks.append(task_id)
        self._rebuild()
        return factors

    def _kfac_rebuild(self) -> None:
        """Eigendecompose every task's factors once; keep eigenvalues >= kfac_tol * the largest. Per
        layer the kept input-side eigenvectors of all tasks are stacked into one matrix, so a step
        projects the weights onto every task's basis with one matmul."""
        per_layer: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        for t, fs in self.fishers.items():
            for key in fs:
                if not key.endswith("#A"):
                    continue
                layer = key[:-2]
                parts = []
                for f in (fs[f"{layer}#G"], fs[key]):
                    s, u = torch.linalg.eigh(f.double())
                    top = float(s.max())
                    keep = s >= self.kfac_tol * top if top > 0 else s > 0
                    parts += [u[:, keep].float().contiguous(), s[keep].clamp_min(0.0).float()]
                u_g, s_g, u_a, s_a = parts
                w = self.anchors[t][f"{layer}.weight"]
                b = self.anchors[t].get(f"{layer}.bias")
                anchor = torch.cat([w, b[:, None]], dim=1) if b is not None else w
                # the anchor in the eigenbases, so a step only projects the current weights
                per_layer.setdefault(layer, []).append(
                    (u_g, s_g[:, None] * s_a[None, :], u_a, u_g.T @ (anchor @ u_a)))
        self._kfac = {}
        for layer, terms in per_layer.items():
            u_a_all = torch.cat([u_a for _, _, u_a, _ in terms], dim=1)  # (in, sum r_A)
            cuts = torch.tensor([0] + [u_a.shape[1] for _, _, u_a, _ in terms]).cumsum(0).tolist()
            self._kfac[layer] = (u_a_all, [(u_g, scale, center, cuts[k], cuts[k + 1])
                                           for k, (u_g, scale, _, center) in enumerate(terms)])

    def _anchor_wb(self, task: str, layer: str) -> torch.Tensor:
        """Task ``task``'s anchor ``[W* | b*]`` of ``layer`` on the CPU in float64."""
        w = self.anchors[task][f"{layer}.weight"].detach().cpu().double()
        b = self.anchors[task].get(f"{layer}.bias")
        return torch.cat([w, b.detach().cpu().double()[:, None]], dim=1) if b is not None else w

    def _merged_structure(self, n_in: int, n_out: int) -> str:
        """``rows`` / ``cols`` / ``diag`` for a ``[W | b]`` of ``n_out x n_in`` (see the module docstring)."""
        if n_in <= n_out and n_in <= self.kfac_block_max:
            return "rows"
        if n_out < n_in and n_out <= self.kfac_block_max:
            return "cols"
        return "diag"

    def _merged_rebuild(self) -> None:
        """Merge every task's Kronecker factors into one structured quadratic per layer: the penalty
        ``sum_t (X - X_t)^T F_t (X - X_t)`` becomes ``X^T M X - 2 V^T X + k`` with ``M = sum_t F_t``,
        ``V = sum_t F_t X_t`` and ``k = sum_t X_t^T F_t X_t`` (float64 while summing)."""
        sums: dict[str, list[Any]] = {}
        for t, fs in self.fishers.items():
            for key in fs:
                if not key.endswith("#A"):
                    continue
                layer = key[:-2]
                a, g = fs[key].double(), fs[f"{layer}#G"].double()
                x = self._anchor_wb(t, layer)
                kind = self._merged_structure(a.shape[0], g.shape[0])
                if kind == "diag":
                    m = torch.outer(g.diagonal(), a.diagonal())  # (out, in')
                    v = m * x
                else:  # one block per row of X (rows: X = [W | b]; cols: X = [W | b]^T)
                    unit, block = (g.diagonal(), a) if kind == "rows" else (a.diagonal(), g)
                    block = 0.5 * (block + block.T)  # exactly symmetric (see _merged_apply)
                    x = x if kind == "rows" else x.T
                    m = unit[:, None, None] * block[None]  # (n, m, m)
                    v = unit[:, None] * (x @ block)  # block symmetric: row i is block @ x_i
                k = float((v * x).sum())
                if layer in sums:
                    for i, part in enumerate((m, v)):
                        sums[layer][1 + i] += part
                    sums[layer][3] += k
                else:
                    sums[layer] = [kind, m, v, k]
        self._merged = {layer: (kind, m.float(), v.float(), k) for layer, (kind, m, v, k) in sums.items()}
        if self.kfac_rank > 0:
            self._merged_sub_rebuild()

    def _merged_sub_rebuild(self) -> None:
        """``kfac_rank = r > 0``: add, per layer, every task's Kronecker Fisher compressed onto one shared
        subspace: ``U_A`` / ``U_G`` = the top-r eigenvectors of ``sum_t A_t`` / ``sum_t G_t``; in it each
        task is the exact ``(U_G^T G_t U_G) (x) (U_A^T A_t U_A)`` and the sum over tasks is one dense
        ``(r_G r_A)^2`` matrix ``H`` (the correlated directions the block / diagonal structure drops:
        e.g. the mean direction of non-negative ReLU inputs). Recomputed from the stored factors at every
        consolidation (the subspace follows the tasks)."""
        per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for t, fs in self.fishers.items():
            for key in fs:
                if key.endswith("#A"):
                    layer = key[:-2]
                    per_layer.setdefault(layer, []).append(
                        (fs[key].double(), fs[f"{layer}#G"].double(), self._anchor_wb(t, layer)))
        for layer, terms in per_layer.items():
            bases = []
            for i in (0, 1):  # A, then G
                total = sum(term[i] for term in terms)
                _, u = torch.linalg.eigh(0.5 * (total + total.T))
                bases.append(u[:, -min(self.kfac_rank, u.shape[1]):])  # top eigenvectors
            u_a, u_g = bases
            n = u_a.shape[1] * u_g.shape[1]
            h, hv, c = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0.0
            for a, g, x in terms:
                ga, aa = u_g.T @ g @ u_g, u_a.T @ a @ u_a
                z = u_g.T @ x @ u_a  # (r_G, r_A)
                fz = ga @ z @ aa  # = kron(ga, aa) vec(z), row-major
                h += torch.kron(ga, aa)
                hv += fz.reshape(-1)
                c += float((z * fz).sum())
            h = 0.5 * (h + h.T)
            self._merged_sub[layer] = (u_g.float(), u_a.float(), h.float(), hv.float(), c)

    def _merged_sub_terms(self, named: dict[str, nn.Parameter], layer: str) -> tuple[Any, ...]:
        """(U_G, U_A, H, hv, c, z) of the subspace part of ``layer``, ``z = vec(U_G^T [W | b] U_A)`` at
        the current weights (without concatenating ``[W | b]``)."""
        u_g, u_a, h, hv, c = self._merged_sub[layer]
        w, b = named[f"{layer}.weight"], named.get(f"{layer}.bias")
        if u_g.device != w.device:
            self._merged_sub[layer] = u_g, u_a, h, hv, c = (u_g.to(w.device), u_a.to(w.device), h.to(w.device),
                                                            hv.to(w.device), c)
        z = (u_g.T @ w) @ u_a[: w.shape[1]]
        if b is not None:
            z = z + torch.outer(u_g.T @ b, u_a[-1])
        return u_g, u_a, h, hv, c, z.reshape(-1)

    def _merged_to(self, layer: str, device: torch.device) -> tuple[str, torch.Tensor, torch.Tensor, float]:
        kind, m, v, k = self._merged[layer]
        if m.device != device:  # first use after load / device move
            self._merged[layer] = kind, m, v, k = kind, m.to(device), v.to(device), k
        return kind, m, v, k

    @staticmethod
    def _merged_apply(kind: str, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``M X`` for the layer's structure (``x`` already transposed for ``cols``). The blocks are
        symmetric, so each row is computed as ``x_i^T M_i`` (a row vector times a matrix: ~5x faster on
        CPU than the batched ``M_i x_i`` mat-vec)."""
        if kind == "diag":
            return m * x
        return torch.bmm(x.unsqueeze(1), m).squeeze(1)

    def _merged_add_grad(self, named: dict[str, nn.Parameter], into: dict[str, torch.Tensor] | None = None,
                         alpha: float | None = None) -> None:
        """``out += alpha * (M X - V)`` per merged layer, in place (the diagonal without copying
        ``[W | b]``): one batched mat-vec or a few element-wise passes, whatever the number of tasks.
        ``out`` is each covered parameter's ``.grad`` (``alpha = lambda``) or, when ``into`` is given,
        ``into[name]`` (a zero-filled buffer per parameter name, created here when missing)."""
        alpha = self.lam if alpha is None else alpha
        for layer in self._merged:
            w, b = named.get(f"{layer}.weight"), named.get(f"{layer}.bias")
            if w is None or not w.requires_grad:
                continue
            kind, m, v, _ = self._merged_to(layer, w.device)
            parts = [(w, slice(0, w.shape[1]))]
            if b is not None and b.requires_grad:
                parts.append((b, slice(w.shape[1], w.shape[1] + 1)))
            if kind != "diag":
                x = self._kfac_weight(named, layer)
                grad = (self._merged_apply(kind, m, x.T) - v).T if kind == "cols" else \
                    self._merged_apply(kind, m, x).sub_(v)
            outs = []
            for p, _ in parts:
                if into is not None:
                    outs.append(into.setdefault(f"{layer}.{'weight' if p is w else 'bias'}", torch.zeros_like(p)))
                else:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    outs.append(p.grad)
            if layer in self._merged_sub:  # U_G (H z - hv) U_A^T, added by two small-rank products
                u_g, u_a, h, hv, _, z = self._merged_sub_terms(named, layer)
                left = u_g @ torch.addmv(hv, h, z, beta=-1.0).view(u_g.shape[1], u_a.shape[1])  # (out, r_A)
                outs[0].addmm_(left, u_a[: w.shape[1]].T, alpha=alpha)
                if len(parts) > 1:
                    outs[1].add_(left @ u_a[-1], alpha=alpha)
            for (p, cols), out in zip(parts, outs, strict=True):
                if kind == "diag":
                    g2, m2, v2 = out.view(-1, 1) if p.dim() == 1 else out, m[:, cols], v[:, cols]
                    g2.addcmul_(m2, p.detach().view_as(g2), value=alpha).add_(v2, alpha=-alpha)
                else:
                    out.add_(grad[:, cols].reshape(p.shape), alpha=alpha)

    @staticmethod
    def _kfac_weight(named: dict[str, nn.Parameter], layer: str) -> torch.Tensor:
        w = named.get(f"{layer}.weight")
        if w is None:
            raise DataError(f"EWC state covers layer {layer!r} which this model does not have")
        b = named.get(f"{layer}.bias")
        return torch.cat([w, b[:, None]], dim=1) if b is not None else w

    def _kfac_to(self, layer: str, device: torch.device) -> tuple[torch.Tensor, list[tuple[Any, ...]]]:
        u_a_all, terms = self._kfac[layer]
        if u_a_all.device != device:  # first use after load / device move
            terms = [(u.to(device), s.to(device), c.to(device), lo, hi) for u, s, c, lo, hi in terms]
            self._kfac[layer] = u_a_all, terms = u_a_all.to(device), terms
        return u_a_all, terms

    def _kfac_penalty(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        """``lambda/2 * sum_t sum_layers tr(dW^T G dW A)`` (truncated eigenbases), differentiable."""
        named = dict(model.named_parameters())
        total = torch.zeros((), device=device)
        for layer in self._merged:
            wb = self._kfac_weight(named, layer)
            kind, m, v, k = self._merged_to(layer, wb.device)
            x = wb.T if kind == "cols" else wb
            total = total + (x * (self._merged_apply(kind, m, x) - 2.0 * v)).sum() + k
            if layer in self._merged_sub:
                _, _, h, hv, c, z = self._merged_sub_terms(named, layer)
                total = total + z @ (h @ z - 2.0 * hv) + c
        for layer in self._kfac:
            wb = self._kfac_weight(named, layer)
            u_a_all, terms = self._kfac_to(layer, wb.device)
            proj = wb @ u_a_all  # (out, sum r_A)
            for u_g, scale, center, lo, hi in terms:
                d = u_g.T @ proj[:, lo:hi] - center  # U_G^T (W - W*) U_A
                total = total + (scale * d.square()).sum()
        return 0.5 * self.lam * total

    @torch.no_grad()
    def _kfac_add_grad(self, model: nn.Module) -> None:
        """``.grad += lambda * sum_t G_t (W - W*_t) A_t`` per covered layer, in the truncated eigenbases:
        ``U_G (S * U_G^T (W - W*) U_A) U_A^T``, two big matmuls per layer whatever the number of tasks.

        With ``kfac_refresh = k > 1`` the exact gradient is computed on every k-th step and the same
        tensor is added on the k - 1 steps in between (a lagged penalty gradient: between refreshes the
        weights move by at most ~k * lr per Adam step); a new consolidation, a load or another model
        forces a refresh."""
        named = dict(model.named_parameters())
        if self._merged and self.kfac_refresh == 1:
            self._merged_add_grad(named)
            return
        cache = self._kfac_cache
        if cache is None or cache[0] != id(model) or self._kfac_age >= self.kfac_refresh:
            cache = self._kfac_cache = (id(model), self._kfac_grads(named))
            self._kfac_age = 0
        self._kfac_age += 1
        for layer, (gw, gb) in cache[1].items():
            w, b = named[f"{layer}.weight"], named.get(f"{layer}.bias")
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.add_(gw, alpha=self.lam)
            if gb is not None and b is not None:
                if b.grad is None:
                    b.grad = torch.zeros_like(b)
                b.grad.add_(gb, alpha=self.lam)

    def _kfac_grads(self, named: dict[str, nn.Parameter]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``sum_t G_t (W - W*_t) A_t`` split into (weight, bias) parts, per covered trainable layer."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if self._merged:
            merged: dict[str, torch.Tensor] = {}
            self._merged_add_grad(named, into=merged, alpha=1.0)
            for layer in self._merged:
                if f"{layer}.weight" in merged:
                    out[layer] = (merged[f"{layer}.weight"], merged.get(f"{layer}.bias"))
        for layer in self._kfac:
            w, b = named.get(f"{layer}.weight"), named.get(f"{layer}.bias")
            if w is None or not w.requires_grad:
                continue
            wb = self._kfac_weight(named, layer)
            u_a_all, terms = self._kfac_to(layer, wb.device)
            proj = wb @ u_a_all  # (out, sum r_A)
            for u_g, scale, center, lo, hi in terms:
                d = torch.addmm(center, u_g.T, proj[:, lo:hi], beta=-1.0).mul_(scale)
                proj[:, lo:hi] = u_g @ d
            grad = proj @ u_a_all.T  # (out, in [+1])
            out[layer] = (grad[:, : w.shape[1]], grad[:, -1] if b is not None and b.requires_grad else None)
        return out

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "fisher_kind": self.fisher_kind, "lam": self.lam, "decay": self.decay,
            "temperature": self.temperature, "normalize": self.normalize,
            "tasks": list(self.tasks),
            "fishers": {t: {n: f.cpu() for n, f in fs.items()} for t, fs in self.fishers.items()},
            "anchors": {t: {n: a.cpu() for n, a in a_.items()} for t, a_ in self.anchors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ConfigError(f"saved EWC state is mode {state['mode']!r}, this hook is {self.mode!r}")
        if (state.get("fisher_kind", self.fisher_kind) in KFAC_KINDS) != (self.fisher_kind in KFAC_KINDS):
            raise ConfigError(f"saved EWC state has fisher {state['fisher_kind']!r}, this hook {self.fisher_kind!r}: "
                              "KFAC factors and a diagonal Fisher do not mix")
        try:
            self.fishers = {t: dict(fs) for t, fs in state["fishers"].items()}
            self.anchors = {t: dict(a) for t, a in state["anchors"].items()}
            self.tasks = list(state["tasks"])
        except (KeyError, AttributeError, TypeError) as e:
            raise DataError(f"malformed EWC state (missing {e}); was it saved by core.continual.ewc?") from e
        for t, fs in self.fishers.items():
            want = set(fs) if self.fisher_kind not in KFAC_KINDS else {
                f"{n.rsplit('#', 1)[0]}.{p}" for n in fs for p in ("weight", "bias")}
            if not set(self.anchors.get(t, {})) <= want or (self.fisher_kind not in KFAC_KINDS and set(fs) != want):
                raise DataError(f"EWC state for task {t!r} has Fisher and anchors for different parameters")
        self._rebuild()

    def save(self, path: str | Path) -> None:
        """Write Fisher + anchors to one safetensors file (for use without a trainer checkpoint)."""
        from safetensors.torch import save_file

        tensors = {f"{kind}/{t}/{n}": v.contiguous().cpu()
                   for kind, store in (("fisher", self.fishers), ("anchor", self.anchors))
                   for t, d in store.items() for n, v in d.items()}
        meta = {"mode": self.mode, "fisher_kind": self.fisher_kind, "lam": str(self.lam),
                "decay": str(self.decay), "tasks": "\n".join(self.tasks)}
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                fishers: dict[str, dict[str, torch.Tensor]] = {}
                anchors: dict[str, dict[str, torch.Tensor]] = {}
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    kind, rest = key.split("/", 1)
                    task, name = rest.rsplit("/", 1)  # parameter names never hold "/"
                    (fishers if kind == "fisher" else anchors).setdefault(task, {})[name] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise DataError(f"cannot read EWC state from {path}: {e}") from e
        tasks = meta.get("tasks", "")
        self.load_state_dict({"mode": meta.get("mode", self.mode),
                              "fisher_kind": meta.get("fisher_kind", self.fisher_kind), "fishers": fishers, "anchors": anchors,
                              "tasks": tasks.split("\n") if tasks else []})
