"""Training the core LM on the shared corpora, and the default small LM every area can rely on.

One pipeline, visible in ``train_lm``::

    documents (core.model.data) -> byte-level BPE (core.model.tokenizer) -> packed blocks
      -> Trainer(DeepseekV3.compute_loss, hooks=[MoEBalanceHook]) -> save_pretrained (HF layout + tokenizer)
      -> balance + held-out loss on dev documents -> train_metrics.json

``ensure_default_lm(progress=...)`` returns the directory of the default checkpoint
(``get_settings().model_dir("core", "lm-default")``), training it first when it does not exist
(a file lock keeps concurrent callers from training twice).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import DataError
from core.model.data import CORPORA, BlockLoader, iter_documents, pack
from core.model.deepseek import DeepseekV3, ModelArgs, expert_load_imbalance
from core.model.hf import CONFIG, WEIGHTS, load_pretrained, save_pretrained
from core.model.tokenizer import TOKENIZER_FILE, Tokenizer
from core.settings import get_settings
from core.train.hooks import TrainerHook
from core.train.trainer import Trainer

log = logging.getLogger(__name__)

# ~2.6M parameters (6 layers, MoE in layers 1-5, one MTP module): small enough to train in a few
# minutes on 2 idle CPU cores. Bigger shapes are a config away (``verticals core train --config``).
DEFAULT_LM_ARGS: dict[str, Any] = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=6,
    num_attention_heads=4, kv_lora_rank=48, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2, n_shared_experts=1,
    first_k_dense_replace=1, routed_scaling_factor=1.0, max_position_embeddings=1024,
    num_nextn_predict_layers=1, mtp_loss_weight=0.3, bias_update_speed=0.01, aux_loss_alpha=1e-4,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

@dataclass
class TrainConfig:
    """How to train (the model shape is ``model`` = ModelArgs fields)."""

    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LM_ARGS))
    corpora: list[str] = field(default_factory=lambda: list(CORPORA))
    docs_per_corpus: int | None = 2000  # cap per corpus (SGD alone is 13M characters)
    tokenizer_docs_per_corpus: int = 2000
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 200
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    balance_bias: bool = True  # aux-loss-free bias update
    # Optimizer steps whose summed expert load drives one bias update (gamma per update): DeepSeek-V3
    # counts the load over its whole (very large) batch; ours is 1,024 tokens of 8 blocks whose corpus
    # mix swings the per-step load. 1 = every step (the default: a 4-step window balanced worse in a
    # measured run, docs/BENCHMARKS.md).
    bias_update_window: int = 1
    # gamma over training: "constant" (the default), or "cosine" = gamma times the LR's cosine decay (no
    # warmup ramp) down to ``bias_update_min_ratio`` x gamma. Cosine balanced worse in a measured run.
    bias_update_schedule: str = "constant"
    bias_update_min_ratio: float = 0.1
    gradient_checkpointing: bool = False
    amp: str = "auto"
    seed: int = 0
    eval_blocks: int = 64

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        if not p.exists():
            raise DataError(f"training config {p} not found")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"training config {p} is not valid JSON: {e}") from e
        model = {**DEFAULT_LM_ARGS, **d.pop("model", {})}
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise DataError(f"unknown training config keys {bad}; known: {sorted(known)}")
        return cls(model=model, **d)


class MoEBalanceHook(TrainerHook):
    """After each optimizer step, nudge every gate's routing bias toward balance (aux-loss-free)."""

    name = "moe_balance"

    def __init__(self, enabled: bool = True, schedule: str = "constant", min_ratio: float = 0.1,
                 window: int = 1) -> None:
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"bias update schedule must be 'constant' or 'cosine', not {schedule!r}")
        if window < 1:
            raise ValueError(f"bias update window must be >= 1 step, not {window}")
        self.enabled, self.schedule, self.min_ratio, self.window = enabled, schedule, min_ratio, window

    def gamma(self, base: float, step: int, total: int | None) -> float:
        """The bias step at optimizer step ``step`` (0-based) of ``total``."""
        if self.schedule == "constant" or not total:
            return base
        t = min(1.0, step / max(1, total - 1))
        return base * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def after_step(self, trainer: Any, loss: float) -> None:
        model: DeepseekV3 = trainer.model
        if self.enabled:
            # after_step runs once global_step has been incremented; the gates' load counters keep
            # adding up until an update resets them, so an update every ``window`` steps sees their sum
            if trainer.global_step % self.window == 0:
                model.update_balance_bias(self.gamma(model.args.bias_update_speed, trainer.global_step - 1,
                                                     trainer.total_steps))
        else:  # still reset the counters so they do not grow without bound
            for g in model.gates():
                g.load.zero_()


