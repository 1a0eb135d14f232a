"""Loaders for the customer-service datasets, with clear errors for missing or malformed files.

``data_root`` is a folder laid out like ``../shared/data/customer_service``::

    sgd/{train,dev,test}/dialogues*.json[.gz] + schema.json     Schema-Guided Dialogue (original objects)
    multiwoz21/val.json.zip | test.json.zip                      MultiWOZ 2.1 (ConvLab) + multiwoz22_schema/
    banking77/train.csv, test.csv, categories.json               text,category
    clinc150/data.json                                           train/val/test + oos_{train,val,test}
    dstc11/development/, test-banking/, test-finance/            test-utterances.jsonl
    star/dialogues.json.gz (+ star/test/dialogues.json.gz), star/tasks/<task>/responses.json

Splits that the shared data does not provide are fixed, seeded parts of train (documented in
README.md): Banking77 ``dev`` = 10% of ``train.csv`` stratified by intent (seed 13); STAR ``dev`` = the
dialogues with ``DialogueID % 10 == 0`` (10%).
"""

from __future__ import annotations

import csv
import gzip
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.errors import DataError

Split = Literal["train", "dev", "test"]
DATASETS = ("sgd", "multiwoz21", "banking77", "clinc150", "dstc11", "star")
SEED = 13
OOS = "oos"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path} (expected a folder laid out like shared/data/customer_service)")
    return path


