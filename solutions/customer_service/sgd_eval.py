"""Dialogue state tracking metrics with the semantics of the official SGD evaluator
(google-research/schema_guided_dst ``evaluate.py`` / ``metrics.py``).

Per user turn and per *reference frame* (service), on the hypothesis frame of the same service
(an empty frame when missing):
  - ``active_intent_accuracy``: exact match of the active intent.
  - ``requested_slots_f1``: F1 over the requested-slot sets (1.0 when both are empty).
  - per slot of the service schema: categorical -> 1 if the hypothesis value is among the reference
    values; non-categorical -> best ``token_sort_ratio / 100`` against the reference values (fuzzy);
    a slot in neither -> 1 (joint only); in one but not the other -> 0.
  - ``average_goal_accuracy``: mean over the slots active in the reference (frames with none are
    skipped); ``joint_goal_accuracy``: product over all slots of the service.
Frame-level scores are averaged over all frames, and separately over frames of services seen in
the training schema (``_seen``) and not (``_unseen``).
"""

from __future__ import annotations

import math
from typing import Any

from rapidfuzz.fuzz import token_sort_ratio
from rapidfuzz.utils import default_process

KEYS = ("joint_goal_accuracy", "average_goal_accuracy", "intent_accuracy", "requested_slots_f1")


def fuzzy_match(refs: list[str], hyp: str) -> float:
    # fuzzywuzzy (the official dependency) lower-cases and strips punctuation first: default_process.
    return max(token_sort_ratio(r, hyp, processor=default_process) / 100.0 for r in refs)


def requested_f1(ref: list[str], hyp: list[str]) -> float:
    r, h = set(ref), set(hyp)
    tp = len(r & h)
    p = tp / len(h) if h else 1.0
    rc = tp / len(r) if r else 1.0
    return 2 * p * rc / (p + rc) if p + rc > 0 else 0.0


def frame_metrics(ref: dict[str, Any], hyp: dict[str, Any], schema: dict[str, Any],
                  fuzzy: bool = True) -> dict[str, float]:
    """Scores of one frame. ``ref``/``hyp`` are SGD ``state`` dicts."""
    rv, hv = ref.get("slot_values", {}), hyp.get("slot_values", {})
    active, all_acc = [], []
    for slot in schema["slots"]:
        name = slot["name"]
        if name in rv:
            if name in hv and hv[name]:
                h = hv[name][0]
                acc = float(h in rv[name]) if slot.get("is_categorical") or not fuzzy else fuzzy_match(rv[name], h)
            else:
                acc = 0.0
            active.append(acc)
        else:
            acc = 0.0 if name in hv else 1.0
        all_acc.append(acc)
    return {
        "intent_accuracy": float(ref.get("active_intent") == hyp.get("active_intent")),
        "requested_slots_f1": requested_f1(ref.get("requested_slots", []), hyp.get("requested_slots", [])),
        "average_goal_accuracy": sum(active) / len(active) if active else math.nan,
        "joint_goal_accuracy": math.prod(all_acc),
    }


def evaluate_dialogues(refs: list[dict[str, Any]], hyps: list[dict[str, Any]], schemas: dict[str, dict[str, Any]],
                       seen_services: set[str], with_intents: bool = True) -> dict[str, float | int | None]:
    """Aggregate frame metrics over all user turns; ``hyps`` aligned with ``refs`` (same turns)."""
    from core.errors import DataError

    if len(refs) != len(hyps):
        raise DataError(f"prediction has {len(hyps)} dialogues, reference {len(refs)}")
    buckets: dict[str, dict[str, list[float]]] = {b: {k: [] for k in KEYS} for b in ("", "_seen", "_unseen")}
    for dr, dh in zip(refs, hyps, strict=True):
        for tr, th in zip(dr["turns"], dh["turns"], strict=True):
            if tr["speaker"] != "USER":
                continue
            hyp_by = {f["service"]: f.get("state", {}) for f in th.get("frames", [])}
            for fr in tr["frames"]:
                svc = fr["service"]
                if svc not in schemas:
                    continue
                m = frame_metrics(fr["state"], hyp_by.get(svc, {}), schemas[svc])
                for b in ("", "_seen" if svc in seen_services else "_unseen"):
                    for k, v in m.items():
                        if not math.isnan(v):
                            buckets[b][k].append(v)
    out: dict[str, float | int | None] = {}
    for b, ms in buckets.items():
        for k, vs in ms.items():
            if not with_intents and k in ("intent_accuracy", "requested_slots_f1"):
                continue
            out[k + b] = round(sum(vs) / len(vs), 4) if vs else None
    out["frames"] = len(buckets[""]["joint_goal_accuracy"])
    out["frames_seen"] = len(buckets["_seen"]["joint_goal_accuracy"])
    out["frames_unseen"] = len(buckets["_unseen"]["joint_goal_accuracy"])
    return out
