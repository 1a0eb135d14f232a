"""Training of the tracker heads from SGD train dialogues (teacher-forced previous state).

Labels per user-turn frame and schema slot compare the gold state with the gold state of the same
service one user turn earlier: changed -> ``update`` (``dontcare`` when the new value is dontcare),
unchanged -> ``carry``; a changed value that is nowhere in the (user, system) pair but sits in another
service's state -> ``copy``. Non-categorical updates get a token span from the SGD span annotations
(user or system side), falling back to a case-insensitive string search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from solutions.customer_service.dst import (
    RECALL_TURNS,
    STATUS,
    VALUE_SEED_OFFSET,
    DialogueStateTracker,
    SchemaBank,
    TrackerConfig,
    TrackerHeads,
    TurnFeatures,
    empty_frame,
    encode_pairs,
    intent_features,
    lexical_features,
    member_seed,
)
from solutions.customer_service.encoder import MiniLMEncoder

# Offset of the seed of the description-augmentation draws (their own stream: with ``desc_augment`` 0 the heads
# train bit-identically to before it).
AUGMENT_SEED_OFFSET = 7919
# Status batches = whole turns (token keys once per turn) or independent (turn, slot) examples.
GROUP_STATUS_BY_TURN = True


@dataclass
class Examples:
    intent: list[tuple[int, list[int], list[float], int]] = field(default_factory=list)
    # (turn, slot description row, has value, categorical, status label, requested)
    status: list[tuple[int, Any, float, float, int, float]] = field(default_factory=list)
    value: list[tuple[int, list[Any], Any, int]] = field(default_factory=list)
    span: list[tuple[int, Any, int, int]] = field(default_factory=list)


def _char_to_tokens(f: TurnFeatures, seg: int, a: int, b: int) -> tuple[int, int] | None:
    idx = [i for i, (o0, o1) in enumerate(f.offsets) if f.seg[i] == seg and o1 > a and o0 < b]
    return (idx[0], idx[-1]) if idx else None


def build_examples(dialogues: list[dict[str, Any]], feats: list[TurnFeatures], bank: SchemaBank) -> Examples:
    ex = Examples()
    k = 0
    for d in dialogues:
        prev: dict[str, dict[str, Any]] = {}
        sys_turn: dict[str, Any] | None = None
        past: list[tuple[int, dict[str, Any] | None]] = []  # earlier pairs: (feature index, their system turn)
        for t in d["turns"]:
            if t["speaker"] != "USER":
                sys_turn = t
                continue
            f = feats[k]
            user, system = t["utterance"], (sys_turn or {}).get("utterance", "")
            cur = dict(prev)
            for fr in t["frames"]:
                svc = fr["service"]
                if svc not in bank.schemas:
                    continue
                schema, st = bank.schemas[svc], fr["state"]
                p = prev.get(svc, empty_frame())
                names = ["NONE"] + [i["name"] for i in schema["intents"]]
                if st["active_intent"] in names:
                    ds = [bank.none_row] + [bank.intent_row(svc, n) for n in names[1:]]
                    ex.intent.append((k, ds, [float(n == p["active_intent"]) for n in names],
                                      names.index(st["active_intent"])))
                for sl in schema["slots"]:
                    name, dsl = sl["name"], bank.slot_row(svc, sl["name"])
                    new, old = st["slot_values"].get(name), p["slot_values"].get(name)
                    cat = bool(sl.get("is_categorical"))
                    label = 0
                    if new and (not old or old[0] not in new):
                        label = _update_label(new, f, fr, sys_turn, user, system, name, prev, svc)
                        if label == 1 and cat and new[0] in sl["possible_values"]:
                            vals = list(sl["possible_values"])
                            ex.value.append((k, [bank.value_row(svc, name, v) for v in vals],
                                             lexical_features(vals, user, system), vals.index(new[0])))
                        elif label == 1 and not cat:
                            sp = _find_span(new, f, fr, sys_turn, user, system, name)
                            if sp is not None:
                                ex.span.append((k, dsl, sp[0], sp[1]))
                            else:
                                # The value is not in this (user, system) pair: accepted from an offer in an
                                # earlier system turn -> "recall" with a span on that turn's system side;
                                # otherwise unreachable, and teaching "update" only teaches false updates.
                                label = 0
                                for k2, st2 in reversed(past[-RECALL_TURNS:]):
                                    sp = _system_span(new, feats[k2], st2, name)
                                    if sp is not None:
                                        ex.span.append((k2, dsl, sp[0], sp[1]))
                                        label = STATUS.index("recall")
                                        break
                    ex.status.append((k, dsl, float(old is not None), float(cat), label,
                                      float(name in st["requested_slots"])))
                cur[svc] = st
            prev = cur
            past.append((k, sys_turn))
            k += 1
    return ex


def _update_label(new: list[str], f: TurnFeatures, fr: dict[str, Any], sys_turn: dict[str, Any] | None,
                  user: str, system: str, name: str, prev: dict[str, Any], svc: str) -> int:
    if new[0] == "dontcare":
        return STATUS.index("dontcare")
    low = (user + " \n " + system).lower()
    if any(v.lower() in low for v in new):
        return STATUS.index("update")
    if any(s["slot"] == name for s in fr.get("slots", [])):
        return STATUS.index("update")
    for other, ofr in prev.items():
        if other != svc and any(v[0] in new for v in ofr["slot_values"].values() if v):
            return STATUS.index("copy")
    return STATUS.index("update")


def _find_span(new: list[str], f: TurnFeatures, fr: dict[str, Any], sys_turn: dict[str, Any] | None,
               user: str, system: str, name: str) -> tuple[int, int] | None:
    for s in fr.get("slots", []):
        if s["slot"] == name:
            r = _char_to_tokens(f, 0, s["start"], s["exclusive_end"])
            if r:
                return r
    for sfr in (sys_turn or {}).get("frames", []):
        for s in sfr.get("slots", []):
            if s["slot"] == name and system[s["start"]:s["exclusive_end"]] in new:
                r = _char_to_tokens(f, 1, s["start"], s["exclusive_end"])
                if r:
                    return r
    for seg, text in ((0, user), (1, system)):
        for v in new:
            i = text.lower().find(v.lower())
            if i >= 0 and v:
                r = _char_to_tokens(f, seg, i, i + len(v))
                if r:
                    return r
    return None


def _system_span(new: list[str], f: TurnFeatures, sys_turn: dict[str, Any] | None, name: str) -> tuple[int, int] | None:
    """Token span of one of the values ``new`` on the system side of an earlier pair."""
    if not sys_turn:
        return None
    system = sys_turn.get("utterance", "")
    for sfr in sys_turn.get("frames", []):
        for s in sfr.get("slots", []):
            if s["slot"] == name and system[s["start"]:s["exclusive_end"]] in new:
                r = _char_to_tokens(f, 1, s["start"], s["exclusive_end"])
                if r:
                    return r
    low = system.lower()
    for v in new:
        i = low.find(v.lower())
        if v and i >= 0:
            r = _char_to_tokens(f, 1, i, i + len(v))
            if r:
                return r
    return None


def perturb_flags(was: torch.Tensor, valid: torch.Tensor, p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Was-active flags (B, m) of intent examples (column 0 = NONE, ``valid`` marks real candidates) with,
    for a share ``p`` of the rows, the flag moved to another real intent of the same service: the state an
    earlier wrong decision leaves behind. The gold label stays, so the head learns to switch away from it.
    ``generator``: the draws' own random stream (training passes one, so the noise leaves the other heads'
    initialisation and dropout draws exactly as without it)."""
    other = valid.clone()
    other[:, 0] = False
    other &= was == 0
    pick = (torch.rand(was.shape[0], generator=generator) < p) & other.any(1)
    if not pick.any():
        return was
    out = was.clone()
    out[pick] = 0.0
    out[pick, torch.multinomial(other[pick].float(), 1, generator=generator).squeeze(1)] = 1.0
    return out


