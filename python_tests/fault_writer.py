"""Child side of the fault-injection test (test_reliability.py): write means, checkpoint and selection
artifacts in a loop until killed. Only public API that has existed since before the artifacts module."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from refusal_fast.evaluate import save_json
from refusal_fast.io import save_direction
from refusal_fast.means import Means
from refusal_fast.select import SelectionResult

GROUPS, LAYERS, POSITIONS, D = ["harmful", "harmless"], [0, 1, 2], [-2, -1], 24


def means_at(i: int, checkpoint: bool = False) -> Means:
    """A small Means whose tensors and metadata both depend on ``i`` (so a stale sidecar is detectable)."""
    g = torch.Generator().manual_seed(i)
    sums = torch.randn(len(LAYERS), len(GROUPS), len(POSITIONS), D, generator=g, dtype=torch.float64)
    meta = {"model": {"name_or_path": "fault-test", "n_layers": 3, "d_model": D}, "iteration": i}
    if checkpoint:
        meta["checkpoint"] = {"fingerprint": "f", "rank": 0, "world": 1, "n_batches": 10 ** 9, "batches_done": i}
    return Means(sums, [i + 1, i + 2], GROUPS, LAYERS, POSITIONS, meta)


def selection_at(i: int) -> SelectionResult:
    raw = torch.randn(D, generator=torch.Generator().manual_seed(10_000 + i), dtype=torch.float64)
    table = [{"layer": 1, "position": -1, "bypass": -1.0, "induce": 1.0, "kl": 0.01, "norm": float(raw.norm()),
              "filtered": None}, {"layer": 2, "position": -1, "bypass": math.nan, "induce": math.nan,
                                  "kl": math.nan, "norm": 1.0, "filtered": "nan"}]
    return SelectionResult(1, -1, raw / raw.norm(), raw, table, [1, 2], [-1], 3, {"harmful": 1.0, "harmless": -1.0},
                           {"iteration": i})


def write_loop(directory: str, started=None) -> None:
    """Write every artifact kind over and over, each iteration with new content, until killed."""
    d = Path(directory)
    i = 0
    if started is not None:
        started.set()
    while True:
        i += 1
        means_at(i).save(d / "means.safetensors")
        means_at(i, checkpoint=True).save(d / "checkpoint.safetensors", sidecar=False)
        sel = selection_at(i)
        sel.to_json(d / "selection.json")
        save_direction(d / "direction.safetensors", sel.raw, {"layer": 1, "position": -1, "iteration": i})
        save_json({"format": "refusal_fast.eval", "iteration": i, "rates": [0.5] * 200}, d / "eval.json")
