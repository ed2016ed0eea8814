"""The prompt datasets shipped with refusal-fast (copies of the project's shared splits).

Each file is a JSON list of ``{"instruction": str, "category": str | None}``; see
``refusal_fast/data/datasets/README.md`` for origins and licenses.
"""
from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

__all__ = ["DATASET_DIR", "NAMES", "load", "instructions", "categories", "load_file"]

DATASET_DIR = Path(__file__).resolve().parent / "data" / "datasets"
NAMES = (
    "harmful_train", "harmful_val", "harmless_train", "harmless_val",
    "harmbench_test", "harmbench_val", "advbench",
)


def load_file(path: str | Path) -> list[dict]:
    """Load a user dataset: a JSON list of strings or of objects with an ``instruction`` field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"instruction": row, "category": None}
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise ValueError(f"{path}: row {i} has no string 'instruction' field")
        out.append({"instruction": row["instruction"], "category": row.get("category")})
    return out


@cache
def _load_cached(name: str) -> tuple:
    if name not in NAMES:
        raise ValueError(f"unknown dataset '{name}'; shipped datasets: {', '.join(NAMES)}")
    return tuple(load_file(DATASET_DIR / f"{name}.json"))


def load(name: str, n: int | None = None, seed: int | None = None) -> list[dict]:
    """Rows of a shipped dataset (or a path to a user JSON); ``n`` rows, shuffled with ``seed`` if given."""
    rows = list(_load_cached(name)) if name in NAMES else load_file(name)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows if n is None else rows[:n]


def instructions(name: str, n: int | None = None, category: str | None = None, seed: int | None = None) -> list[str]:
    """Instruction strings of a dataset, optionally one category and the first ``n``."""
    rows = load(name, seed=seed)
    if category is not None:
        rows = [r for r in rows if r["category"] == category]
        if not rows:
            raise ValueError(f"dataset '{name}' has no rows of category '{category}'")
    texts = [r["instruction"] for r in rows]
    return texts if n is None else texts[:n]


def categories(*names: str) -> dict[str, list[str]]:
    """``{category: [instruction, ...]}`` over one or more datasets (rows without a category skipped)."""
    out: dict[str, list[str]] = {}
    for name in names:
        for r in load(name):
            if r["category"]:
                out.setdefault(r["category"], []).append(r["instruction"])
    return out