# ----------------------------------------------------------------------------------------- loops
def _batches(n: int, bs: int, rng: random.Random, lengths: list[int] | None = None) -> list[list[int]]:
    """Shuffled batches; with ``lengths``, examples of similar token length share a batch (sorted
    inside chunks of 50 batches) so padded token tensors stay small."""
    idx = list(range(n))
    rng.shuffle(idx)
    if lengths is None:
        return [idx[i:i + bs] for i in range(0, n, bs)]
    out: list[list[int]] = []
    for c in range(0, n, 50 * bs):
        chunk = sorted(idx[c:c + 50 * bs], key=lambda i: lengths[i])
        out += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
    rng.shuffle(out)
    return out


def train_tracker(dialogues: list[dict[str, Any]], schemas: dict[str, dict[str, Any]], encoder: MiniLMEncoder,
                  cfg: TrackerConfig, reporter: Any = None, base: TrackerHeads | None = None,
                  feats: list[TurnFeatures] | None = None) -> DialogueStateTracker:
    """Encode the training turns, build labels, train every head; returns the tracker.

    ``base``: heads already trained on the same dialogues with the same seed (e.g. a stored tracker without
    ``ensemble_values``): their weights are taken over and only the heads they lack are trained. Every head
    group (main heads, a member's intent and slot heads, a member's value and span heads) trains from its own
    seed, so the result equals training everything from scratch. ``feats``: the encoder features of the
    dialogues' user turns (``iter_user_turns`` order, the precision of ``cfg``), e.g. a subset of a larger
    cached set (the pseudo-unseen harness); encoded here when ``None``."""
    from core.jobs import progress
    from solutions.customer_service.dst import iter_user_turns

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    flag_gen = torch.Generator().manual_seed(cfg.seed)   # the flag noise's own stream (perturb_flags)
    encoder = encoder.variant(cfg.encoder_int8)
    bank = SchemaBank(schemas, encoder, full=True)
    pairs = list(iter_user_turns(dialogues))
    if feats is None:
        feats = encode_pairs(encoder, [p[2] for p in pairs], [p[3] for p in pairs], desc="encoding SGD train",
                             reporter=reporter)
    elif len(feats) != len(pairs):
        raise ValueError(f"{len(feats)} turn features for {len(pairs)} user turns")
    ex = build_examples(dialogues, feats, bank)
    U = torch.from_numpy(np.stack([f.u for f in feats])).float()  # (N, 384)
    S = torch.from_numpy(np.stack([f.s for f in feats])).float()
    M = bank.matrix  # (P, 384) description embeddings
    # Schema-description augmentation (``desc_augment``, ``dst_augment``): a share of the examples see a
    # rewrite of their slot / intent / value description (rows appended to M), drawn from its own stream.
    aug_p = cfg.desc_augment
    variants = None
    if aug_p > 0:
        from solutions.customer_service.dst_augment import DescriptionVariants

        variants = DescriptionVariants(bank)
        M = variants.matrix
    heads = TrackerHeads(cfg)
    have: set[str] = set()
    if base is not None:
        state = base.state_dict()
        have = {k for k in heads.state_dict() if k in state}
        heads.load_state_dict({k: state[k] for k in have}, strict=False)

    def trained(module: nn.Module, prefix: str) -> bool:
        return all(prefix + k in have for k in module.state_dict())

    # The module whose intent / slot heads the intent and status losses train, and the flag noise's stream:
    # the main heads first, then each ensemble member (``cfg.ensemble``).
    cur: dict[str, Any] = {"m": heads, "gen": flag_gen, "agen": torch.Generator().manual_seed(cfg.seed + AUGMENT_SEED_OFFSET)}

    def desc_rows(rows: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        return rows if variants is None else variants.pick(rows, aug_p, cur["agen"], per_row)
    opt = torch.optim.AdamW([p for n, p in heads.named_parameters() if not n.startswith("members.")],
                            lr=cfg.lr, weight_decay=1e-4)
    heads.train()
    ce, bce = nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()
    # Unweighted: every false "update" breaks the joint goal for the rest of the dialogue, so the
    # head must not be pushed towards the rare classes (sqrt inverse-frequency weights doubled them).
    status_ce = nn.CrossEntropyLoss()

    # Index tensors, built once: a batch is a gather, not a Python loop.
    def padded(groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        m = max((len(g) for g in groups), default=1)
        idx = torch.tensor([g + [g[0]] * (m - len(g)) for g in groups], dtype=torch.long)
        mask = torch.tensor([[True] * len(g) + [False] * (m - len(g)) for g in groups])
        return idx, mask

    it_k = torch.tensor([e[0] for e in ex.intent])
    it_d, it_m = padded([e[1] for e in ex.intent])
    it_w = torch.tensor([e[2] + [0.0] * (it_d.shape[1] - len(e[2])) for e in ex.intent])
    it_y = torch.tensor([e[3] for e in ex.intent])
    st = torch.tensor([[e[0], e[1]] for e in ex.status])
    st_f = torch.tensor([[e[2], e[3]] for e in ex.status])
    st_y = torch.tensor([e[4] for e in ex.status])
    rq_y = torch.tensor([e[5] for e in ex.status])
    if ex.value:
        va_k = torch.tensor([e[0] for e in ex.value])
        va_d, va_m = padded([e[1] for e in ex.value])
        va_lex = torch.zeros(len(ex.value), va_d.shape[1], 2)
        for i, e in enumerate(ex.value):
            va_lex[i, : len(e[1])] = e[2]
        va_y = torch.tensor([e[3] for e in ex.value])
    sp = torch.tensor([[e[0], e[1], e[2], e[3]] for e in ex.span]) if ex.span else torch.zeros(0, 4, dtype=torch.long)

    def loss_intent(b: list[int]) -> torch.Tensor:
        bt = torch.tensor(b)
        k, d, m = it_k[bt], desc_rows(it_d[bt]), it_d.shape[1]
        n = len(b)
        pu = None
        mod = cur["m"]
        if mod.intent_reader is not None:
            h, seg, mask = tokens(k)
            pu = mod.intent_reader(h, mask & (seg == 0), M[d]).reshape(n * m, -1)
        was = (perturb_flags(it_w[bt], it_m[bt], cfg.intent_flag_noise, cur["gen"]) if cfg.intent_flag_noise
               else it_w[bt])
        x = intent_features(U[k].repeat_interleave(m, 0), S[k].repeat_interleave(m, 0), M[d.reshape(-1)],
                            was.reshape(-1), pu)
        lg = mod.intent(x).view(n, m).masked_fill(~it_m[bt], -1e4)
        return ce(lg, it_y[bt])

    def tokens(ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hs = [torch.from_numpy(feats[int(i)].h).float() for i in ks]
        sg = [torch.from_numpy(feats[int(i)].seg.astype(np.int64)) for i in ks]
        h = nn.utils.rnn.pad_sequence(hs, batch_first=True)  # (B, T, 384)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in hs], batch_first=True)
        return h, nn.utils.rnn.pad_sequence(sg, batch_first=True), mask

    # Status examples grouped by turn: a batch is a set of turns with all their (turn, slot) examples, so
    # the token keys of a turn are computed once, not once per slot of its services (whole training run
    # on 2,000 dialogues: 120 vs 163 CPU-s, and a better tracker on held-out train dialogues).
    by_turn: dict[int, list[int]] = {}
    for i, se in enumerate(ex.status):
        by_turn.setdefault(se[0], []).append(i)
    st_turns = sorted(by_turn)
    st_groups = [torch.tensor(by_turn[k_]) for k_ in st_turns]

    def loss_status_flat(b: list[int]) -> torch.Tensor:
        bt = torch.tensor(b)
        r, f = st[bt], st_f[bt]
        h, seg, mask = tokens(r[:, 0])
        lg, rq = cur["m"].slot(h, seg, mask, M[desc_rows(r[:, 1])], U[r[:, 0]], S[r[:, 0]], f[:, 0], f[:, 1])
        return status_ce(lg, st_y[bt]) + bce(rq, rq_y[bt])

    def loss_status(b: list[int]) -> torch.Tensor:
        ks = [st_turns[i] for i in b]
        bt = torch.cat([st_groups[i] for i in b])
        rows = torch.cat([torch.full((len(st_groups[i]),), j, dtype=torch.long) for j, i in enumerate(b)])
        r, f = st[bt], st_f[bt]
        h, seg, mask = tokens(torch.tensor(ks))
        lg, rq = cur["m"].slot(h, seg, mask, M[desc_rows(r[:, 1])], U[r[:, 0]], S[r[:, 0]], f[:, 0], f[:, 1],
                               rows=rows)
        return status_ce(lg, st_y[bt]) + bce(rq, rq_y[bt])

    def loss_value(b: list[int]) -> torch.Tensor:
        bt = torch.tensor(b)
        k, d, m = va_k[bt], va_d[bt], va_d.shape[1]
        u, s = U[k][:, None].expand(-1, m, -1), S[k][:, None].expand(-1, m, -1)
        dv = M[desc_rows(d, per_row=True)]  # (B, m, 384)
        x = torch.cat([u, s, dv, u * dv, s * dv, va_lex[bt]], -1)
        lg = cur["m"].value(x).squeeze(-1).masked_fill(~va_m[bt], -1e4)
        return ce(lg, va_y[bt])

    def loss_span(b: list[int]) -> torch.Tensor:
        r = sp[torch.tensor(b)]
        hs = [torch.from_numpy(feats[int(i)].h).float() for i in r[:, 0]]
        h = nn.utils.rnn.pad_sequence(hs, batch_first=True)  # (B, T, 384)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in hs], batch_first=True)
        lg = cur["m"].span(h, M[desc_rows(r[:, 1])]).masked_fill(~mask[..., None], -1e4)  # (B, T, 2)
        return ce(lg[..., 0], r[:, 2]) + ce(lg[..., 1], r[:, 3])

    bs = cfg.batch_size
    per_turn = max(1, round(len(ex.status) / max(1, len(st_turns))))
    status_step = (("status", loss_status, len(st_turns), max(1, bs // 4 // per_turn)) if GROUP_STATUS_BY_TURN
                   else ("status", loss_status_flat, len(ex.status), bs // 4))
    plan = [("intent", loss_intent, len(ex.intent), bs // 2), status_step,
            ("value", loss_value, len(ex.value), bs // 2), ("span", loss_span, len(ex.span), bs // 8)]
    tok_len = {"intent": [len(feats[e[0]].seg) for e in ex.intent] if heads.intent_reader is not None else None,
               "status": [len(feats[k_].seg) for k_ in st_turns] if GROUP_STATUS_BY_TURN
               else [len(feats[e[0]].seg) for e in ex.status], "span": [len(feats[e[0]].seg) for e in ex.span]}

    def fit(plan: list[Any], rng: random.Random, opt: torch.optim.Optimizer, desc: str) -> None:
        steps = [(name, fn, b) for _ in range(cfg.epochs) for name, fn, n, bs in plan
                 for b in _batches(n, bs, rng, tok_len.get(name))]
        rng.shuffle(steps)  # interleave heads (they share no weights, but one bar for all)
        for _name, fn, b in progress(steps, desc=desc, reporter=reporter):
            opt.zero_grad()
            fn(b).backward()
            opt.step()

    main = nn.ModuleDict({k: v for k, v in heads.named_children() if k != "members"})
    if not trained(main, ""):
        fit(plan, rng, opt, "training tracker heads")
    # Ensemble members: intent and status/request heads, each from its own seed (initialisation in
    # ``TrackerHeads``, batches, dropout, flag noise); with ``ensemble_values`` then their value and span
    # heads, from a third stream (so the intent and status heads train as without them).
    for i, member in enumerate(heads.members, start=1):
        seed = member_seed(cfg.seed, i)
        groups = [(("intent", "status"), seed, f"training ensemble member {i + 1}/{cfg.ensemble}")]
        if cfg.ensemble_values:
            groups.append((("value", "span"), seed + VALUE_SEED_OFFSET,
                           f"training value / span heads of member {i + 1}/{cfg.ensemble}"))
        for steps, sd, desc in groups:
            params = nn.ModuleDict({k: v for k, v in member.named_children()
                                    if (k in ("value", "span")) == (steps[0] == "value")})
            if trained(params, f"members.{i - 1}.") or not len(params):
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sd)
                cur.update(m=member, gen=torch.Generator().manual_seed(sd),
                           agen=torch.Generator().manual_seed(sd + AUGMENT_SEED_OFFSET))
                fit([step for step in plan if step[0] in steps], random.Random(sd),
                    torch.optim.AdamW(params.parameters(), lr=cfg.lr, weight_decay=1e-4), desc)
    heads.eval()
    cfg.train_dialogues = len(dialogues)
    cfg.trained_services = sorted(schemas)
    return DialogueStateTracker(heads, cfg, encoder)
