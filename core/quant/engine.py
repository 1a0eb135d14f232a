"""Serving engine: continuous batching of generation requests over one latent KV cache.

How a request flows:
    submit() -> waiting queue -> (next scheduler step) cache hit? finish at once
             -> prefill with the other newcomers (one left-padded batch) -> first token streamed (TTFT)
             -> its cache rows are spliced into the running batch -> one token per decode step,
                streamed to its handle -> finished rows leave the batch at the end of the step.

Requests that arrive while a batch is decoding join at the next step: the running cache and the
newcomers' cache are left-padded to a common length and concatenated along the batch axis. This is
exact because every row keeps its own RoPE positions (``LatentCache.pos``) and key mask, and the
cached rope keys already carry their rotation; padding columns are masked out.

The response cache maps a normalised input (Unicode NFKC, collapsed whitespace, the generation
parameters) to the finished token ids; only deterministic (greedy) requests are cached.

Data contract:
    in:  ``submit(prompt, params)`` with ``prompt`` a list of token ids or a str (needs a tokenizer
         with ``encode(str) -> list[int]`` / ``decode(list[int]) -> str``)
    out: a :class:`RequestHandle`: ``stream()`` yields token ids as they are produced, ``result()``
         the full list, ``text()`` the decoded string; ``ttft_s`` / ``latency_s`` timings
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from core.errors import DataError
from core.model.deepseek import DeepseekV3, LatentCache
from core.model.generate import SamplingParams, sample_next

log = logging.getLogger(__name__)
_DONE = object()


def normalize_prompt(text: str) -> str:
    """The response-cache key of a text prompt: NFKC, whitespace runs -> one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@dataclass
