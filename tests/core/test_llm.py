"""ChatVerticals: LangChain's standard unit tests plus real invoke / stream / batch on a tiny model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from core.errors import DataError
from core.llm import ChatVerticals

_TINY_DIR = Path(tempfile.mkdtemp(prefix="chatverticals-"))


def _build_tiny(d: Path) -> None:
    """A tiny random LM with a real byte-level BPE tokenizer, in the HF layout."""
    from core.model.deepseek import DeepseekV3, ModelArgs
    from core.model.hf import save_pretrained
    from core.model.tokenizer import Tokenizer

    if (d / "tokenizer.json").exists():
        return
    tok = Tokenizer.train(["Your card will arrive within five business days.", "No pleural effusion."] * 20,
                          vocab_size=300)
    torch.manual_seed(0)
    m = DeepseekV3(ModelArgs(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                             moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                             n_routed_experts=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                             v_head_dim=8, max_position_embeddings=128, initializer_range=0.2,
                             bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    save_pretrained(m, d, tok)


class TestChatVerticalsStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatVerticals]:
        return ChatVerticals

    @property
    def chat_model_params(self) -> dict:
        return {"model_dir": str(_TINY_DIR)}


@pytest.fixture(scope="module")
def chat() -> ChatVerticals:
    _build_tiny(_TINY_DIR)
    return ChatVerticals(model_dir=str(_TINY_DIR), max_tokens=12)


def test_invoke_stream_batch_agree(chat: ChatVerticals) -> None:
    msgs = [SystemMessage("You are a bank agent."), HumanMessage("Where is my card?")]
    out = chat.invoke(msgs)
    assert isinstance(out, AIMessage) and isinstance(out.content, str)
    assert out.usage_metadata["input_tokens"] > 5 and 0 < out.usage_metadata["output_tokens"] <= 12
    streamed = "".join(c.content for c in chat.stream(msgs))
    assert streamed == out.content  # greedy: streaming yields the same text
    batch = chat.batch([msgs, [HumanMessage("Hello")]])
    assert batch[0].content == out.content and len(batch) == 2


def test_stop_sequences_and_bad_input(chat: ChatVerticals) -> None:
    full = chat.invoke("No pleural").content
    if len(full) > 3:
        cut = full[2:4]
        assert cut not in chat.invoke("No pleural", stop=[cut]).content
    with pytest.raises(DataError):
        chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])
    with pytest.raises(DataError):
        chat.invoke("hi", max_tokens=1000)  # no room for the prompt in a 128-token context
