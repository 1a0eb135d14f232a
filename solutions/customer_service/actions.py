"""Next-action suggestion for the agent, trained on STAR's wizard action labels.

Example = one wizard ``pick_suggestion`` event: the context is the last user utterance, the wizard's
previous utterance and the previous action's template text; the target is the chosen ``ActionLabel``.

Models (MiniLM features, sklearn / torch heads):
  - ``ActionClassifier``: logistic regression over the context features (in-domain).
  - ``ActionScorer``: schema-guided zero-shot scorer. An MLP scores (context, action template text)
    pairs, trained on the seen domains; at test time it ranks the templates of any action, including
    the actions of a domain never trained on (``responses.json`` of each STAR task is the schema).
  - Baselines: majority action, and retrieval (the action of the nearest training context, cosine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from solutions.customer_service.encoder import DIM, MiniLMEncoder

HELD_OUT_DOMAIN = "ride"


@dataclass
class ActionExample:
    dialogue_id: int
    domains: tuple[str, ...]
    user: str
    prev_wizard: str
    prev_action: str
    label: str


def star_examples(dialogues: list[dict[str, Any]]) -> list[ActionExample]:
    out = []
    for d in dialogues:
        user, prev_wiz, prev_act = "", "", "none"
        domains = tuple(x for x in (d.get("Scenario", {}).get("Domains") or []) if x)
        for e in d.get("Events", []):
            if e.get("Agent") == "User" and e.get("Action") == "utter":
                user = e.get("Text", "")
            elif e.get("Agent") == "Wizard" and e.get("Action") in ("pick_suggestion", "utter"):
                if e.get("ActionLabel"):
                    out.append(ActionExample(int(d["DialogueID"]), domains, user, prev_wiz, prev_act, e["ActionLabel"]))
                    prev_act = e["ActionLabel"]
                prev_wiz = e.get("Text", "")
    return out


def context_texts(ex: Sequence[ActionExample]) -> tuple[list[str], list[str]]:
    return [e.user or " " for e in ex], [e.prev_wizard or " " for e in ex]


def features(ex: Sequence[ActionExample], encoder: MiniLMEncoder) -> np.ndarray:
    """(N, 768) = [user utterance, previous wizard utterance] embeddings."""
    users, wiz = context_texts(ex)
    return np.hstack([encoder.encode(users, desc="encoding STAR users"), encoder.encode(wiz, desc="encoding STAR wizard")])


def action_text(label: str, templates: dict[str, str]) -> str:
    return f"{label.replace('_', ' ')}: {templates.get(label, '')}"


class ActionScorer(nn.Module):
    """score(context (768), action description (384)) -> scalar."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(4 * DIM), nn.Linear(4 * DIM, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, ctx: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """ctx (B, 768), act (A, 384) -> logits (B, A)."""
        b, a = ctx.shape[0], act.shape[0]
        c = ctx[:, None, :].expand(b, a, 2 * DIM)
        s = act[None, :, :].expand(b, a, DIM)
        x = torch.cat([c, s, c[..., :DIM] * s], -1)
        return self.net(x).squeeze(-1)


def train_scorer(x: np.ndarray, labels: Sequence[str], action_vecs: dict[str, np.ndarray], epochs: int = 6,
                 seed: int = 13) -> ActionScorer:
    """Softmax over the training actions' descriptions; the scorer sees descriptions, not ids."""
    from core.jobs import progress

    torch.manual_seed(seed)
    names = sorted(set(labels))
    acts = torch.from_numpy(np.stack([action_vecs[n] for n in names])).float()
    y = torch.tensor([names.index(label) for label in labels])
    ctx = torch.from_numpy(x).float()
    model = ActionScorer()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    steps = [b for _ in range(epochs) for b in np.array_split(rng.permutation(len(y)), max(1, len(y) // 128))]
    for b in progress(steps, desc="training action scorer"):
        bt = torch.from_numpy(b)
        loss = nn.functional.cross_entropy(model(ctx[bt], acts), y[bt])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def scorer_predict(model: ActionScorer, x: np.ndarray, candidates: Sequence[str],
                   action_vecs: dict[str, np.ndarray]) -> list[str]:
    acts = torch.from_numpy(np.stack([action_vecs[c] for c in candidates])).float()
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(x), 512):
            lg = model(torch.from_numpy(x[i:i + 512]).float(), acts)
            out += [candidates[j] for j in lg.argmax(-1).tolist()]
    return out


def retrieval_predict(train_x: np.ndarray, train_y: Sequence[str], x: np.ndarray) -> list[str]:
    """Nearest training context by cosine over the concatenated embeddings."""
    def norm(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)

    tx, qx = norm(train_x), norm(x)
    out: list[str] = []
    for i in range(0, len(qx), 1024):
        out += [train_y[j] for j in (qx[i:i + 1024] @ tx.T).argmax(1)]
    return out


def action_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float | int]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": round(float(accuracy_score(gold, pred)), 4),
            "weighted_f1": round(float(f1_score(gold, pred, average="weighted", zero_division=0)), 4),
            "n": len(gold)}
