"""Text generation for ``DeepseekV3``: latent KV cache, greedy / temperature / top-p sampling,
streaming, batches of prompts with different lengths, and MTP self-speculative decoding.

Data contract:
    in:  prompts as lists of token ids (a batch may mix lengths; they are left-padded internally)
    out: the new token ids per prompt (prompt not included), stopping at ``eos_token_id`` (kept)

The cache (``LatentCache``) holds only ``kv_lora_rank + qk_rope_head_dim`` numbers per token per layer;
decode steps attend in latent space (MLA "absorb" mode).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from core.errors import DataError
from core.model.deepseek import DeepseekV3


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    eos_token_id: int | None = None
    seed: int | None = None


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy when temperature <= 0; nucleus (top-p) otherwise."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        # Drop tokens once the mass *before* them already reaches top_p (the first token always stays).
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DataError("every prompt needs at least one token")
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), n, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, n - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def stream(model: DeepseekV3, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None
           ) -> Iterator[list[int | None]]:
    """Yield one list per decode step: the new token of each prompt, or None once that prompt finished."""
    p = params or SamplingParams()
    vocab = model.args.vocab_size
    for pr in prompts:
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in pr):
            raise DataError(f"prompt token ids must be integers in [0, {vocab})")
    device = model.lm_head.weight.device
    ids, mask = _left_pad(prompts, p.eos_token_id or 0, device)
    B, n = ids.shape
    max_len = n + p.max_new_tokens
    if max_len > model.args.max_position_embeddings:
        raise DataError(f"prompt ({n}) + max_new_tokens ({p.max_new_tokens}) exceeds the model's "
                        f"context of {model.args.max_position_embeddings} tokens")
    gen = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
    cache = model.new_cache(B, max_len)
    padded = not bool(mask.all())
    logits = model(ids, attention_mask=mask if padded else None, cache=cache, logits_to_keep=1)[:, -1]
    done = [False] * B  # Python bookkeeping: one ``tolist`` per step is the only sync
    for step in range(p.max_new_tokens):
        nxt = sample_next(logits, p.temperature, p.top_p, gen)
        toks = nxt.tolist()
        yield [None if d else t for t, d in zip(toks, done, strict=True)]
        if p.eos_token_id is not None:
            done = [d or t == p.eos_token_id for t, d in zip(toks, done, strict=True)]
        if all(done) or step == p.max_new_tokens - 1:
            return
        step_mask = (torch.tensor([[0 if d else 1] for d in done], dtype=torch.long, device=device)
                     if (padded or any(done)) else None)
        logits = model(nxt[:, None], attention_mask=step_mask, cache=cache)[:, -1]


def generate(model: DeepseekV3, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None
             ) -> list[list[int]]:
    """New token ids for each prompt (batched, latent-cached)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, params):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out


