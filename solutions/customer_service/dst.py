"""Schema-guided dialogue state tracker on frozen MiniLM features with small trained heads.

Why this design: the CPU is small and shared, so the encoder is frozen (features computed once and
cached) and only five small heads are trained, each conditioned on a *schema description* embedding
rather than a slot/intent id. A service never seen in training is therefore tracked zero-shot from
its schema (descriptions of the service, intents, slots and categorical values).

Per user turn the encoder reads the pair ``(user utterance, previous system utterance)``:
  ``H``  (T, 384) contextual token embeddings; ``u``/``s`` (384,) mean of the user/system tokens.
Heads (all MLPs over concatenated features; ``d`` = a schema description embedding, 384-d):
  intent   [u, s, d, u*d, s*d, was_active]      -> score; softmax over the service's intents + NONE
  request  [u, d, u*d]                          -> P(slot requested this turn)
  status   slot-conditioned attention reader     -> {carry, update, dontcare, copy, recall}
  value    [u, s, d_v, u*d_v, s*d_v, lexical]   -> score; softmax over a categorical slot's values
  span     bilinear(H_t, d)                     -> (start, end) logits over the pair's tokens
Carry-over is rule-based: a slot keeps its value unless ``status`` says it changed this turn, so a
correction ("actually make it 7pm") is an ``update`` and a 15-turn-old value simply persists.
``copy`` fills a slot from another service's state (the restaurant's city becomes the ride's
destination) by the most similar slot description; ``recall`` takes a value the system offered in
one of the last ``RECALL_TURNS`` earlier turns ("How about Sino?" ... "What's their number?" ...
"OK, book it"), read by the span head from those turns' system tokens.

Data contract: state = ``{service: {"active_intent": str, "requested_slots": [str],
"slot_values": {slot: [value]}}}`` exactly like SGD frames, so the official evaluator reads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from solutions.customer_service.encoder import DIM, MiniLMEncoder

STATUS = ("carry", "update", "dontcare", "copy", "recall")
# "recall": the user accepts a value the system offered in an earlier turn, outside the (user, previous
# system) pair ("Okay, that sounds good. Can I schedule a visit?" two turns after the offer); the value
# is read by the span head from the system tokens of the last RECALL_TURNS earlier pairs.
RECALL_TURNS = 4
MAX_PAIR_TOKENS = 96
MAX_SPAN_TOKENS = 12
# Pairs per encoder call, after sorting by length: small batches pad little (a turn is ~20-60 tokens);
# 16 reads ~20% fewer padded tokens than 64 on real SGD turns at the same speed per token.
PAIR_BATCH = 16
# Conversations whose next turn runs through the heads in one call in ``track_sgd`` (see ``step_many``).
HEAD_BATCH = 32
# "Just one, please" must match the categorical value "1".
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass
class TrackerConfig:
    hidden: int = 256
    dropout: float = 0.1
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 1024
    seed: int = 13
    train_dialogues: int | None = None
    trained_services: list[str] = field(default_factory=list)
    # Decision biases (they do not change training), chosen on 80 held-out SGD *train* dialogues (never
    # dev): additive status logits (carry, update, dontcare, copy) and an additive logit for keeping the
    # previous active intent. Grid: carry -1..2, stay -1..2; best JGA 0.367 / intent acc 0.948 there.
    # Carry -1.0 and copy +0.5 since the seed ensemble averages the status and value / span logits (2026-11-24,
    # issue 7), on 2 x 400 held-out SGD *train* dialogues, 3-member tracker with value ensemble: carry -0.5 /
    # -1.0 / -1.5 JGA 0.6216 / 0.6350 / 0.6310 and 0.6349 / 0.6480 / 0.6391; then copy +0.5 / +1: 0.6380 /
    # 0.6384 and 0.6490 / 0.6490 (recall +0.5 / +1: 0.6351 / 0.6318 and 0.6448 / 0.6427, not adopted; README
    # "Slot-error breakdown"). Configs stored before it keep their own value (config.json carries it).
    status_logit_bias: list[float] | None = field(default_factory=lambda: [-1.0, 0.0, 0.0, 0.5, 0.0])
    # The stay logit is 0 since the heads are trained with ``intent_flag_noise`` (they trust the flag less by
    # themselves): 400 held-out train dialogues, intent heads on 4,000 dialogues, seeds 13 / 14 / 15, stay
    # -1 / 0 / +0.5: intent 0.940 / 0.950 / 0.950, 0.949 / 0.958 / 0.955, 0.947 / 0.962 / 0.959 (without the
    # noise, at -1: 0.944 / 0.947 / 0.951; BENCHMARKS).
    intent_stay_bias: float = 0.0
    # Training only: share of intent examples whose was-active flag is moved to another intent of the same
    # service (a simulated earlier tracking error, gold label unchanged), so the head learns to leave a wrong
    # intent when the turn says otherwise instead of carrying it on (0: flags as in the reference; the default
    # recipe uses 0.15, ``pipeline.DST_INTENT_FLAG_NOISE``).
    intent_flag_noise: float = 0.0
    # The same decisions for services the heads were not trained on (zero-shot from their schema);
    # ``None`` = as for seen services. Chosen on a pseudo-unseen run: heads trained without 7 training
    # services, scored on 120 held-out *train* dialogues with them (carry -0.5 / 0 / +0.5 / +1 / +2 on
    # unseen services: their JGA 0.081 / 0.089 / 0.093 / 0.084 / 0.087; intent stay bias -1 stays best).
    status_logit_bias_unseen: list[float] | None = field(default_factory=lambda: [0.5, 0.0, 0.0, 0.0, 0.0])
    # Unseen services keep -1 with the flag noise (pseudo-unseen heads, 2 x 150 held-out train dialogues:
    # unseen intent 0.810 / 0.819 / 0.820 / 0.809 and 0.796 / 0.811 / 0.795 / 0.787 at -1.5 / -1 / -0.5 / 0).
    intent_stay_bias_unseen: float | None = -1.0
    # A slot is requested when its request logit exceeds this; ``_unseen``: for services the heads were not
    # trained on (``None`` = the same). +1.5 chosen on a pseudo-unseen run of the 8,000-dialogue recipe (heads
    # without 7 training services, 2 x 150 held-out *train* dialogues with them, 1,829 unseen frames):
    # unseen req-F1 0.938 / 0.955 / 0.961 / 0.963 / 0.964 / 0.962 at -1.5 / 0 / 1 / 1.5 / 2 / 2.5, and
    # 0.955 / 0.960 / 0.960 / 0.960 / 0.958 without Calendar_1 (whose "available" slots look requested):
    # 1.5 is within 0.001 of the best both ways. The 4,000 recipe had preferred -1.5 (0.972 vs 0.964 at 0).
    # Seen services: 0 stays (-1 / -0.5 / 0 / 0.5: 0.988 / 0.989 / 0.987 / 0.984, 400 held-out train dialogues).
    request_threshold: float = 0.0
    request_threshold_unseen: float | None = 1.5
    # At most this many requested slots per frame, the highest request logits (``None``: no cap). No frame of
    # the 118,167 SGD train user frames requests more than 2 slots; on 400 held-out SGD *train* dialogues
    # (outside the 8,000 sample) the cap lifts req-F1 0.9870 -> 0.9875 at threshold 0 (BENCHMARKS).
    max_requested_slots: int | None = 2
    # One value, one slot: in SGD a new non-categorical value fills one slot of a service (train: 1 of 80,833
    # updates sets the same value on two slots of a service in one turn; 81 set a value another slot of the
    # service already holds, all numbers), but the heads often put one mention on sibling slots ("Sacramento"
    # as pickup city *and* pickup location, "15:30" as event time and available start / end time): the most
    # frequent false update of unseen services. 0: off; 1: among the slots a turn updates to the same value
    # (case-insensitive; non-categorical, not dontcare) only the one whose status (update / copy / recall) is the
    # most probable keeps it, the others keep their previous value; 2: also no new value that another slot of the service
    # already holds (unless the value is a number). ``_unseen``: for unseen services (``None`` = the same).
    # 1 since 2026-11-25 (issue 7), chosen on the pseudo-unseen harness (1-member heads without 7 training
    # services, 2 disjoint parts of 150 held-out *train* dialogues): unseen JGA 0.162 / 0.127 -> 0.208 / 0.180
    # with mode 1, 0.206 / 0.179 with mode 2 (prob. tie-break; status margin over carry 0.2075 / 0.1784, the first
    # slot 0.191 / 0.152), seen frames there 0.452 / 0.553 -> 0.471 / 0.554; on 2 x 400 held-out train dialogues
    # (seen services) see BENCHMARKS. A decision (no retraining): configs stored before it track with it too.
    unique_values: int = 1
    unique_values_unseen: int | None = None
    # Only intent arguments hold values: a slot that no intent of the service lists as required or optional
    # (``intent_slot_names``: result slots the system provides, e.g. Calendar_1's available start / end time, a
    # phone number) is never filled. A schema-structure rule, no slot-name list (SGD train: 0 of 382,981 user-turn
    # state values are on such slots). True since 2026-11-25 (issue 7), chosen on the pseudo-unseen harness:
    # unseen JGA 0.208 / 0.180 -> 0.215 / 0.186 (parts 0 / 1), seen frames unchanged there and on 2 x 400 held-out
    # train dialogues (0.6489 / 0.6498 both ways). A decision: configs stored before it track with it too.
    intent_slots_only: bool = True
    # Unseen services: a free-text slot that the frame's active intent does not take as an argument is filled
    # only from the system's words (an accepted offer: "that one sounds good"), not from the user's; the heads of
    # unseen services put user mentions on such slots (an event name while only looking up the calendar).
    # SGD train: of 9,618 updates of such slots, 1,303 have their value in the user turn (of 71,215 updates of
    # the active intent's free-text arguments, 43,712). True since 2026-11-25 (issue 7), chosen on the
    # pseudo-unseen harness: unseen JGA 0.215 / 0.186 -> 0.229 / 0.199 (parts 0 / 1; average goal accuracy
    # 0.617 / 0.605 -> 0.602 / 0.584: fewer frames broken, more single slots missed). Seen services: never applied.
    offer_only_unseen: bool = True
    # Frozen encoder precision the heads were trained on (and must run on): int8 dynamic quantization of
    # MiniLM's linear layers, or fp32.
    encoder_int8: bool = False
    # Intent head also reads the user tokens with each intent description as attention query (a
    # mean-pooled turn cannot tell "one way" from "roundtrip"); False in configs stored before it.
    intent_reader: bool = False
    # Seed ensemble of the intent and slot heads (issue 7: intent accuracy and requested-slot F1 moved by
    # +-0.005 between retraining draws, across the 0.95 / 0.97 targets): ``ensemble - 1`` extra members of
    # the intent head (with its reader) and the slot reader (status + request), trained after the main heads
    # on the same cached features with seeds ``member_seed(seed, i)`` = seed + 1000 i (so the draw of seed
    # 14 shares no member with that of seed 13); their logits are averaged with the main heads' (value and
    # span heads are not ensembled). ``ensemble_status``: also average the status logits (else only the
    # intent and request logits). 1 in configs stored before it (the default recipe: ``pipeline.DST_ENSEMBLE``).
    ensemble: int = 1
    ensemble_status: bool = True
    # The ensemble members also get their own categorical value scorer and span head (trained after their
    # intent and slot heads, from seed ``member_seed(seed, i) + VALUE_SEED_OFFSET``), and the value and span
    # logits are the members' mean too. False in configs stored before it (value and span from the main heads).
    ensemble_values: bool = False
    # Training: share of head examples that read a rewrite of their slot / intent / value description
    # (``dst_augment``, SGD-X style); 0 in configs stored before it. Tracking (a decision): each description
    # vector is the mean of the original's and its rewrites' embeddings (``dst_augment.MeanVariantBank``).
    desc_augment: float = 0.0
    desc_mean: bool = False
    # Architecture tag: a stored model of another architecture must be retrained, not half-loaded.
    arch: str = "slot-reader-v3"


# ``TrackerConfig`` fields that only steer decisions at tracking time (no effect on training): the ones a
# held-out run may override (``pipeline.holdout_dst`` / ``holdout_unseen_dst``, ``holdout --decisions``).
DECISION_FIELDS = ("status_logit_bias", "intent_stay_bias", "status_logit_bias_unseen", "intent_stay_bias_unseen",
                   "request_threshold", "request_threshold_unseen", "max_requested_slots", "ensemble_status",
                   "unique_values", "unique_values_unseen", "intent_slots_only", "offer_only_unseen", "desc_mean")


def with_decisions(cfg: TrackerConfig, decisions: dict[str, Any] | None) -> TrackerConfig:
    """A copy of ``cfg`` with some ``DECISION_FIELDS`` replaced (anything else is refused: it would need
    retrained heads)."""
    import dataclasses

    bad = sorted(set(decisions or {}) - set(DECISION_FIELDS))
    if bad:
        raise ValueError(f"not decision settings (they need retrained heads): {', '.join(bad)}; "
                         f"choose from {', '.join(DECISION_FIELDS)}")
    return dataclasses.replace(cfg, **(decisions or {}))


def member_seed(seed: int, i: int) -> int:
    """Seed of ensemble member ``i`` (1, 2, ...) of a tracker trained with ``seed``."""
    return seed + 1000 * i


# Offset of the seed an ensemble member's value and span heads train from (``TrackerConfig.ensemble_values``):
# their own stream, so the member's intent and slot heads train exactly as without them.
VALUE_SEED_OFFSET = 500


def mlp(n_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    # LayerNorm first: normalised embeddings (|x_i| ~ 0.05) and their products are tiny otherwise.
    return nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class HeadMember(nn.Module):
    """The decision heads a seed ensemble repeats: the intent head (with its reader) and the slot reader."""

    def __init__(self, cfg: TrackerConfig) -> None:
        super().__init__()
        self.intent_reader = IntentReader() if cfg.intent_reader else None
        self.intent = mlp((7 if cfg.intent_reader else 5) * DIM + 1, cfg.hidden, 1, cfg.dropout)
        self.slot = SlotReader(cfg.hidden, cfg.dropout)


class TrackerHeads(HeadMember):
    """The five trained heads (the member heads, then value and span) and the ensemble's extra members;
    inputs are built by the ``*_features`` helpers below."""

    def __init__(self, cfg: TrackerConfig) -> None:
        super().__init__(cfg)
        h, p = cfg.hidden, cfg.dropout
        self.value = mlp(5 * DIM + 2, h, 1, p)
        self.span = SpanHead(h // 2)
        self.ensemble_status = cfg.ensemble_status
        # Extra ensemble members, initialised from their own seeds in a forked RNG, so the main heads
        # initialise (and train) exactly as without an ensemble.
        self.members = nn.ModuleList()
        for i in range(1, cfg.ensemble):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(member_seed(cfg.seed, i))
                m = HeadMember(cfg)
                if cfg.ensemble_values:  # initialised after the member's intent / slot heads: those stay as without
                    m.value = mlp(5 * DIM + 2, h, 1, p)
                    m.span = SpanHead(h // 2)
                self.members.append(m)
        self.ensemble_values = cfg.ensemble_values and len(self.members) > 0

    def value_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Categorical value scores (..., 1) of the value features ``x``: the members' mean with ``ensemble_values``."""
        if not self.ensemble_values:
            return self.value(x)
        return torch.stack([m.value(x) for m in [self, *self.members]]).mean(0)

    def span_heads(self) -> list[SpanHead]:
        """The span heads whose logits are averaged: every member's with ``ensemble_values``, else the main one."""
        return [m.span for m in [self, *self.members]] if self.ensemble_values else [self.span]

    def span_logits(self, h: torch.Tensor, d: torch.Tensor, keys: Sequence[torch.Tensor] | None = None,
                    queries: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``SpanHead`` start / end logits (B, T, 2): the members' mean with ``ensemble_values``. ``keys`` /
        ``queries``: the ``span_heads``' ``keys(h)`` / ``queries(d)`` when already at hand (tracking: a turn's
        token keys serve all its slots, a description's queries every turn; the same values as recomputing)."""
        heads = self.span_heads()
        ks = keys if keys is not None else [sp.keys(h) for sp in heads]
        qs = queries if queries is not None else [sp.queries(d) for sp in heads]
        outs = [sp.score(k, q) for sp, k, q in zip(heads, ks, qs, strict=True)]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def slot_logits(self, *args: Any, grouped: bool = False, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``SlotReader`` outputs (status logits, request logits), averaged over the ensemble members (the
        status logits only with ``ensemble_status``). ``grouped``: ``SlotReader.read`` (tracking; needs ``rows``)."""
        def run(m: HeadMember) -> tuple[torch.Tensor, torch.Tensor]:
            return m.slot.read(*args, **kw) if grouped else m.slot(*args, **kw)

        st, rq = run(self)
        if len(self.members):
            outs = [run(m) for m in self.members]
            rq = torch.stack([rq] + [o[1] for o in outs]).mean(0)
            if self.ensemble_status:
                st = torch.stack([st] + [o[0] for o in outs]).mean(0)
        return st, rq


class IntentReader(nn.Module):
    """Attention over a turn's user tokens with each candidate intent description as query:
    h (B, T, 384), user (B, T) bool, d (B, m, 384) -> pooled user tokens per candidate (B, m, 384)."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.width = width
        self.key = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, width))
        self.query = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, width))

    def forward(self, h: torch.Tensor, user: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        att = torch.einsum("bmw,btw->bmt", self.query(d), self.key(h)) / self.width**0.5
        ok = user[:, None, :]
        a = torch.softmax(att.masked_fill(~ok, -1e4), -1) * ok
        return nn.functional.normalize(torch.einsum("bmt,btd->bmd", a, h), dim=-1)


class SlotReader(nn.Module):
    """Per (turn, slot): status {carry, update, dontcare, copy} and "requested" from slot-conditioned
    attention over the user tokens and, separately, the system tokens.

    Mean-pooled sentence vectors cannot say *which* slot a turn mentions ("fly from Chicago" is the
    origin, not the destination); attention with the slot description as query reads the tokens that
    matter for that slot. Inputs: h (B, T, 384) tokens, seg (B, T) 0 user / 1 system, mask (B, T),
    d (B, 384) slot description, u/s (B, 384) sentence vectors, has/cat (B,) flags.
    Returns status logits (B, 4) and request logits (B,).
    """

    def __init__(self, hidden: int, dropout: float, width: int = 128) -> None:
        super().__init__()
        self.width = width
        self.key = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * width))
        self.query = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * width))
        self.out = mlp(7 * DIM + 4, hidden, len(STATUS) + 1, dropout)

    def forward(self, h: torch.Tensor, seg: torch.Tensor, mask: torch.Tensor, d: torch.Tensor, u: torch.Tensor,
                s: torch.Tensor, has: torch.Tensor, cat: torch.Tensor,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` (B,): the turn of each (turn, slot) example when ``h``/``seg``/``mask`` hold each turn
        once (N, T, ...): token keys are then computed once per turn, not once per slot."""
        k = self.key(h)
        if rows is not None:
            h, seg, mask, k = h[rows], seg[rows], mask[rows], k[rows]
        b, t, _ = h.shape
        k = k.view(b, t, 2, self.width)
        q = self.query(d).view(b, 1, 2, self.width)
        att = (k * q).sum(-1) / self.width**0.5  # (B, T, 2): user query, system query
        pooled, present = [], []
        for side in (0, 1):
            ok = mask & (seg == side)  # (B, T)
            a = torch.softmax(att[..., side].masked_fill(~ok, -1e4), -1) * ok
            pooled.append(nn.functional.normalize(torch.einsum("bt,btd->bd", a, h), dim=-1))
            present.append(att[..., side].masked_fill(~ok, -1e4).max(-1).values.clamp(min=-10.0)[:, None]
                           * ok.any(-1, keepdim=True))
        return self._decide(u, s, d, *pooled, has, cat, present)

    def read(self, h: torch.Tensor, seg: torch.Tensor, mask: torch.Tensor, d: torch.Tensor, u: torch.Tensor,
             s: torch.Tensor, has: torch.Tensor, cat: torch.Tensor,
             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` with ``rows`` for tracking (no autograd): each turn's slots read that turn's tokens
        together, as one (turns, slots of the turn, T) attention and one batched matmul per side, instead of a
        copy of the turn's (T, 384) tokens and (T, 256) keys per slot (the copies were most of the heads'
        memory traffic in ``step_many``). The same maths: values equal ``forward``'s up to float summation order
        (|logit difference| ~1e-6). Training keeps ``forward``."""
        n, t, _ = h.shape
        b = rows.shape[0]
        k = self.key(h).view(n, t, 2, self.width)
        q = self.query(d).view(b, 2, self.width)
        counts = torch.bincount(rows, minlength=n)
        order = torch.argsort(rows, stable=True)
        pos = torch.empty_like(rows)
        pos[order] = torch.arange(b) - (torch.cumsum(counts, 0) - counts)[rows[order]]  # slot's place in its turn
        qp = q.new_zeros(n, int(counts.max()), 2, self.width)
        qp[rows, pos] = q
        att = torch.einsum("nmcw,ntcw->ncmt", qp, k) / self.width**0.5  # (N, 2, slots, T): user query, system query
        pooled, present = [], []
        for side in (0, 1):
            ok = (mask & (seg == side))[:, None, :]  # (N, 1, T)
            lg = att[:, side].masked_fill(~ok, -1e4)
            a = torch.softmax(lg, -1) * ok
            pooled.append(nn.functional.normalize(torch.bmm(a, h)[rows, pos], dim=-1))
            present.append(lg.max(-1).values.clamp(min=-10.0)[rows, pos][:, None] * ok.any(-1)[rows])
        return self._decide(u, s, d, *pooled, has, cat, present)

    def _decide(self, u: torch.Tensor, s: torch.Tensor, d: torch.Tensor, pu: torch.Tensor, ps: torch.Tensor,
                has: torch.Tensor, cat: torch.Tensor, present: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u, s, d, pu, ps, pu * d, ps * d, has[:, None], cat[:, None], *present], -1)
        o = self.out(x)
        return o[:, : len(STATUS)], o[:, len(STATUS)]


class SpanHead(nn.Module):
    """Bilinear span scorer: token keys (start, end) dotted with slot-description queries.

    Cheaper than an MLP over [H_t, d, H_t*d] per token (the cost that matters on 2 CPU cores):
    h (B, T, 384), d (B, 384) -> logits (B, T, 2).
    """

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.width = width
        self.tok = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * width))
        self.query = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * width), nn.GELU(), nn.Linear(2 * width, 2 * width))

    def forward(self, h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.score(self.keys(h), self.queries(d))  # (B, T, 2)

    def keys(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        return self.tok(h).view(b, t, 2, self.width)  # (B, T, 2, w)

    def queries(self, d: torch.Tensor) -> torch.Tensor:
        return self.query(d).view(d.shape[0], 1, 2, self.width)  # (B, 1, 2, w)

    def score(self, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (k * q).sum(-1) / self.width**0.5


def intent_features(u: torch.Tensor, s: torch.Tensor, d: torch.Tensor, was: torch.Tensor,
                    pu: torch.Tensor | None = None) -> torch.Tensor:
    """(N,384)x3 + (N,) [+ (N,384) intent-read user tokens] -> (N, 5*384+1) [(N, 7*384+1)]."""
    extra = [pu, pu * d] if pu is not None else []
    return torch.cat([u, s, d, u * d, s * d, *extra, was[:, None]], -1)


def intent_logits(heads: TrackerHeads, u: torch.Tensor, s: torch.Tensor, d: torch.Tensor, was: torch.Tensor,
                  h: torch.Tensor | None = None, seg: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (n,) of n candidate intents (descriptions d (n, 384)) for one turn: u, s (384,), tokens
    h (T, 384) with segments seg (T,) (0 = user), needed when the heads have an intent reader."""
    n = d.shape[0]
    return intent_logits_many(heads, u[None], s[None], d, was, torch.zeros(n, dtype=torch.long), torch.arange(n),
                              None if h is None else h[None], None if seg is None else seg[None])