@torch.no_grad()
def measure_balance(model: DeepseekV3, blocks: torch.Tensor, batch_size: int = 16) -> dict[str, Any]:
    """Expert load max/mean per MoE layer on ``blocks`` (eval mode), plus mean next-token loss."""
    model.eval()
    for g in model.gates():
        g.load.zero_()
        g.track_load = True
    losses = []
    try:
        for i in range(0, len(blocks), batch_size):
            b = blocks[i:i + batch_size]
            losses.append(float(model.compute_loss(b)["lm_loss"]))
        per_layer = [round(float(g.load.max() / g.load.mean()), 3) for g in model.gates() if g.load.sum() > 0]
        worst = expert_load_imbalance(model)
    finally:
        for g in model.gates():
            g.track_load = False
            g.load.zero_()
    return {"max_over_mean_load": round(worst, 3), "per_layer": per_layer,
            "mean_max_over_mean": round(sum(per_layer) / max(len(per_layer), 1), 3),
            "dev_loss": round(sum(losses) / max(len(losses), 1), 4)}


def prepare_data(cfg: TrainConfig, data_root: Path, tokenizer: Tokenizer | None = None
                 ) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """Train (or reuse) the tokenizer and pack train / dev blocks."""
    if tokenizer is None:
        docs = iter_documents(data_root, cfg.corpora, "train", cfg.tokenizer_docs_per_corpus)
        tokenizer = Tokenizer.train(docs, vocab_size=int(cfg.model.get("vocab_size", 4096)))
    train_docs = list(iter_documents(data_root, cfg.corpora, "train", cfg.docs_per_corpus))
    dev_corpora = [c for c in cfg.corpora if c != "banking77"]  # banking77 has no dev split here
    dev_docs = list(iter_documents(data_root, dev_corpora, "dev" if dev_corpora else "train", 200))
    train = pack(tokenizer.encode_batch(train_docs), cfg.seq_len, tokenizer.bos_id, tokenizer.eos_id)
    dev = pack(tokenizer.encode_batch(dev_docs), cfg.seq_len, tokenizer.bos_id, tokenizer.eos_id)
    g = torch.Generator().manual_seed(cfg.seed)
    dev = dev[torch.randperm(len(dev), generator=g)[:cfg.eval_blocks]]
    return tokenizer, train, dev


MIX_DOCS_PER_CORPUS = 200  # documents per corpus in the dev-mix balance text (the dev splits give 200 too)


def dev_mix_blocks(cfg: TrainConfig, data_root: Path, tokenizer: Tokenizer) -> torch.Tensor:
    """``eval_blocks`` seeded held-out blocks in the training corpus mix, for the balance measure next to
    the dev one: the dev blocks come from the corpora with a dev split only (no Banking77); here each
    training corpus gives ``MIX_DOCS_PER_CORPUS`` documents, from its dev split, or for Banking77 (no dev
    split) from the training documents past ``docs_per_corpus``, which training never reads. Empty when
    a corpus without a dev split has no such documents (no cap)."""
    docs: list[str] = []
    for c in cfg.corpora:
        if c != "banking77":
            docs += iter_documents(data_root, [c], "dev", MIX_DOCS_PER_CORPUS)
            continue
        if cfg.docs_per_corpus is None:
            return torch.zeros(0, cfg.seq_len, dtype=torch.long)
        unseen = list(iter_documents(data_root, [c], "train", cfg.docs_per_corpus + MIX_DOCS_PER_CORPUS))
        if len(unseen) <= cfg.docs_per_corpus:
            return torch.zeros(0, cfg.seq_len, dtype=torch.long)
        docs += unseen[cfg.docs_per_corpus:]
    blocks = pack(tokenizer.encode_batch(docs), cfg.seq_len, tokenizer.bos_id, tokenizer.eos_id)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return blocks[torch.randperm(len(blocks), generator=g)[:cfg.eval_blocks]]