@dataclass
class SpeculativeStats:
    main_forwards: int = 0
    drafted: int = 0  # draft tokens verified (``num_draft`` per main forward after the prompt)
    accepted: int = 0  # of those, accepted (a draft counts only when every earlier one of its chain did)
    first_drafted: int = 0
    first_accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Acceptance of the first draft of each chain (the next token's guess)."""
        return self.first_accepted / self.first_drafted if self.first_drafted else 0.0

    @property
    def acceptance_all(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_generate(model: DeepseekV3, prompt: Sequence[int], max_new_tokens: int = 64,
                         eos_token_id: int | None = None, stats: SpeculativeStats | None = None,
                         num_draft: int = 3) -> list[int]:
    """Greedy decoding where MTP module 0 drafts ``num_draft`` tokens ahead (the first from the main
    model's hidden state, later ones by chaining the module on its own output hidden and its previous
    draft) and the main model verifies all of them in one ``num_draft + 1``-token forward. Output is
    identical to plain greedy; each main forward yields 1 to ``num_draft + 1`` tokens. The default 3
    (a 4-token verify, the decode fast path's row limit) measured fastest on the trained default LM:
    chained drafts are accepted ~80% of the time after an accepted one, and a 4-token verify costs
    little more than a 2-token one on this dispatch-bound model (docs/BENCHMARKS.md, issue 3).

    State between iterations: main cache holds tokens x_0..x_{L-1}; ``nxt`` = x_L (not yet fed);
    the MTP cache holds pairs (h_i, x_{i+1}) for i < L-1 plus the newest, from which the first draft
    (guess of x_{L+1}) and MTP hidden ``hd`` were produced. Chained drafts write temporary MTP cache
    entries that are rolled back before the verify.
    """
    if not len(model.mtp):
        raise DataError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers >= 1)")
    if not isinstance(num_draft, int) or num_draft < 1:
        raise DataError(f"num_draft must be an integer >= 1 (got {num_draft!r})")
    st = stats if stats is not None else SpeculativeStats()
    device = model.lm_head.weight.device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    n = ids.shape[1]
    if n == 0:
        raise DataError("the prompt needs at least one token")
    max_len = n + max_new_tokens + num_draft + 1
    if max_len > model.args.max_position_embeddings:
        raise DataError("prompt + max_new_tokens exceeds the model's context")
    cache, mcache = model.new_cache(1, max_len), model.new_cache(1, max_len, mtp=True)
    out = model(ids, cache=cache, logits_to_keep=1, return_hidden=True)
    st.main_forwards += 1
    nxt = int(out.logits[0, -1].argmax())
    mlog, hd = model.mtp_forward(0, out.hidden, torch.cat([ids[:, 1:], ids.new_tensor([[nxt]])], 1), cache=mcache,
                                 logits_to_keep=1)
    result = [nxt]
    # Token ids stay Python ints: one argmax + one ``tolist`` per main forward, one ``int`` per draft.
    while len(result) < max_new_tokens and not (eos_token_id is not None and result[-1] == eos_token_id):
        drafts = [int(mlog[0, -1].argmax())]
        # Chain: later drafts only pay off while there are tokens left to produce.
        chain = min(num_draft, max_new_tokens - len(result)) - 1
        for _ in range(chain):
            m2, hd = model.mtp_forward(0, hd[:, -1:], ids.new_tensor([[drafts[-1]]]), cache=mcache, logits_to_keep=1)
            drafts.append(int(m2[0, -1].argmax()))
        if chain > 0:
            mcache.truncate(mcache.length - chain)
        out = model(ids.new_tensor([[nxt, *drafts]]), cache=cache, return_hidden=True)  # positions L..L+len
        st.main_forwards += 1
        true = out.logits[0].argmax(-1).tolist()
        a = 0
        while a < len(drafts) and true[a] == drafts[a]:
            a += 1
        st.drafted += len(drafts)
        st.accepted += a
        st.first_drafted += 1
        st.first_accepted += a > 0
        new = true[:a + 1]
        stop = False
        for t in new:
            result.append(t)
            if (eos_token_id is not None and t == eos_token_id) or len(result) >= max_new_tokens:
                stop = True
                break
        if stop:
            break
        if a < len(drafts):
            cache.truncate(cache.length - (len(drafts) - a))  # forget the rejected drafts' latents
        nxt = new[-1]
        mlog, hd = model.mtp_forward(0, out.hidden[:, :a + 1], ids.new_tensor([new]), cache=mcache,
                                     logits_to_keep=1)
    return result[:max_new_tokens]


def kv_cache_bytes_per_token_per_layer(model: DeepseekV3, dtype_bytes: int = 4) -> dict[str, int]:
    """Ours (latent + shared rope key) vs a standard multi-head cache of the same head shape."""
    a = model.args
    ours = (a.kv_lora_rank + a.qk_rope_head_dim) * dtype_bytes
    mha = a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) * dtype_bytes
    return {"ours": ours, "standard_mha": mha}
