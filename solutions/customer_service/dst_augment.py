"""Schema-description augmentation for tracker training (in the spirit of SGD-X, Lee et al. 2022).

The heads are conditioned on description embeddings (``dst.schema_texts``). With only 16-ish training
schemas they can key on the exact wording of those descriptions; unseen services are described in other
words. During head training each example may see, instead of its original slot / intent / value
description, one of a few rewrites of it (the slot name in words, the description without its service
context, name and description together, the service reduced to its domain word, a categorical slot's
description with a few of its values). At inference (``desc_mean``, ``MeanVariantBank``) each description
vector is the mean of the original's embedding and its rewrites'.

``DescriptionVariants`` embeds the variants once (a few thousand MiniLM calls, deduplicated) and appends
them to the training bank's description matrix; ``pick`` swaps row indices for variant rows.
"""

from __future__ import annotations

from typing import Any

import torch

from solutions.customer_service.dst import SchemaBank, _words, schema_texts

# Variants per description (the original is not one of them); fewer distinct texts are cycled.
N_VARIANTS = 4


def _domain(schema: dict[str, Any]) -> str:
    return _words(schema["service_name"].split("_")[0])


def _service(schema: dict[str, Any]) -> str:
    return f"{_domain(schema)}: {schema.get('description', '')}"


def slot_variants(schema: dict[str, Any], slot: dict[str, Any]) -> list[str]:
    """Rewrites of ``schema_texts``'s slot description "<description> (<domain>: <service description>)"."""
    desc, name, svc, dom = slot.get("description") or _words(slot["name"]), _words(slot["name"]), \
        _service(schema), _domain(schema)
    out = [desc, f"{name} ({svc})", f"{name}: {desc}", f"{desc} ({dom})"]
    if slot.get("is_categorical") and slot.get("possible_values"):
        out[3] = f"{desc}, for example {', '.join(slot['possible_values'][:3])} ({dom})"
    return out


def intent_variants(schema: dict[str, Any], intent: dict[str, Any]) -> list[str]:
    desc, name, svc, dom = intent.get("description") or _words(intent["name"]), _words(intent["name"]), \
        _service(schema), _domain(schema)
    return [desc, f"{name} ({svc})", f"{name}: {desc}", f"{desc} ({dom})"]


def value_variants(schema: dict[str, Any], slot: dict[str, Any], v: str) -> list[str]:
    """Rewrites of "<slot description> is <value>"."""
    desc, name = slot.get("description") or _words(slot["name"]), _words(slot["name"])
    return [f"{name} is {v}", f"{desc}: {v}", f"{name}: {v}", f"{desc} is {v} ({_domain(schema)})"]


class DescriptionVariants:
    """Variant rows for a training ``SchemaBank`` (``full=True``).

    ``matrix``: the bank's matrix with the variant embeddings appended (original rows keep their index);
    ``alt`` (rows, N_VARIANTS): the variant rows of each original row (a row without variants, e.g. the
    NONE intent, points to itself)."""

    def __init__(self, bank: SchemaBank) -> None:
        texts: dict[int, list[str]] = {}
        for svc, schema in bank.schemas.items():
            for sl in schema["slots"]:
                texts[bank.slot_row(svc, sl["name"])] = slot_variants(schema, sl)
                if sl.get("is_categorical"):
                    for v in sl["possible_values"]:
                        texts[bank.value_row(svc, sl["name"], v)] = value_variants(schema, sl, v)
            for it in schema["intents"]:
                texts[bank.intent_row(svc, it["name"])] = intent_variants(schema, it)
        pool = list(dict.fromkeys(t for vs in texts.values() for t in vs))
        vecs = torch.from_numpy(bank.encoder.encode(pool)).float() if pool else torch.zeros(0, bank.matrix.shape[1])
        base = bank.matrix.shape[0]
        index = {t: base + i for i, t in enumerate(pool)}
        self.matrix = torch.cat([bank.matrix, vecs])
        self.alt = torch.arange(base)[:, None].repeat(1, N_VARIANTS)
        for row, vs in texts.items():
            self.alt[row] = torch.tensor([index[vs[j % len(vs)]] for j in range(N_VARIANTS)])
        self.texts = len(pool)

    def pick(self, rows: torch.Tensor, p: float, generator: torch.Generator, per_row: bool = False) -> torch.Tensor:
        """``rows`` with a share ``p`` replaced by one of their variants (uniform). ``per_row``: one draw per
        row of a 2-D ``rows`` (the candidates of one example, e.g. a slot's values, share the rewrite)."""
        shape = (rows.shape[0],) + (1,) * (rows.dim() - 1) if per_row else rows.shape
        use = torch.rand(shape, generator=generator) < p
        j = torch.randint(N_VARIANTS, shape, generator=generator)
        return torch.where(use, self.alt[rows, j.expand_as(rows)], rows)


def variant_texts(schemas: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Each description string of ``dst.schema_texts`` (slot, intent, categorical value) -> its rewrites."""
    out: dict[str, list[str]] = {}
    for schema in schemas.values():
        t = schema_texts(schema)
        for sl in schema["slots"]:
            out[t["slots"][sl["name"]]] = slot_variants(schema, sl)
            for v, text in t["values"].get(sl["name"], {}).items():
                out[text] = value_variants(schema, sl, v)
        for it in schema["intents"]:
            out[t["intents"][it["name"]]] = intent_variants(schema, it)
    return out


class MeanVariantBank(SchemaBank):
    """A tracking ``SchemaBank`` whose description vectors are the mean of the original description's embedding
    and its rewrites' (``desc_mean``: for heads trained with ``desc_augment``), rescaled to the original's norm;
    texts without rewrites (the NONE intent) keep their embedding. Same lazy embedding as ``SchemaBank``."""

    def __init__(self, schemas: dict[str, dict[str, Any]], encoder: Any, full: bool = False) -> None:
        self._variants = variant_texts(schemas)
        super().__init__(schemas, encoder, full)

    def _add(self, texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self.vec]
        if not todo:
            return
        pool = list(dict.fromkeys(todo + [v for t in todo for v in self._variants.get(t, [])]))
        emb = dict(zip(pool, torch.from_numpy(self.encoder.encode(pool)).float(), strict=True))
        for t in todo:
            v = emb[t]
            if self._variants.get(t):
                m = torch.stack([v] + [emb[x] for x in self._variants[t]]).mean(0)
                v = m / m.norm() * v.norm()
            self.vec[t] = v


def tracking_bank(schemas: dict[str, dict[str, Any]], encoder: Any, cfg: Any) -> SchemaBank:
    """The bank a tracker reads descriptions from: ``MeanVariantBank`` when ``cfg.desc_mean`` (off in configs stored
    before the field: the plain ``SchemaBank``). ``DialogueStateTracker.bank`` builds its banks with this."""
    return (MeanVariantBank if cfg.desc_mean else SchemaBank)(schemas, encoder)
