"""Text corpora for the core LM, read from the shared data folder, and packing into training batches.

Named inputs (under ``data_root``; train splits only, dev splits stay for evaluation):
    customer_service/sgd/train/dialogues.json.gz   dialogues -> chat format (<|user|> / <|assistant|>)
    customer_service/star/dialogues.json.gz        wizard-of-oz dialogues -> chat format
    customer_service/banking77/train.csv           customer queries (one per document)
    medical/medpix2/images_train.jsonl             image captions
    medical/medpix2/cases_train.jsonl              case history / findings / diagnosis / discussion
    medical/iu_xray_reports/reports.json           chest X-ray reports ("train")
Output: documents (str); ``pack`` turns them into (N, seq_len) token blocks separated by <|eos|>.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from core.errors import DataError
from core.settings import get_settings

log = logging.getLogger(__name__)

CORPORA = ("sgd", "star", "banking77", "medpix_captions", "medpix_cases", "iu_xray")


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise DataError(f"missing data file {path}")
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        return _loads(raw)
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"cannot parse {path}: {e}") from e


try:  # orjson parses SGD's 135 MB JSON several times faster than the standard library
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        raise DataError(f"missing data file {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n} is not valid JSON: {e}") from e


def chat_text(turns: Sequence[tuple[str, str]]) -> str:
    """Render (role, text) turns in the tokenizer's chat format (special tokens as text)."""
    tag = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
    return "".join(f"{tag[r]}{t.strip()}" for r, t in turns if t and t.strip())


def iter_documents(data_root: str | Path, corpora: Sequence[str] = CORPORA, split: str = "train",
                   limit_per_corpus: int | None = None) -> Iterator[str]:
    """Yield documents from the shared corpora (see module docstring)."""
    root = Path(data_root)
    unknown = set(corpora) - set(CORPORA)
    if unknown:
        raise DataError(f"unknown corpora {sorted(unknown)}; choose from {', '.join(CORPORA)}")
    for name in corpora:
        n = 0
        for doc in _cached(root, name, split):
            if doc.strip():
                yield doc
                n += 1
                if limit_per_corpus is not None and n >= limit_per_corpus:
                    break


def _cached(root: Path, name: str, split: str) -> list[str]:
    """Documents of one corpus, cached as JSON lines under VERTICALS_HOME/cache (SGD's 135 MB JSON takes
    a minute to parse on a busy 2-core VM; the cache is keyed by the source files' size and mtime)."""
    key = (str(root.resolve()), name, split)
    if key in _MEMO:
        return _MEMO[key]
    sources = sorted(p for p in root.glob(_SOURCES[name].format(split=split)) if p.is_file())
    stamp = hashlib.sha1(json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime) for p in sources]).encode())
    cache = get_settings().home / "cache" / "core_corpora" / f"{name}_{split}_{stamp.hexdigest()[:12]}.jsonl"
    if cache.exists():
        docs = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
    else:
        docs = list(_corpus(root, name, split))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        tmp.replace(cache)
    _MEMO[key] = docs
    return docs


_MEMO: dict[tuple[str, str, str], list[str]] = {}
_SOURCES = {"sgd": "customer_service/sgd/{split}/*", "star": "customer_service/star/dialogues*",
            "banking77": "customer_service/banking77/*.csv", "medpix_captions": "medical/medpix2/images_{split}*",
            "medpix_cases": "medical/medpix2/cases_{split}*", "iu_xray": "medical/iu_xray_reports/*.json"}


def _corpus(root: Path, name: str, split: str) -> Iterator[str]:
    cs, med = root / "customer_service", root / "medical"
    if name == "sgd":
        for d in _read_json(cs / "sgd" / split / "dialogues.json.gz"):
            yield chat_text([("user" if t["speaker"] == "USER" else "assistant", t["utterance"])
                             for t in d.get("turns", [])])
    elif name == "star":
        dialogues = _read_json(cs / "star" / "dialogues.json.gz")
        rng = random.Random(0)  # STAR has no official split: hold out a fixed 10% as dev
        for d in dialogues:
            in_dev = rng.random() < 0.1
            if in_dev != (split != "train"):
                continue
            yield chat_text([("user" if e.get("Agent") == "User" else "assistant", e.get("Text", ""))
                             for e in d.get("Events", []) if e.get("Action") == "utter"])
    elif name == "banking77":
        if split == "train":
            path = cs / "banking77" / "train.csv"
            if not path.exists():
                raise DataError(f"missing data file {path}")
            with open(path, encoding="utf-8", newline="") as f:
                for row in csv.DictReader(f):
                    yield row.get("text", "")
    elif name == "medpix_captions":
        for r in _jsonl(med / "medpix2" / f"images_{split}.jsonl"):
            desc = r.get("Description") or {}
            parts = [desc.get("Modality"), desc.get("Plane"), r.get("Location"), desc.get("Caption")]
            yield ". ".join(str(p).strip() for p in parts if p)
    elif name == "medpix_cases":
        for r in _jsonl(med / "medpix2" / f"cases_{split}.jsonl"):
            c = r.get("Case") or {}
            fields = ("Title", "History", "Exam", "Findings", "Differential Diagnosis", "Case Diagnosis",
                      "Discussion")
            yield "\n".join(f"{k}: {str(c[k]).strip()}" for k in fields if c.get(k))
    elif name == "iu_xray":
        reports = _read_json(med / "iu_xray_reports" / "reports.json")
        for r in reports.get("train" if split == "train" else "val", []):
            yield r.get("report", "")


def pack(token_docs: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Concatenate ``<|bos|> doc <|eos|>`` streams and cut into (N, seq_len) blocks (tail dropped)."""
    stream: list[int] = []
    for d in token_docs:
        stream.append(bos_id)
        stream.extend(d)
        stream.append(eos_id)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"corpus too small: {len(stream)} tokens for blocks of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


class BlockLoader:
    """Shuffled mini-batches of packed blocks; ``len`` = batches per epoch."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.blocks, self.batch_size, self.seed, self.epoch = blocks, batch_size, seed, 0

    def __len__(self) -> int:
        return max(1, len(self.blocks) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.blocks), generator=g)
        for i in range(len(self)):
            yield self.blocks[order[i * self.batch_size:(i + 1) * self.batch_size]]