def _read_json(path: Path) -> Any:
    _need(path, "data file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".json")]
                if not names:
                    raise DataError(f"{path}: the zip holds no .json file")
                return json.loads(z.read(names[0]).decode("utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------- SGD
@dataclass
class SGDSplit:
    """Original SGD dialogue objects plus the split's schema, keyed by service name."""

    dialogues: list[dict[str, Any]]
    schemas: dict[str, dict[str, Any]]


def load_sgd(root: Path, split: Split, limit: int | None = None) -> SGDSplit:
    folder = _need(Path(root) / "sgd" / split, f"SGD {split} folder")
    schema = _read_json(_need(folder / "schema.json", "SGD schema"))
    files = sorted(p for p in folder.iterdir() if p.name.startswith("dialogues") and p.name.endswith((".json", ".gz")))
    if not files:
        raise DataError(f"{folder}: no dialogues*.json[.gz] files")
    dialogues: list[dict[str, Any]] = []
    for p in files:
        part = _read_json(p)
        if not isinstance(part, list):
            raise DataError(f"{p}: expected a JSON list of dialogues")
        dialogues.extend(part)
    for d in dialogues[:5]:
        if not isinstance(d, dict) or "turns" not in d or "services" not in d:
            raise DataError(f"{folder}: dialogue objects need 'dialogue_id', 'services' and 'turns'")
    if not isinstance(schema, list) or not all("service_name" in s for s in schema):
        raise DataError(f"{folder / 'schema.json'}: expected a list of services with 'service_name'")
    if limit is not None:
        dialogues = dialogues[:limit]
    return SGDSplit(dialogues, {s["service_name"]: s for s in schema})


def sgd_train_services(root: Path) -> set[str]:
    """Services of the SGD training schema: 'seen' in the official evaluation."""
    return {s["service_name"] for s in _read_json(Path(root) / "sgd" / "train" / "schema.json")}


# --------------------------------------------------------------------------------------- MultiWOZ
MWOZ_NONE = {"", "none", "not mentioned"}
MWOZ_DONTCARE = {"dontcare", "don't care", "dont care", "do n't care", "do not care"}
MWOZ_DOMAINS = ("hotel", "train", "attraction", "restaurant", "taxi")


def load_multiwoz(root: Path, split: Split) -> SGDSplit:
    """MultiWOZ 2.1 (ConvLab layout) converted to SGD dialogue objects with the MultiWOZ 2.2 schema.

    The belief state after user turn t is the ``metadata`` of system turn t+1; slot names map to the
    2.2 schema (``restaurant-pricerange``). Only the five evaluated domains are kept.
    """
    name = {"dev": "val", "test": "test"}.get(split)
    if name is None:
        raise DataError("MultiWOZ 2.1 has no train split here (it is used zero-shot from SGD)")
    base = _need(Path(root) / "multiwoz21", "MultiWOZ folder")
    raw = _read_json(base / f"{name}.json.zip")
    schema_path = base / "multiwoz22_schema" / "data" / "MultiWOZ_2.2" / "schema.json"
    schema = {s["service_name"]: s for s in _read_json(schema_path) if s["service_name"] in MWOZ_DOMAINS}
    valid = {sn: {sl["name"] for sl in s["slots"]} for sn, s in schema.items()}
    out = []
    for did, d in raw.items():
        log = d.get("log")
        if not isinstance(log, list):
            raise DataError(f"{base}: dialogue {did} has no 'log' list")
        turns, services = [], set()
        for i in range(0, len(log) - 1, 2):
            user, system = log[i], log[i + 1]
            state: dict[str, dict[str, list[str]]] = {}
            for dom, parts in (system.get("metadata") or {}).items():
                if dom not in schema:
                    continue
                for part in ("semi", "book"):
                    for k, v in (parts.get(part) or {}).items():
                        if k == "booked" or not isinstance(v, str) or v.strip().lower() in MWOZ_NONE:
                            continue
                        slot = f"{dom}-{'book' if part == 'book' else ''}{k.lower()}"
                        if slot not in valid[dom]:
                            continue
                        val = "dontcare" if v.strip().lower() in MWOZ_DONTCARE else v.strip()
                        state.setdefault(dom, {})[slot] = [val]
            services |= set(state)
            frames = [{"service": s, "slots": [], "actions": [],
                       "state": {"active_intent": "NONE", "requested_slots": [], "slot_values": sv}}
                      for s, sv in state.items()]
            turns.append({"speaker": "USER", "utterance": user.get("text", ""), "frames": frames})
            turns.append({"speaker": "SYSTEM", "utterance": system.get("text", ""), "frames": []})
        out.append({"dialogue_id": did, "services": sorted(services), "turns": turns})
    return SGDSplit(out, schema)


# ------------------------------------------------------------------------------ intent datasets
@dataclass
class IntentData:
    texts: list[str]
    labels: list[str]  # "oos" marks out-of-scope
    label_names: list[str] = field(default_factory=list)


def load_banking77(root: Path, split: Split) -> IntentData:
    base = _need(Path(root) / "banking77", "Banking77 folder")
    path = base / ("test.csv" if split == "test" else "train.csv")
    rows = _read_csv(path)
    if split != "test":
        import numpy as np

        rng = np.random.default_rng(SEED)
        by_label: dict[str, list[int]] = {}
        for i, (_, c) in enumerate(rows):
            by_label.setdefault(c, []).append(i)
        dev_idx: set[int] = set()
        for c in sorted(by_label):
            idx = by_label[c]
            dev_idx |= set(rng.permutation(idx)[: max(1, round(0.1 * len(idx)))].tolist())
        rows = [r for i, r in enumerate(rows) if (i in dev_idx) == (split == "dev")]
    names = sorted({c for _, c in rows})
    return IntentData([t for t, _ in rows], [c for _, c in rows], names)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    _need(path, "CSV file")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
                raise DataError(f"{path}: expected a header 'text,category'")
            return [(r["text"], r["category"]) for r in reader if r.get("text")]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None


def load_clinc150(root: Path, split: Split) -> IntentData:
    """CLINC150: ``train`` = in-scope train only (OOS is detected by abstention, not trained as a class)."""
    raw = _read_json(Path(root) / "clinc150" / "data.json")
    key = {"train": "train", "dev": "val", "test": "test"}[split]
    if key not in raw:
        raise DataError(f"clinc150/data.json has no '{key}' list")
    pairs = list(raw[key]) + (list(raw.get(f"oos_{key}", [])) if split != "train" else [])
    try:
        texts = [str(t) for t, _ in pairs]
        labels = [OOS if c == "oos" else str(c) for _, c in pairs]
    except (TypeError, ValueError):
        raise DataError(f"clinc150/data.json '{key}': expected [utterance, intent] pairs") from None
    return IntentData(texts, labels, sorted({c for c in labels if c != OOS}))


def load_dstc11(root: Path, split: Split) -> IntentData:
    """DSTC11 Track 2 utterances: dev = insurance development set; test = banking + finance."""
    base = _need(Path(root) / "dstc11", "DSTC11 folder")
    folders = ["development"] if split != "test" else ["test-banking", "test-finance"]
    texts, labels = [], []
    for name in folders:
        path = _need(base / name / "test-utterances.jsonl", "DSTC11 utterances")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                texts.append(str(r["utterance"]))
                labels.append(f"{name}:{r.get('intent', '')}")
            except (ValueError, KeyError):
                raise DataError(f"{path}:{n}: expected JSON with 'utterance' and 'intent'") from None
    return IntentData(texts, labels, sorted(set(labels)))


# ------------------------------------------------------------------------------------------- STAR
def load_star(root: Path, split: Split) -> list[dict[str, Any]]:
    base = _need(Path(root) / "star", "STAR folder")
    if split == "test":
        return _as_list(_read_json(base / "test" / "dialogues.json.gz"), base / "test")
    dialogues = _as_list(_read_json(base / "dialogues.json.gz"), base)
    keep = (lambda d: int(d["DialogueID"]) % 10 == 0) if split == "dev" else (lambda d: int(d["DialogueID"]) % 10 != 0)
    return [d for d in dialogues if keep(d)]


def _as_list(obj: Any, where: Path) -> list[dict[str, Any]]:
    if not isinstance(obj, list) or (obj and not {"DialogueID", "Events"} <= set(obj[0])):
        raise DataError(f"{where}: expected a list of STAR dialogues with 'DialogueID' and 'Events'")
    return obj


def star_responses(root: Path) -> dict[str, str]:
    """Action label -> template reply text, merged over all STAR tasks (the agent's KB of replies)."""
    out: dict[str, str] = {}
    tasks = Path(root) / "star" / "tasks"
    if not tasks.exists():
        return out
    for p in sorted(tasks.glob("*/responses.json")):
        try:
            out.update({str(k): str(v) for k, v in json.loads(p.read_text(encoding="utf-8")).items()})
        except (OSError, ValueError):
            continue
    return out


def load_intents(name: str, root: Path, split: Split) -> IntentData:
    loaders = {"banking77": load_banking77, "clinc150": load_clinc150, "dstc11": load_dstc11}
    if name not in loaders:
        raise DataError(f"dataset {name!r} is not an intent dataset; choose from {', '.join(loaders)}")
    return loaders[name](Path(root), split)
