"""The default core LM and the text files the quantized-runtime benchmark reads.

Calibration / distillation text = documents of the corpora's *train* splits; held-out text = their
*dev* splits (the default LM never trains on dev; banking77 has no dev split and is left out there,
as in ``core.model.default``). Both are written once as JSONL under ``$VERTICALS_HOME/cache/quant``
so the file-based commands (``quantize --calibration-data``, ``eval-ppl --data``) read the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.settings import get_settings


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tmp.replace(path)
    return path


def bench_texts(per_corpus_train: int = 300, per_corpus_dev: int = 200) -> tuple[Path, Path]:
    """(train-split text file, dev-split text file) from the default LM's corpora."""
    from core.model.data import CORPORA, iter_documents

    s = get_settings()
    cache = s.home / "cache" / "quant"
    train_f = cache / f"lm_train_{per_corpus_train}.jsonl"
    dev_f = cache / f"lm_heldout_{per_corpus_dev}.jsonl"
    if not train_f.exists():
        # Skip the first documents per corpus: the LM's tokenizer was fitted on the leading ones.
        _write_jsonl(train_f, list(iter_documents(s.data_root, CORPORA, "train", per_corpus_train)))
    if not dev_f.exists():
        dev_corpora = [c for c in CORPORA if c != "banking77"]
        _write_jsonl(dev_f, list(iter_documents(s.data_root, dev_corpora, "dev", per_corpus_dev)))
    return train_f, dev_f


# A smaller LM of the same architecture for when the default one is not stored and cannot be trained
# in the time a benchmark has (the default takes 400 steps of a ~9M-parameter model).
BENCH_LM_MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=0)


def bench_lm(steps: int = 150) -> Path:
    """The quant bench's own small LM (core.model.default.train_lm, smaller config), trained once."""
    from core.model.default import DEFAULT_LM_ARGS, TrainConfig, train_lm
    from core.model.hf import CONFIG, WEIGHTS

    d = get_settings().model_dir("quant", f"bench-lm-{steps}")
    if (d / CONFIG).exists() and (d / WEIGHTS).exists():
        return d
    cfg = TrainConfig(model={**DEFAULT_LM_ARGS, **BENCH_LM_MODEL}, docs_per_corpus=600, tokenizer_docs_per_corpus=300,
                      seq_len=64, batch_size=16, steps=steps, lr=3e-3, warmup_steps=10, eval_blocks=16)
    tmp = d.with_name(d.name + ".partial")
    train_lm(tmp, cfg, progress=True)
    tmp.replace(d)
    return d


def default_lm_with_texts(quick: bool = False, lm: str = "default") -> tuple[Path, Path, Path]:
    """(LM dir, train text, held-out text). ``lm``: "default" (core.model.default, trained first when
    absent), "bench" (the smaller bench LM), or "auto" (the default when stored, else the bench LM)."""
    from core.model.default import default_lm_ready, ensure_default_lm

    if lm == "default" or (lm == "auto" and default_lm_ready()):
        lm_dir = ensure_default_lm(progress=True)
    else:
        lm_dir = bench_lm(40 if quick else 150)
    train_f, dev_f = bench_texts(100 if quick else 300, 50 if quick else 200)
    return lm_dir, train_f, dev_f
