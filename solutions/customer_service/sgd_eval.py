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


def slot_score(ref: list[str] | None, hyp: list[str] | None, exact: bool) -> float:
    """Score of one slot: ``ref`` / ``hyp`` its value lists (None: not in that state). A reference value:
    exact match (categorical, or ``exact``) or the fuzzy ratio of the hypothesis' first value, 0 without
    one; no reference value: 1, or 0 when the hypothesis has the slot."""
    if ref is not None:
        if not hyp:
            return 0.0
        return float(hyp[0] in ref) if exact else fuzzy_match(ref, hyp[0])
    return 0.0 if hyp is not None else 1.0


def frame_metrics(ref: dict[str, Any], hyp: dict[str, Any], schema: dict[str, Any],
                  fuzzy: bool = True) -> dict[str, float]:
    """Scores of one frame. ``ref``/``hyp`` are SGD ``state`` dicts."""
    rv, hv = ref.get("slot_values", {}), hyp.get("slot_values", {})
    active, all_acc = [], []
    for slot in schema["slots"]:
        name = slot["name"]
        acc = slot_score(rv.get(name), hv.get(name), bool(slot.get("is_categorical")) or not fuzzy)
        if name in rv:
            active.append(acc)
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


# ------------------------------------------------------------------------------- error breakdown
def _slot_ok(ref: list[str] | None, hyp: list[str] | None, categorical: bool) -> bool:
    """The slot scores 1 in ``frame_metrics`` (fuzzy ratio 1.0 for non-categorical values)."""
    return slot_score(ref, hyp, categorical) >= 1.0


def _value_source(vals: list[str], user: str, system: str, earlier: list[str],
                  other_states: list[dict[str, Any]]) -> str:
    """Where a reference update's value is found: ``dontcare``, the ``user`` turn, the previous ``system``
    turn (an accepted offer), an ``earlier_system`` turn (recall), ``other_service`` (cross-service copy),
    else ``paraphrase`` (a categorical value not said literally, e.g. "True" for "yes, with wifi")."""
    if vals[0] == "dontcare":
        return "dontcare"
    low = [v.lower() for v in vals if v]
    for name, text in (("user", user), ("system", system)):
        if any(v in text.lower() for v in low):
            return name
    if any(v in t.lower() for t in earlier for v in low):
        return "earlier_system"
    if any(v and v[0] in vals for st in other_states for v in st.values()):
        return "other_service"
    return "paraphrase"


def slot_error_breakdown(refs: list[dict[str, Any]], hyps: list[dict[str, Any]], schemas: dict[str, dict[str, Any]],
                         seen_services: set[str], earlier_turns: int = 4) -> dict[str, Any]:
    """Which slot errors break the joint goal, by kind, at the turn the error starts (its *onset*: the
    slot was right, or the service was new, one user turn earlier) and over the frames it keeps breaking.

    Kinds: ``update_missed:<source>`` (the reference changed the slot, the hypothesis kept its old
    value), ``wrong_value:<categorical|span_boundary|wrong_entity|dontcare>:<source>`` (both changed, to
    different values; ``span_boundary``: fuzzy ratio >= 0.5 or one value contains the other),
    ``false_update:<empty|filled>`` (the reference kept the slot, the hypothesis changed it; ``empty``:
    the reference slot has no value, so any value breaks the joint goal), ``false_dontcare``;
    ``<source>`` as ``_value_source``. Returns ``{"seen"|"unseen": {"frames", "frames_failed",
    "onsets": {kind: n}, "frames_broken": {kind: frames whose joint goal that live error breaks}}}``
    (a failed frame with two live errors counts for both)."""
    out: dict[str, Any] = {}
    for dr, dh in zip(refs, hyps, strict=True):
        prev_ref: dict[str, dict[str, list[str]]] = {}
        prev_hyp: dict[str, dict[str, list[str]]] = {}
        live: dict[tuple[str, str], str] = {}
        system, systems = "", []
        for tr, th in zip(dr["turns"], dh["turns"], strict=True):
            if tr["speaker"] != "USER":
                system = tr["utterance"]
                systems.append(system)
                continue
            hyp_by = {f["service"]: f.get("state", {}).get("slot_values", {}) for f in th.get("frames", [])}
            for fr in tr["frames"]:
                svc = fr["service"]
                if svc not in schemas:
                    continue
                b = out.setdefault("seen" if svc in seen_services else "unseen",
                                   {"frames": 0, "frames_failed": 0, "onsets": {}, "frames_broken": {}})
                rv, hv = fr["state"].get("slot_values", {}), hyp_by.get(svc, {})
                pr, ph = prev_ref.get(svc, {}), prev_hyp.get(svc, {})
                broken = []
                for sl in schemas[svc]["slots"]:
                    name, cat = sl["name"], bool(sl.get("is_categorical"))
                    r, h = rv.get(name), hv.get(name)
                    if _slot_ok(r, h, cat):
                        live.pop((svc, name), None)
                        continue
                    if (svc, name) not in live or _slot_ok(pr.get(name), ph.get(name), cat):
                        live[(svc, name)] = _error_kind(
                            r, h, pr.get(name), ph.get(name), cat, tr["utterance"], system,
                            systems[-earlier_turns - 1:-1], [s for o, s in prev_ref.items() if o != svc])
                        b["onsets"][live[(svc, name)]] = b["onsets"].get(live[(svc, name)], 0) + 1
                    broken.append(live[(svc, name)])
                b["frames"] += 1
                if broken:
                    b["frames_failed"] += 1
                    for k in set(broken):
                        b["frames_broken"][k] = b["frames_broken"].get(k, 0) + 1
                prev_ref[svc], prev_hyp[svc] = rv, hv
    for b in out.values():
        for key in ("onsets", "frames_broken"):
            b[key] = dict(sorted(b[key].items(), key=lambda kv: -kv[1]))
    return out


def _error_kind(r: list[str] | None, h: list[str] | None, pr: list[str] | None, ph: list[str] | None, cat: bool,
                user: str, system: str, earlier: list[str], other_states: list[dict[str, Any]]) -> str:
    ref_changed = bool(r) and r != pr
    hyp_changed = bool(h) and h != ph
    if not ref_changed:
        if h and h[0] == "dontcare":
            return "false_dontcare"
        return f"false_update:{'filled' if r else 'empty'}" if hyp_changed else "lost"
    src = _value_source(r, user, system, earlier, other_states)  # type: ignore[arg-type]
    if not hyp_changed:
        return f"update_missed:{src}"
    assert r is not None and h is not None  # noqa: S101 - both changed
    if r[0] == "dontcare" or h[0] == "dontcare":
        kind = "dontcare"
    elif cat:
        kind = "categorical"
    else:
        hl, close = h[0].lower(), fuzzy_match(r, h[0]) >= 0.5
        kind = "span_boundary" if close or any(v.lower() in hl or hl in v.lower() for v in r) else "wrong_entity"
    return f"wrong_value:{kind}:{src}"