def intent_logits_many(heads: TrackerHeads, u: torch.Tensor, s: torch.Tensor, d: torch.Tensor, was: torch.Tensor,
                       rows: torch.Tensor, pos: torch.Tensor, h: torch.Tensor | None = None,
                       seg: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (m,) of m candidate intents (descriptions d (m, 384)) of several turns: candidate i belongs
    to turn ``rows[i]`` (u, s (B, 384); tokens h (B, T, 384) with segments seg (B, T), 0 = user, 2 =
    padding) and is that turn's ``pos[i]``-th candidate. With ensemble members: the members' mean."""
    dpad = None
    if heads.intent_reader is not None:
        if h is None or seg is None:
            raise ValueError("this tracker's intent head reads the turn's tokens: pass h and seg")
        dpad = torch.zeros(h.shape[0], int(pos.max()) + 1, d.shape[1])
        dpad[rows, pos] = d
    out = []
    for m in [heads, *heads.members]:
        pu = None if dpad is None else m.intent_reader(h, seg == 0, dpad)[rows, pos]
        out.append(m.intent(intent_features(u[rows], s[rows], d, was, pu)).squeeze(-1))
    return out[0] if len(out) == 1 else torch.stack(out).mean(0)


# ------------------------------------------------------------------------------------ schema text
def _words(name: str) -> str:
    return re.sub(r"[_\-]+", " ", re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)).strip().lower()


def schema_texts(schema: dict[str, Any]) -> dict[str, Any]:
    """Description strings the heads are conditioned on (the zero-shot interface)."""
    svc = f"{_words(schema['service_name'].split('_')[0])}: {schema.get('description', '')}"
    slots = {s["name"]: f"{s.get('description') or _words(s['name'])} ({svc})" for s in schema["slots"]}
    intents = {i["name"]: f"{i.get('description') or _words(i['name'])} ({svc})" for i in schema["intents"]}
    values = {s["name"]: {v: f"{s.get('description') or _words(s['name'])} is {v}" for v in s["possible_values"]}
              for s in schema["slots"] if s.get("is_categorical")}
    return {"service": svc, "slots": slots, "intents": intents, "values": values}


class SchemaBank:
    """Embeddings of the descriptions of a set of service schemas.

    Intent descriptions of every service are embedded up front (service detection needs them);
    slot and value descriptions of a service are embedded the first time the service is tracked,
    so a large catalogue costs little until it is used. ``full=True`` embeds everything and builds
    the ``matrix``/``row`` index used by training.
    """

    NONE_TEXT = "no intent is expressed yet"

    def __init__(self, schemas: dict[str, dict[str, Any]], encoder: MiniLMEncoder, full: bool = False) -> None:
        self.schemas = schemas
        self.encoder = encoder
        self.texts = {name: schema_texts(s) for name, s in schemas.items()}
        self.vec: dict[str, torch.Tensor] = {}
        self._ready: set[str] = set()
        self._add([self.NONE_TEXT] + [t for v in self.texts.values() for t in v["intents"].values()])
        self.none_intent = self.vec[self.NONE_TEXT]
        if full:
            self.ensure(list(schemas))
            pool = list(self.vec)
            self.matrix = torch.stack([self.vec[t] for t in pool])  # (P, 384): one row per description
            self.row = {t: i for i, t in enumerate(pool)}
            self.none_row = self.row[self.NONE_TEXT]

    def _add(self, texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self.vec]
        if todo:
            for t, v in zip(todo, self.encoder.encode(todo), strict=True):
                self.vec[t] = torch.from_numpy(v).float()

    def ensure(self, services: Sequence[str]) -> None:
        todo = [s for s in services if s not in self._ready and s in self.texts]
        pool: list[str] = []
        for svc in todo:
            t = self.texts[svc]
            pool += list(t["slots"].values())
            for vs in t["values"].values():
                pool += list(vs.values())
        self._add(pool)
        self._ready |= set(todo)

    def slot_row(self, service: str, slot: str) -> int:
        return self.row[self.texts[service]["slots"][slot]]

    def intent_row(self, service: str, intent: str) -> int:
        return self.row[self.texts[service]["intents"][intent]]

    def value_row(self, service: str, slot: str, v: str) -> int:
        return self.row[self.texts[service]["values"][slot][v]]

    def slot(self, service: str, slot: str) -> torch.Tensor:
        return self.vec[self.texts[service]["slots"][slot]]

    def intent(self, service: str, intent: str) -> torch.Tensor:
        return self.vec[self.texts[service]["intents"][intent]]

    def value(self, service: str, slot: str, v: str) -> torch.Tensor:
        return self.vec[self.texts[service]["values"][slot][v]]


# -------------------------------------------------------------------------------- turn features
@dataclass
class TurnFeatures:
    """Encoder output for one (user, system) pair."""

    u: np.ndarray                    # (384,)
    s: np.ndarray                    # (384,)
    h: np.ndarray                    # (T, 384) float16, special tokens dropped
    seg: np.ndarray                  # (T,) 0 = user token, 1 = system token
    offsets: list[tuple[int, int]]   # char offsets into the user / system text


@dataclass
class TurnJob:
    """One conversation's next user turn for ``DialogueStateTracker.step_many``."""

    state: dict[str, dict[str, Any]]             # state before the turn
    feats: TurnFeatures                          # encoder output of (user, previous system)
    user: str
    system: str
    services: Sequence[str]                      # services to update (other frames are kept)
    history: Sequence[tuple[TurnFeatures, str]] = ()  # earlier pairs (features, system text), oldest first


def encode_pairs(encoder: MiniLMEncoder, users: Sequence[str], systems: Sequence[str],
                 desc: str = "", reporter: Any = None, batch_size: int = PAIR_BATCH) -> list[TurnFeatures]:
    """Encode (user, previous system) pairs; large sets are cached on disk (one file per set)."""
    if encoder.cache_dir is None or len(users) < 500:
        return _encode_pairs(encoder, users, systems, desc, reporter, batch_size)
    import hashlib
    import pickle

    key = hashlib.sha1("\x00".join(u + "\x01" + s for u, s in zip(users, systems, strict=True)).encode()).hexdigest()
    path = encoder.cache_dir / f"pairs-{'q8-' if encoder.quantized else ''}{key[:20]}.pkl"
    if path.exists():
        try:
            with path.open("rb") as fh:
                return pickle.load(fh)  # noqa: S301 - our own cache file under VERTICALS_HOME
        except (OSError, EOFError, pickle.UnpicklingError):
            path.unlink(missing_ok=True)
    feats = _encode_pairs(encoder, users, systems, desc, reporter, batch_size)
    encoder.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(feats, fh, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    return feats


def _encode_pairs(encoder: MiniLMEncoder, users: Sequence[str], systems: Sequence[str],
                  desc: str = "", reporter: Any = None, batch_size: int = PAIR_BATCH) -> list[TurnFeatures]:
    from core.jobs import progress

    encoder._load()
    tok = encoder._tok
    order = sorted(range(len(users)), key=lambda i: len(users[i]) + len(systems[i]))
    out: list[TurnFeatures | None] = [None] * len(users)
    bs = batch_size
    starts = list(range(0, len(order), bs))
    it = progress(starts, desc=desc or "encoding turns", reporter=reporter, disable=len(starts) < 4)
    for b0 in it:
        idx = order[b0:b0 + bs]
        us = [users[i] or " " for i in idx]
        ss = [systems[i] or " " for i in idx]
        with torch.inference_mode():
            enc = tok(us, ss, padding=True, truncation="only_second", max_length=MAX_PAIR_TOKENS,
                      return_tensors="pt", return_offsets_mapping=True)
            om = enc.pop("offset_mapping")
            hid = encoder.hidden(enc)  # (B, T, 384)
        special = enc["special_tokens_mask"] if "special_tokens_mask" in enc else None
        del special
        for j, i in enumerate(idx):
            mask = enc["attention_mask"][j].bool()
            ids = enc["input_ids"][j]
            keep = mask & (ids != tok.cls_token_id) & (ids != tok.sep_token_id)
            hj = hid[j][keep]
            seg = enc["token_type_ids"][j][keep].numpy().astype(np.int8)
            offs = [(int(a), int(c)) for a, c in om[j][keep].tolist()]
            u = hj[torch.from_numpy(seg == 0)].mean(0) if (seg == 0).any() else torch.zeros(DIM)
            s = hj[torch.from_numpy(seg == 1)].mean(0) if (seg == 1).any() and systems[i] else torch.zeros(DIM)
            out[i] = TurnFeatures(
                u=nn.functional.normalize(u, dim=0).numpy(), s=nn.functional.normalize(s, dim=0).numpy()
                if s.abs().sum() > 0 else s.numpy(), h=hj.numpy().astype(np.float16), seg=seg, offsets=offs)
    return [f for f in out if f is not None]


# ------------------------------------------------------------------------------------- tracker
def empty_frame() -> dict[str, Any]:
    return {"active_intent": "NONE", "requested_slots": [], "slot_values": {}}


class DialogueStateTracker:
    """Trained heads + schema bank; ``update`` advances a conversation state by one user turn."""

    def __init__(self, heads: TrackerHeads, cfg: TrackerConfig, encoder: MiniLMEncoder) -> None:
        self.heads = heads.eval()
        self.cfg = cfg
        self.encoder = encoder.variant(cfg.encoder_int8)  # the precision the heads were trained on
        self._banks: dict[int, SchemaBank] = {}
        # span-head queries of slot descriptions (fixed heads, fixed bank vectors): id -> (vector, queries)
        self._span_q: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    # -- persistence ------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, str(folder / "heads.safetensors"))
        (folder / "config.json").write_text(json.dumps(asdict(self.cfg), indent=1))

    @classmethod
    def load(cls, folder: Path, encoder: MiniLMEncoder) -> DialogueStateTracker:
        from safetensors.torch import load_file

        from core.errors import ModelNotReady

        if not (folder / "heads.safetensors").exists():
            raise ModelNotReady(f"no trained tracker in {folder}; run `verticals customer-service train --task dst`")
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("arch") != TrackerConfig.arch:
            raise ModelNotReady(f"the tracker in {folder} has an older architecture ({raw.get('arch', 'v1')}); "
                                "retrain it: `verticals customer-service train --task dst`")
        cfg = TrackerConfig(**raw)
        heads = TrackerHeads(cfg)
        heads.load_state_dict(load_file(str(folder / "heads.safetensors")))
        return cls(heads, cfg, encoder)

    def bank(self, schemas: dict[str, dict[str, Any]]) -> SchemaBank:
        key = id(schemas)
        if key not in self._banks:
            from solutions.customer_service.dst_augment import tracking_bank

            self._banks[key] = tracking_bank(schemas, self.encoder, self.cfg)
        return self._banks[key]

    # -- one turn ---------------------------------------------------------------------------------
    def step(self, state: dict[str, dict[str, Any]], feats: TurnFeatures, user: str, system: str,
             services: Sequence[str], bank: SchemaBank,
             history: Sequence[tuple[TurnFeatures, str]] = ()) -> dict[str, dict[str, Any]]:
        """New state after one user turn for ``services`` (other services keep their frames).

        ``history``: (features, system text) of the dialogue's earlier pairs, oldest first; a ``recall``
        reads an offered value from their system tokens (without it, ``recall`` keeps the old value)."""
        return self.step_many([TurnJob(state, feats, user, system, services, history)], bank)[0]

    @torch.inference_mode()
    def step_many(self, jobs: Sequence[TurnJob], bank: SchemaBank) -> list[dict[str, dict[str, Any]]]:
        """``step`` for the next user turn of several conversations at once (one turn per conversation).

        The intent and slot heads run once over all the jobs' (service, intent) and (service, slot) items
        (their logits depend only on the previous state, so the result equals stepping the jobs one by
        one); the per-slot value reads (categorical value, span, copy, recall) stay per slot. The heads
        are weight-bandwidth bound, so one call for many turns costs little more than one for one turn."""
        if not jobs:
            return []
        bank.ensure(sorted({s for j in jobs for s in j.services}))
        trained = set(self.cfg.trained_services)  # the rest are tracked zero-shot
        feats = [j.feats if j.feats.h.shape[0] else  # nothing to read (cannot happen for real text)
                 TurnFeatures(j.feats.u, j.feats.s, np.zeros((1, DIM), np.float16), np.zeros(1, np.int8), [(0, 0)])
                 for j in jobs]
        n, t = len(jobs), max(f.h.shape[0] for f in feats)
        h = torch.zeros(n, t, DIM)
        seg = torch.full((n, t), 2, dtype=torch.long)  # 2 = padding: neither the user nor the system side
        for i, f in enumerate(feats):
            h[i, : f.h.shape[0]] = torch.from_numpy(f.h).float()
            seg[i, : f.h.shape[0]] = torch.from_numpy(f.seg.astype(np.int64))
        mask = seg < 2
        u = torch.from_numpy(np.stack([f.u for f in feats])).float()
        s = torch.from_numpy(np.stack([f.s for f in feats])).float()
        # items: one per (job, service); intent candidates per job padded to the longest list
        items: list[tuple[int, str, list[str], int, int]] = []  # job, service, intent names, cand. offset, slot offset
        cand: list[list[torch.Tensor]] = [[] for _ in jobs]
        i_rows, i_pos, was_l, s_rows, s_d, has_l, cat_l = [], [], [], [], [], [], []
        for i, j in enumerate(jobs):
            for svc in j.services:
                schema = bank.schemas[svc]
                prev = j.state.get(svc, empty_frame())
                names = ["NONE"] + [x["name"] for x in schema["intents"]]
                items.append((i, svc, names, len(i_rows), len(s_rows)))
                i_rows += [i] * len(names)
                i_pos += range(len(cand[i]), len(cand[i]) + len(names))
                cand[i] += [bank.none_intent] + [bank.intent(svc, x) for x in names[1:]]
                was_l += [float(x == prev["active_intent"]) for x in names]
                for sl in schema["slots"]:
                    s_rows.append(i)
                    s_d.append(bank.slot(svc, sl["name"]))
                    has_l.append(float(sl["name"] in prev["slot_values"]))
                    cat_l.append(float(bool(sl.get("is_categorical"))))
        new = [{k: {**v, "slot_values": dict(v["slot_values"]), "requested_slots": []} for k, v in j.state.items()}
               for j in jobs]
        if not items:
            return new
        il = intent_logits_many(self.heads, u, s, torch.stack([c for cs in cand for c in cs]), torch.tensor(was_l),
                                torch.tensor(i_rows), torch.tensor(i_pos), h, seg)
        if s_rows:
            sr = torch.tensor(s_rows)
            st_all, req_all = self.heads.slot_logits(h, seg, mask, torch.stack(s_d), u[sr], s[sr], torch.tensor(has_l),
                                                     torch.tensor(cat_l), rows=sr, grouped=True)
        for i, svc, names, io, so in items:
            j, f, st_new = jobs[i], feats[i], new[i]
            schema = bank.schemas[svc]
            unseen = svc not in trained
            stay_bias = (self.cfg.intent_stay_bias_unseen if unseen and self.cfg.intent_stay_bias_unseen is not None
                         else self.cfg.intent_stay_bias)
            status_bias = (self.cfg.status_logit_bias_unseen if unseen and self.cfg.status_logit_bias_unseen is not None
                           else self.cfg.status_logit_bias)
            req_thr = (self.cfg.request_threshold_unseen if unseen and self.cfg.request_threshold_unseen is not None
                       else self.cfg.request_threshold)
            frame = st_new.setdefault(svc, empty_frame())
            prev = j.state.get(svc, empty_frame())
            logits = il[io: io + len(names)]
            if prev["active_intent"] != "NONE":
                logits = logits + stay_bias * torch.tensor(was_l[io: io + len(names)])
            frame["active_intent"] = names[int(logits.argmax())]
            slots = schema["slots"]
            if not slots:
                continue
            st_logits, req = st_all[so: so + len(slots)], req_all[so: so + len(slots)]
            frame["requested_slots"] = requested(slots, req.tolist(), req_thr, self.cfg.max_requested_slots)
            if status_bias:
                st_logits = st_logits + torch.tensor(status_bias)
            st = st_logits.argmax(-1)
            hj = h[i, : f.h.shape[0]]
            span_keys: list[torch.Tensor] = []  # the turn's span-head token keys, computed at its first span read
            unique = (self.cfg.unique_values_unseen if unseen and self.cfg.unique_values_unseen is not None
                      else self.cfg.unique_values)
            fresh: list[tuple[float, str, str]] = []  # (status probability, slot, value) of new free-text values
            args = intent_slot_names(schema) if self.cfg.intent_slots_only else None
            # unseen services: free-text slots outside the active intent's arguments take only system words
            offer_args = (intent_slot_names(schema, frame["active_intent"]) if unseen and self.cfg.offer_only_unseen
                          else None)
            st_p = st_logits.softmax(-1).max(-1).values  # probability of each slot's status (unique_values)
            for k, sl in enumerate(slots):
                kind = STATUS[int(st[k])]
                name = sl["name"]
                if args is not None and name not in args:
                    continue
                dk = s_d[so + k]
                v = None
                if kind == "dontcare":
                    v = "dontcare"
                elif kind == "update":
                    v = (self._categorical(u[i], s[i], svc, sl, j.user, j.system, bank) if sl.get("is_categorical")
                         else self._span(hj, f, dk, j.user, j.system, span_keys))
                    if (v and offer_args is not None and not sl.get("is_categorical") and name not in offer_args
                            and v.lower() in j.user.lower() and v.lower() not in j.system.lower()):
                        v = None
                elif kind == "copy":
                    v = self._copy(st_new, svc, name, dk, bank)
                elif kind == "recall" and not sl.get("is_categorical"):
                    v = self._recall(j.history, dk)
                if v:
                    if unique and v != "dontcare" and not sl.get("is_categorical") and [v] != prev["slot_values"].get(name):
                        fresh.append((float(st_p[k]), name, v))
                    else:
                        frame["slot_values"][name] = [v]
            for name, v in unique_values(fresh, frame["slot_values"], unique):
                frame["slot_values"][name] = [v]
        return new

    def _recall(self, history: Sequence[tuple[TurnFeatures, str]], d: torch.Tensor) -> str | None:
        """Best-scoring span on the system side of the last RECALL_TURNS earlier pairs."""
        best: tuple[float, str] | None = None
        for f, text in history[-RECALL_TURNS:]:
            if not (f.seg == 1).any() or not text:
                continue
            seg = torch.from_numpy(f.seg.astype(np.int64))
            lg = self.heads.span_logits(torch.from_numpy(f.h).float()[None], d[None], queries=self._span_queries(d))[0]
            lg = lg.masked_fill((seg != 1)[:, None], -1e4)
            a, b = best_span(lg[:, 0], lg[:, 1], seg)
            score = float(lg[a, 0] + lg[b, 1])
            v = text[f.offsets[a][0]:f.offsets[b][1]].strip()
            if v and (best is None or score > best[0]):
                best = (score, v)
        return best[1] if best else None

    def _categorical(self, u: torch.Tensor, s: torch.Tensor, svc: str, sl: dict[str, Any], user: str,
                     system: str, bank: SchemaBank) -> str | None:
        vals = list(sl["possible_values"])
        if not vals:
            return None
        dv = torch.stack([bank.value(svc, sl["name"], v) for v in vals])
        lex = lexical_features(vals, user, system)
        n = len(vals)
        x = torch.cat([u.expand(n, -1), s.expand(n, -1), dv, u * dv, s * dv, lex], -1)
        return vals[int(self.heads.value_logits(x).squeeze(-1).argmax())]

    def _span_queries(self, d: torch.Tensor) -> list[torch.Tensor]:
        """The span heads' queries of description vector ``d`` (384,), computed once per description."""
        hit = self._span_q.get(id(d))
        if hit is None or hit[0] is not d:
            hit = self._span_q[id(d)] = (d, [sp.queries(d[None]) for sp in self.heads.span_heads()])
        return hit[1]

    def _span(self, h: torch.Tensor, feats: TurnFeatures, d: torch.Tensor, user: str, system: str,
              keys: list[torch.Tensor] | None = None) -> str | None:
        """Best span of the turn's tokens ``h`` for slot description ``d``; ``keys``: the turn's span-head token
        keys, filled on first use (shared by the turn's slots)."""
        if h.shape[0] == 0:
            return None
        if keys is not None and not keys:
            keys += [sp.keys(h[None]) for sp in self.heads.span_heads()]
        lg = self.heads.span_logits(h[None], d[None], keys=keys or None, queries=self._span_queries(d))[0]  # (T, 2)
        start, end = best_span(lg[:, 0], lg[:, 1], torch.from_numpy(feats.seg.astype(np.int64)))
        text = user if feats.seg[start] == 0 else system
        a, b = feats.offsets[start][0], feats.offsets[end][1]
        return text[a:b].strip() or None

    def _copy(self, state: dict[str, dict[str, Any]], svc: str, slot: str, d: torch.Tensor,
              bank: SchemaBank) -> str | None:
        best, val = 0.5, None
        for other, fr in state.items():
            if other == svc or other not in bank.schemas:
                continue
            for oslot, ov in fr["slot_values"].items():
                if not ov or ov[0] == "dontcare" or oslot not in bank.texts[other]["slots"]:
                    continue
                sim = float(torch.dot(d, bank.slot(other, oslot)))
                if sim > best:
                    best, val = sim, ov[0]
        return val

    # -- batch of dialogues (evaluation, re-tracking) -----------------------------------------------
    def track_sgd(self, dialogues: list[dict[str, Any]], schemas: dict[str, dict[str, Any]],
                  desc: str = "tracking", reporter: Any = None, batch_size: int = PAIR_BATCH,
                  head_batch: int = HEAD_BATCH) -> list[dict[str, Any]]:
        """Predict SGD-format dialogues (frames of each user turn = the services named in the gold
        frames, as in the official setup); returns copies with predicted ``state``s. ``head_batch``:
        conversations whose next turn goes through the heads in one call (1 = one turn at a time)."""
        import copy

        bank = self.bank(schemas)
        pairs = list(iter_user_turns(dialogues))
        feats = encode_pairs(self.encoder, [p[2] for p in pairs], [p[3] for p in pairs], desc=desc, reporter=reporter,
                             batch_size=batch_size)
        out = copy.deepcopy(dialogues)
        # Turn r of every dialogue is stepped together (a dialogue's turns must go in order); the jobs of
        # a round are sorted by token length and cut into groups of ``head_batch`` (little padding).
        rounds: list[list[int]] = []
        seen: dict[int, int] = {}
        for k, (di, *_rest) in enumerate(pairs):
            r = seen[di] = seen.get(di, -1) + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(k)
        states: dict[int, dict[str, Any]] = {}
        history: dict[int, list[tuple[TurnFeatures, str]]] = {}
        # The heads' ops are small: one thread avoids OpenMP barrier stalls on a busy, shared CPU.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for ks in rounds:
                ks = sorted(ks, key=lambda k: feats[k].h.shape[0])
                for g0 in range(0, len(ks), head_batch):
                    group = ks[g0:g0 + head_batch]
                    jobs = []
                    for k in group:
                        di, ti, user, system = pairs[k]
                        services = [fr["service"] for fr in out[di]["turns"][ti]["frames"] if fr["service"] in schemas]
                        jobs.append(TurnJob(states.get(di, {}), feats[k], user, system, services, history.get(di, [])))
                    for k, st in zip(group, self.step_many(jobs, bank), strict=True):
                        di, ti, _, system = pairs[k]
                        states[di] = st
                        history.setdefault(di, []).append((feats[k], system))
                        for fr in out[di]["turns"][ti]["frames"]:
                            fr["state"] = json.loads(json.dumps(st.get(fr["service"], empty_frame())))
        finally:
            torch.set_num_threads(threads)
        return out


def iter_user_turns(dialogues: list[dict[str, Any]]):  # noqa: ANN201 - generator of tuples
    """(dialogue index, turn index, user utterance, previous system utterance) per user turn."""
    for di, d in enumerate(dialogues):
        system = ""
        for ti, t in enumerate(d["turns"]):
            if t["speaker"] == "USER":
                yield di, ti, t["utterance"], system
            else:
                system = t["utterance"]


def intent_slot_names(schema: dict[str, Any], intent: str | None = None) -> set[str]:
    """Slots some intent of ``schema`` takes as an argument (required or optional): the only ones a dialogue
    state fills (``TrackerConfig.intent_slots_only``). ``intent``: only that intent's arguments (none for NONE
    or an unknown intent; ``TrackerConfig.offer_only_unseen``)."""
    return {x for it in schema.get("intents", ()) if intent is None or it["name"] == intent
            for x in [*it.get("required_slots", ()), *it.get("optional_slots", {})]}


def unique_values(fresh: Sequence[tuple[float, str, str]], kept: dict[str, list[str]], mode: int) -> list[tuple[str, str]]:
    """(slot, value) of the new free-text values ``fresh`` = (score, slot, value) a frame keeps under
    ``TrackerConfig.unique_values`` ``mode``: of the slots given one value (case-insensitive), the highest
    score (the tracker passes the probability of the slot's status); with mode 2, none whose value another slot already holds in ``kept`` (the frame's other values),
    unless the value is a number."""
    owners = {} if mode < 2 else {vs[0].lower(): s for s, vs in kept.items() if vs and vs[0] != "dontcare"}
    out: list[tuple[str, str]] = []
    taken: set[str] = set()
    for _score, name, v in sorted(fresh, key=lambda x: -x[0]):
        key = v.lower()
        if key in taken or (owners.get(key, name) != name and not key.strip().isdigit()):
            continue
        taken.add(key)
        out.append((name, v))
    return out


def requested(slots: Sequence[dict[str, Any]], logits: Sequence[float], threshold: float,
              cap: int | None) -> list[str]:
    """Names of the slots whose request logit exceeds ``threshold``, at most ``cap`` of them (the highest
    logits), in schema order."""
    over = [(r, k) for k, r in enumerate(logits) if r > threshold]
    if cap is not None:
        over = sorted(over, reverse=True)[:cap]
    keep = {k for _, k in over}
    return [sl["name"] for k, sl in enumerate(slots) if k in keep]


def lexical_features(values: Sequence[str], user: str, system: str) -> torch.Tensor:
    """(N, 2): does the value occur verbatim in the user / system text (word-bounded, lower-case)."""
    ul, sl = user.lower(), system.lower()

    def occurs(v: str, text: str) -> float:
        forms = [v.lower()] + ([NUMBER_WORDS[int(v)]] if v.isdigit() and int(v) < len(NUMBER_WORDS) else [])
        return float(any(re.search(rf"(?<!\w){re.escape(f)}(?!\w)", text) for f in forms))

    return torch.tensor([[occurs(v, ul), occurs(v, sl)] for v in values], dtype=torch.float32)


def best_span(start: torch.Tensor, end: torch.Tensor, seg: torch.Tensor) -> tuple[int, int]:
    """argmax start+end with start <= end < start+MAX_SPAN_TOKENS inside one segment."""
    t = start.shape[0]
    score = start[:, None] + end[None, :]  # (T, T)
    i = torch.arange(t)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + MAX_SPAN_TOKENS) & (seg[:, None] == seg[None, :])
    score = score.masked_fill(~ok, float("-inf"))
    flat = int(score.argmax())
    return flat // t, flat % t
