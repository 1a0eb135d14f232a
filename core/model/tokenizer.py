"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on the project's corpora, saved as
``tokenizer.json`` beside the model checkpoint.

Special tokens: ``<|bos|>``, ``<|eos|>``, ``<|pad|>``, the chat roles ``<|system|>``, ``<|user|>``,
``<|assistant|>`` and ``<|image|>`` (placeholder for image prefix positions). A chat is rendered as
``<|bos|><|system|>...<|user|>...<|assistant|>...<|eos|>``; generation for a reply starts right after
the last ``<|assistant|>`` and stops at ``<|eos|>`` or the next role token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from core.errors import DataError, ModelNotReady

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|image|>"]
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
TOKENIZER_FILE = "tokenizer.json"
MAX_TEXT_CHARS = 1_000_000  # refuse to tokenize absurdly large single inputs


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the project's special tokens and chat format."""

    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise DataError(f"tokenizer lacks special tokens {missing}")
        self.pad_id, self.bos_id, self.eos_id = (tok.token_to_id(t) for t in SPECIAL_TOKENS[:3])
        self.image_id = tok.token_to_id("<|image|>")
        self.role_ids = {r: tok.token_to_id(t) for r, t in ROLE_TOKENS.items()}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    # -- training / io -----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on an iterator of documents."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / TOKENIZER_FILE))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
               "pad_token": "<|pad|>", "additional_special_tokens": SPECIAL_TOKENS[3:]}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        return d / TOKENIZER_FILE

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        f = Path(directory) / TOKENIZER_FILE
        if not f.exists():
            raise ModelNotReady(f"no {TOKENIZER_FILE} in {directory}; train the model first")
        try:
            return cls(HFTokenizer.from_file(str(f)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"cannot read tokenizer {f}: {e}") from e

    # -- encode / decode ---------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise DataError(f"expected text, got {type(text).__name__}")
        if len(text) > MAX_TEXT_CHARS:
            raise DataError(f"text of {len(text):,} characters exceeds the {MAX_TEXT_CHARS:,} limit")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def chat_ids(self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """messages: (role, text) with role in system/user/assistant -> ids ending with ``<|assistant|>``."""
        ids = [self.bos_id]
        for role, text in messages:
            if role not in self.role_ids:
                raise DataError(f"unknown chat role {role!r}; use system, user or assistant")
            ids += [self.role_ids[role], *self.encode(text)]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
        return ids

    def stop_ids(self) -> set[int]:
        """Tokens that end an assistant reply."""
        return {self.eos_id, self.bos_id, *self.role_ids.values()}
