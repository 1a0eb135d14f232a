"""Tokenizer and corpora: byte-level BPE round trip, chat format, packing, bad files."""

from __future__ import annotations

import pytest
import torch

from core.errors import DataError, ModelNotReady
from core.model.data import BlockLoader, iter_documents, pack
from core.model.tokenizer import Tokenizer


def test_tokenizer_on_real_reports(tmp_home, shared_data, tmp_path) -> None:
    docs = list(iter_documents(shared_data, ["iu_xray", "medpix_captions"], "train", 150))
    assert len(docs) == 300 and all(isinstance(d, str) and d for d in docs)
    tok = Tokenizer.train(docs, vocab_size=600)
    text = "No pneumothorax or pleural effusion. Ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips
    tok.save(tmp_path)
    tok2 = Tokenizer.load(tmp_path)
    assert tok2.encode(text) == tok.encode(text)
    ids = tok.chat_ids([("system", "be brief"), ("user", "hi")])
    assert ids[0] == tok.bos_id and ids[-1] == tok.role_ids["assistant"] and tok.role_ids["user"] in ids
    with pytest.raises(DataError):
        tok.chat_ids([("robot", "x")])
    blocks = pack(tok.encode_batch(docs), 32, tok.bos_id, tok.eos_id)
    assert blocks.shape[1] == 32 and (blocks == tok.eos_id).sum() >= len(docs) - 2
    batches = list(BlockLoader(blocks, 8))
    assert len(batches) == len(blocks) // 8 and batches[0].shape == (8, 32)


def test_bad_inputs(tmp_home, tmp_path) -> None:
    with pytest.raises(DataError):
        list(iter_documents(tmp_path, ["iu_xray"]))  # missing file
    (tmp_path / "medical" / "iu_xray_reports").mkdir(parents=True)
    (tmp_path / "medical" / "iu_xray_reports" / "reports.json").write_text("{not json")
    with pytest.raises(DataError):
        list(iter_documents(tmp_path, ["iu_xray"]))
    with pytest.raises(DataError):
        list(iter_documents(tmp_path, ["nope"]))
    with pytest.raises(DataError):
        pack([[1, 2]], 64, 0, 1)
    with pytest.raises(ModelNotReady):
        Tokenizer.load(tmp_path)  # no tokenizer.json yet


def test_text_too_large_is_refused(shared_data, tmp_home) -> None:
    tok = Tokenizer.train(["hello world"] * 20, vocab_size=300)
    with pytest.raises(DataError):
        tok.encode("x" * 2_000_000)
    assert isinstance(torch.tensor(tok.encode("hello")), torch.Tensor)
