"""``ChatVerticals``: the core DeepSeek-V3 LM as a LangChain chat model.

Implements ``_generate`` and ``_stream``; ``invoke`` / ``batch`` / ``stream`` (and their async forms)
come from ``BaseChatModel``. The checkpoint (HF layout + tokenizer.json) is loaded lazily on first use
and shared across instances pointing at the same directory; ``model_dir=None`` means the default LM
(``core.model.default.ensure_default_lm``, trained on first use when missing).

    from core.llm import ChatVerticals
    chat = ChatVerticals(max_tokens=64)
    chat.invoke([("system", "You are a bank agent."), ("user", "My card has not arrived.")])
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, SecretStr

from core.errors import DataError

_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _runtime(model_dir: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) for a checkpoint directory (None = default LM); cached per process."""
    from core.model.default import load_default_lm
    from core.model.hf import load_pretrained
    from core.model.tokenizer import Tokenizer

    if model_dir is None:
        return load_default_lm(progress=True)
    return load_pretrained(model_dir), Tokenizer.load(model_dir)


def _text(content: Any) -> str:
    """Message content (str or list of content blocks) -> plain text; non-text blocks are refused."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise DataError(f"ChatVerticals accepts text only; got a {kind!r} content block")
    return "".join(parts)


def _role(m: BaseMessage) -> str:
    if isinstance(m, SystemMessage):
        return "system"
    if isinstance(m, AIMessage):
        return "assistant"
    return "user"  # human, tool and function results are shown to the model as user turns


class ChatVerticals(BaseChatModel):
    """Chat with the project's own DeepSeek-V3-architecture LM (local CPU/GPU inference)."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str = Field(default="verticals-core-lm", alias="model")
    model_dir: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int | None = 128
    stop: list[str] | None = None
    seed: int | None = None
    # Accepted for LangChain's standard parameters; a local model has no use for them.
    timeout: float | None = None
    max_retries: int = 0
    streaming: bool = False
    api_key: SecretStr | None = None

    @property
    def _llm_type(self) -> str:
        return "verticals-core"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "model_dir": self.model_dir, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens}

    # -- core -----------------------------------------------------------------------------------
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
                 ) -> tuple[Any, Any, list[int], Any, list[str]]:
        from core.model.generate import SamplingParams

        if not messages:
            raise DataError("no messages to answer")
        model, tok = _runtime(str(Path(self.model_dir).resolve()) if self.model_dir else None)
        turns = [(_role(m), _text(m.content)) for m in messages]
        ids = tok.chat_ids(turns)
        max_new = int(kwargs.get("max_tokens") or self.max_tokens or 128)
        budget = model.args.max_position_embeddings - max_new
        if budget < 8:
            raise DataError(f"max_tokens={max_new} leaves no room for the prompt in a "
                            f"{model.args.max_position_embeddings}-token context")
        if len(ids) > budget:  # keep the most recent context (and the trailing <|assistant|>)
            ids = [tok.bos_id, *ids[-(budget - 1):]]
        params = SamplingParams(max_new_tokens=max_new, temperature=float(kwargs.get("temperature", self.temperature)),
                                top_p=float(kwargs.get("top_p", self.top_p)), eos_token_id=tok.eos_id,
                                seed=kwargs.get("seed", self.seed))
        stops = list(stop or self.stop or [])
        return model, tok, ids, params, stops

    def _iter_text(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (text delta, info) while decoding; info carries token counts and the finish reason."""
        from core.model.generate import stream

        model, tok, ids, params, stops = self._prepare(messages, stop, kwargs)
        stop_ids = tok.stop_ids()
        out: list[int] = []
        shown, reason = "", "length"
        with _LOCK:  # one decode at a time per process: the model is shared
            for step in stream(model, [ids], params):
                t = step[0]
                if t is None or t in stop_ids:
                    reason = "stop"
                    break
                out.append(t)
                text = tok.decode(out)
                cut = min((text.find(s) for s in stops if s and s in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                if text.endswith("\ufffd") and cut < 0:  # incomplete UTF-8 sequence: wait for more bytes
                    continue
                if len(text) > len(shown):
                    yield text[len(shown):], {}
                    shown = text
                if cut >= 0:
                    break
        yield "", {"input_tokens": len(ids), "output_tokens": len(out), "finish_reason": reason}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        text, info = "", {}
        for delta, meta in self._iter_text(messages, stop, kwargs):
            text += delta
            info = meta or info
        usage = UsageMetadata(input_tokens=info["input_tokens"], output_tokens=info["output_tokens"],
                              total_tokens=info["input_tokens"] + info["output_tokens"])
        msg = AIMessage(content=text, usage_metadata=usage,
                        response_metadata={"model_name": self.model_name, "finish_reason": info["finish_reason"]})
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for delta, info in self._iter_text(messages, stop, kwargs):
            if info:
                usage = UsageMetadata(input_tokens=info["input_tokens"], output_tokens=info["output_tokens"],
                                      total_tokens=info["input_tokens"] + info["output_tokens"])
                yield ChatGenerationChunk(message=AIMessageChunk(
                    content="", usage_metadata=usage, chunk_position="last",
                    response_metadata={"model_name": self.model_name, "finish_reason": info["finish_reason"]}))
                return
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk


__all__ = ["ChatVerticals", "HumanMessage"]
