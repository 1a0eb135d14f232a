"""Text in, token batches out: calibration, distillation and perplexity data for ``core.quant``.

Data contract:
    in:  a text file: ``.txt`` (blank-line separated paragraphs, or one text per line), ``.jsonl``
         (a ``text`` field, else the first string field), ``.json`` (a list of strings or of objects
         with ``text``); any of them optionally gzipped (``.gz``)
    out: LongTensor batches (B, T) cut from the concatenated token stream (texts joined by EOS)
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.errors import DataError, VerticalsError

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 512 * 1024 * 1024


def _open_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB; pass a smaller sample")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e


def _text_of(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        if isinstance(obj.get("text"), str):
            return obj["text"]
        for v in obj.values():
            if isinstance(v, str) and v.strip():
                return v
    return None


def read_texts(path: str | Path) -> list[str]:
    """Every non-empty text in the file, in order. Malformed JSON -> DataError with the line number."""
    p = Path(path)
    body = _open_text(p)
    kind = p.name[:-3] if p.name.endswith(".gz") else p.name
    texts: list[str] = []
    if kind.endswith(".jsonl"):
        for i, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                t = _text_of(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from e
            if t:
                texts.append(t)
    elif kind.endswith(".json"):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of texts or of objects with 'text'")
        texts = [t for t in (_text_of(x) for x in data) if t]
    else:
        paras = [b.strip() for b in body.split("\n\n")]
        texts = [b for b in paras if b] if len(paras) > 1 else [ln.strip() for ln in body.splitlines() if ln.strip()]
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{p} holds no text")
    return texts


def encode_texts(texts: Sequence[str], tokenizer: Any, eos_id: int | None, max_tokens: int) -> list[int]:
    """One token stream: tokenizer(text) + [eos] per text, up to ``max_tokens``."""
    out: list[int] = []
    for t in texts:
        ids = list(tokenizer.encode(t))
        out.extend(ids + ([eos_id] if eos_id is not None else []))
        if len(out) >= max_tokens:
            break
    return out[:max_tokens]


def chunk_batches(stream: Sequence[int], seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Cut a token stream into (B, T) LongTensors (the ragged tail is dropped)."""
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"only {len(stream)} tokens of text: need at least {seq_len} (one sequence)")
    t = torch.tensor(list(stream[:n * seq_len]), dtype=torch.long).view(n, seq_len)
    return [t[i:i + batch_size] for i in range(0, n, batch_size)]


def token_batches(path: str | Path, tokenizer: Any, *, seq_len: int = 128, batch_size: int = 4,
                  max_tokens: int = 65536, eos_id: int | None = None) -> list[torch.Tensor]:
    """read_texts -> encode_texts -> chunk_batches."""
    if seq_len < 2:
        raise DataError("seq_len must be >= 2")
    return chunk_batches(encode_texts(read_texts(path), tokenizer, eos_id, max_tokens), seq_len, batch_size)


class HFTokenizer:
    """``tokenizers.Tokenizer`` behind encode(str) -> list[int] / decode(list[int]) -> str."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise DataError(f"cannot load tokenizer {path}: {e}") from e

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer saved beside a model: core.model.tokenizer when it can load it, else tokenizer.json."""
    d = Path(model_dir)
    try:
        from core.model import tokenizer as core_tok  # the core model's own wrapper, when present
    except ImportError:
        core_tok = None
    cls = getattr(core_tok, "Tokenizer", None) if core_tok is not None else None
    if cls is not None and callable(getattr(cls, "load", None)):
        try:
            return cls.load(d)
        except (OSError, ValueError, VerticalsError) as e:
            log.info("core.model.tokenizer could not load %s (%s); trying tokenizer.json", d, e)
    f = d / "tokenizer.json"
    if not f.exists():
        raise DataError(f"no tokenizer beside the model in {d} (expected tokenizer.json)")
    return HFTokenizer(f)