def train_lm(out_dir: str | Path, cfg: TrainConfig | None = None, *, data_root: str | Path | None = None,
             progress: bool = True, tokenizer: Tokenizer | None = None,
             step_callback: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train a DeepSeek-V3 LM on the shared corpora and save it (HF layout + tokenizer) to ``out_dir``."""
    cfg = cfg or TrainConfig()
    root = Path(data_root) if data_root is not None else get_settings().data_root
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    tokenizer, train, dev = prepare_data(cfg, root, tokenizer)
    args = ModelArgs(**{**cfg.model, "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
                        "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id})
    model = DeepseekV3(args)
    hooks: list[TrainerHook] = [MoEBalanceHook(cfg.balance_bias, cfg.bias_update_schedule,
                                                 cfg.bias_update_min_ratio, cfg.bias_update_window)]
    if step_callback is not None:
        hooks.append(_CallbackHook(step_callback))
    trainer = Trainer(model, lambda m, b: m.compute_loss(b)["loss"], lr=cfg.lr, weight_decay=cfg.weight_decay,
                      warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, amp=cfg.amp,  # type: ignore[arg-type]
                      gradient_checkpointing=cfg.gradient_checkpointing, hooks=hooks, progress=progress,
                      device="cpu" if not torch.cuda.is_available() else None)
    loader = BlockLoader(train, cfg.batch_size, cfg.seed)
    stats = trainer.fit(loader, epochs=math.ceil(cfg.steps / len(loader)), max_steps=cfg.steps, task_id="lm")
    model = trainer.model.float().cpu().eval()
    balance = measure_balance(model, dev)
    mix = dev_mix_blocks(cfg, root, tokenizer)
    balance_mix = measure_balance(model, mix) if len(mix) else {}
    out = Path(out_dir)
    save_pretrained(model, out, tokenizer)
    metrics = {"params": model.num_parameters(), "active_params": model.num_parameters(active=True),
               "train_blocks": len(train), "seq_len": cfg.seq_len, "steps": stats["steps"],
               "final_train_loss": round(stats["loss"], 4), "tokens_per_s": round(stats["tokens_per_s"], 1),
               "train_seconds": round(stats["seconds"], 1), "total_seconds": round(time.perf_counter() - t0, 1),
               "amp_dtype": str(trainer.amp_dtype).replace("torch.", ""), "balance_bias": cfg.balance_bias,
               **{f"dev_{k}" if k != "dev_loss" else k: v for k, v in balance.items()},
               **{f"dev_mix_{k}" if k != "dev_loss" else "dev_mix_loss": v for k, v in balance_mix.items()},
               "config": asdict(cfg)}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


class _CallbackHook(TrainerHook):
    name = "callback"

    def __init__(self, fn: Callable[[int, float], None]) -> None:
        self.fn = fn

    def after_step(self, trainer: Any, loss: float) -> None:
        self.fn(trainer.global_step, loss)


def default_lm_dir() -> Path:
    return get_settings().model_dir("core", "lm-default")


def default_lm_ready(path: Path | None = None) -> bool:
    d = path or get_settings().models_dir / "core" / "lm-default"
    return all((d / f).exists() for f in (CONFIG, WEIGHTS, TOKENIZER_FILE))


def ensure_default_lm(progress: bool = True, cfg: TrainConfig | None = None,
                      step_callback: Callable[[int, float], None] | None = None) -> Path:
    """Directory of the default LM (HF layout + tokenizer), trained first if it is missing."""
    d = default_lm_dir()
    if default_lm_ready(d):
        return d
    with open(d.parent / "lm-default.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training it right now
        if default_lm_ready(d):
            return d
        tmp = d.parent / "lm-default.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("training the default core LM into %s", d)
        train_lm(tmp, cfg, progress=progress, step_callback=step_callback)
        shutil.rmtree(d, ignore_errors=True)
        tmp.replace(d)
    return d


def load_default_lm(progress: bool = True) -> tuple[DeepseekV3, Tokenizer]:
    """The default model (eval mode, fp32, CPU) and its tokenizer."""
    d = ensure_default_lm(progress=progress)
    return load_pretrained(d), Tokenizer.load(d)