class RequestHandle:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    cache_key: tuple[Any, ...] | None
    tokens: list[int] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    from_cache: bool = False
    error: BaseException | None = None
    _q: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def _emit(self, tok: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(tok)
        self._q.put(tok)

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.finished_at = time.perf_counter()
        self._q.put(_DONE)
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Token ids as the engine produces them (blocks between steps)."""
        while True:
            item = self._q.get(timeout=timeout)
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout}s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    def text(self, timeout: float | None = None) -> str:
        if self._tokenizer is None:
            raise DataError("this engine has no tokenizer; use result() for token ids")
        return self._tokenizer.decode(self.result(timeout))

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted_at


@dataclass
class _Row:
    req: RequestHandle
    last: int
    gen: torch.Generator | None


class Engine:
    """Continuous-batching generation over a ``DeepseekV3`` (float or quantized in place).

    Use as a context manager (a background scheduler thread) or call :meth:`run_until_idle` to drive
    it synchronously. ``max_batch`` bounds the rows decoded together.
    """

    def __init__(self, model: DeepseekV3, tokenizer: Any | None = None, *, max_batch: int = 16,
                 cache_size: int = 1024, eos_token_id: int | None | Literal["model"] = "model") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        # "model": stop at the model's EOS; None: never stop early (fixed-length requests, benchmarks).
        self.eos_token_id = _eos_of(model) if eos_token_id == "model" else eos_token_id
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._rows: list[_Row] = []
        self._cache: LatentCache | None = None
        self._responses: collections.OrderedDict[tuple[Any, ...], list[int]] = collections.OrderedDict()
        self._cache_size = cache_size
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.cache_hits = 0
        self.max_rows_seen = 0

    # -- client side -----------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int] | str, params: SamplingParams | None = None) -> RequestHandle:
        p = params or SamplingParams(eos_token_id=self.eos_token_id)
        if p.eos_token_id is None:
            p = SamplingParams(**{**p.__dict__, "eos_token_id": self.eos_token_id})
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise DataError("text prompts need an engine with a tokenizer")
            norm = normalize_prompt(prompt)
            if not norm:
                raise DataError("the prompt is empty")
            ids = list(self.tokenizer.encode(norm))
            key_src: Any = ("text", norm)
        else:
            ids = [int(t) for t in prompt]
            key_src = ("ids", tuple(ids))
        vocab = self.model.args.vocab_size
        if not ids or any(t < 0 or t >= vocab for t in ids):
            raise DataError(f"the prompt must have at least one token id, all in [0, {vocab})")
        if len(ids) + p.max_new_tokens > self.model.args.max_position_embeddings:
            raise DataError(f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
                            f"model's context of {self.model.args.max_position_embeddings}")
        key = (key_src, p.max_new_tokens, p.eos_token_id) if p.temperature <= 0 else None
        h = RequestHandle(next(self._ids), ids, p, key, _tokenizer=self.tokenizer)
        with self._lock:
            self._waiting.append(h)
            self._lock.notify_all()
        return h

    def generate(self, prompts: Sequence[Sequence[int] | str], params: SamplingParams | None = None,
                 timeout: float | None = None) -> list[list[int]]:
        handles = [self.submit(p, params) for p in prompts]
        if self._thread is None:
            self.run_until_idle()
        return [h.result(timeout) for h in handles]

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="quant-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._rows:
                    self._lock.wait()
                if self._stop:
                    break
            self.step()
        for r in self._rows:
            r.req._finish(RuntimeError("engine stopped"))
        for h in self._waiting:
            h._finish(RuntimeError("engine stopped"))

    def run_until_idle(self) -> None:
        while self._waiting or self._rows:
            self.step()

    @property
    def active(self) -> int:
        return len(self._rows)

    # -- scheduler -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests (cache hits finish at once), then one decode step for every row."""
        newcomers: list[RequestHandle] = []
        with self._lock:
            while self._waiting and len(self._rows) + len(newcomers) < self.max_batch:
                h = self._waiting.popleft()
                hit = self._responses.get(h.cache_key) if h.cache_key is not None else None
                if hit is not None:
                    self._responses.move_to_end(h.cache_key)
                    h.from_cache = True
                    self.cache_hits += 1
                    for t in hit:
                        h._emit(t)
                    h._finish()
                else:
                    newcomers.append(h)
        try:
            if newcomers:
                self._admit(newcomers)
            if self._rows:
                self._decode()
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("engine step failed")
            for r in self._rows:
                r.req._finish(e)
            for h in newcomers:
                if not h.done:
                    h._finish(e)
            self._rows, self._cache = [], None
        self.steps += 1

    def _admit(self, reqs: list[RequestHandle]) -> None:
        n = max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(len(reqs), n, dtype=torch.long)
        mask = torch.zeros(len(reqs), n, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, n - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, n - len(r.prompt_ids):] = 1
        room = max(r.params.max_new_tokens for r in reqs)
        cache = self.model.new_cache(len(reqs), n + room)
        padded = not bool(mask.all())
        logits = self.model(ids, attention_mask=mask if padded else None, cache=cache, logits_to_keep=1)[:, -1]
        rows = []
        for i, r in enumerate(reqs):
            gen = torch.Generator().manual_seed(r.params.seed) if r.params.seed is not None else None
            tok = int(sample_next(logits[i:i + 1], r.params.temperature, r.params.top_p, gen)[0])
            r._emit(tok)
            rows.append(_Row(r, tok, gen))
        self._merge(rows, cache)
        self._retire()

    def _decode(self) -> None:
        cache = self._cache
        if cache is None:
            return
        need = cache.length + 1
        if need > cache.max_len:
            self._cache = cache = _resize(cache, need + 32)
        ids = torch.tensor([[r.last] for r in self._rows], dtype=torch.long)
        logits = self.model(ids, cache=cache)[:, -1]
        greedy = all(r.req.params.temperature <= 0 for r in self._rows)
        toks = logits.argmax(-1).tolist() if greedy else [
            int(sample_next(logits[i:i + 1], r.req.params.temperature, r.req.params.top_p, r.gen)[0])
            for i, r in enumerate(self._rows)]
        for r, t in zip(self._rows, toks, strict=True):
            r.last = int(t)
            r.req._emit(r.last)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self._retire()

    def _retire(self) -> None:
        keep = []
        for i, r in enumerate(self._rows):
            p = r.req.params
            if len(r.req.tokens) >= p.max_new_tokens or (p.eos_token_id is not None and r.last == p.eos_token_id):
                if r.req.cache_key is not None:
                    self._responses[r.req.cache_key] = list(r.req.tokens)
                    while len(self._responses) > self._cache_size:
                        self._responses.popitem(last=False)
                r.req._finish()
            else:
                keep.append(i)
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._cache = _select_rows(self._cache, keep) if keep else None

    def _merge(self, rows: list[_Row], new: LatentCache) -> None:
        if self._cache is None or not self._rows:
            self._cache, self._rows = new, rows
            return
        self._cache = _concat(self._cache, new)
        self._rows = self._rows + rows


# ---------------------------------------------------------------------------------------------------
# LatentCache surgery: every op keeps each row's keys, mask and RoPE position intact
# ---------------------------------------------------------------------------------------------------
def _empty_like(c: LatentCache, batch: int, max_len: int) -> LatentCache:
    out = LatentCache.__new__(LatentCache)
    out.kv = [torch.zeros(batch, max_len, t.shape[-1], dtype=t.dtype) for t in c.kv]
    out.key_mask = torch.zeros(batch, max_len, dtype=torch.bool)
    out.pos = torch.zeros(batch, dtype=torch.long)
    out.length, out.max_len = 0, max_len
    out.padded = False
    return out


def _mark_padded(c: LatentCache) -> LatentCache:
    """``padded``: some row has a masked slot in [0, length) (the model's decode fast path needs none)."""
    c.padded = not bool(c.key_mask[:, :c.length].all())
    return c


def _trim_left(c: LatentCache) -> int:
    """Number of leading columns that no row attends to (safe to drop)."""
    used = c.key_mask[:, :c.length].any(0)
    nz = torch.nonzero(used)
    return int(nz[0]) if len(nz) else c.length


def _select_rows(c: LatentCache, keep: list[int]) -> LatentCache:
    idx = torch.tensor(keep, dtype=torch.long)
    lead = _trim_left(_view_rows(c, idx))
    L = c.length - lead
    out = _empty_like(c, len(keep), max(c.max_len - lead, L + 1))
    for dst, src in zip(out.kv, c.kv, strict=True):
        dst[:, :L] = src[idx, lead:c.length]
    out.key_mask[:, :L] = c.key_mask[idx, lead:c.length]
    out.pos, out.length = c.pos[idx].clone(), L
    return _mark_padded(out)


def _view_rows(c: LatentCache, idx: torch.Tensor) -> LatentCache:
    v = LatentCache.__new__(LatentCache)
    v.kv, v.key_mask, v.pos, v.length, v.max_len = c.kv, c.key_mask[idx], c.pos[idx], c.length, c.max_len
    return _mark_padded(v)


def _concat(a: LatentCache, b: LatentCache) -> LatentCache:
    """Rows of a then b, right-aligned to a common length (left padding is masked)."""
    L = max(a.length, b.length)
    cap = max(L + (a.max_len - a.length), L + (b.max_len - b.length))
    out = _empty_like(a, len(a.pos) + len(b.pos), cap)
    off = 0
    for c in (a, b):
        n, s = len(c.pos), L - c.length
        for dst, src in zip(out.kv, c.kv, strict=True):
            dst[off:off + n, s:L] = src[:, :c.length]
        out.key_mask[off:off + n, s:L] = c.key_mask[:, :c.length]
        out.pos[off:off + n] = c.pos
        off += n
    out.length = L
    return _mark_padded(out)


def _resize(c: LatentCache, max_len: int) -> LatentCache:
    out = _empty_like(c, len(c.pos), max_len)
    for dst, src in zip(out.kv, c.kv, strict=True):
        dst[:, :c.length] = src[:, :c.length]
    out.key_mask[:, :c.length] = c.key_mask[:, :c.length]
    out.pos, out.length = c.pos.clone(), c.length
    return _mark_padded(out)


def _eos_of(model: DeepseekV3) -> int | None:
    e = model.args.eos_token_id
    return e[0] if isinstance(e, list) else e
