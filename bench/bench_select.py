"""Direction selection: batched sweep vs the sequential procedure on the same candidates.

``select_direction(..., batched=False)`` enters ``ablate`` / ``add`` once per candidate and runs
the validation prompts through the model for each; ``batched=True`` packs (prompt, candidate,
task) rows of many candidates into each forward pass with per-row interventions. Both runs get
the same candidates, prompts and thresholds, interleaved in one process; the rows also report
the largest score difference between the two and whether they chose the same candidate.

On random-initialised models the scores carry no meaning (there is no refusal behaviour to
find); the work per candidate, and so the timing, is the same as on a trained model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

import refusal_fast as rf

from .common import interleaved


def _select(model, tokenizer, means, harmful, harmless, batched: bool, batch_size: int, cands_per_pass: int,
            layers=None):
    return rf.select_direction(model, tokenizer, means, harmful, harmless, batched=batched, batch_size=batch_size,
                               candidates_per_pass=cands_per_pass, progress=False, raise_if_none=False,
                               layers=layers)


def selection_rows(model, tokenizer, means, harmful_val: Sequence[str], harmless_val: Sequence[str], label: str,
                   batch_size: int = 32, candidates_per_pass: int = 8, rounds: int = 2, device="cpu",
                   layers=None) -> list[dict]:
    """Seconds per full selection (median of ``rounds``), candidates/s and the batched speed-up.

    ``layers``: candidate layers (a subset of the means' layers; default all).
    """
    fns = {
        "sequential": lambda: _select(model, tokenizer, means, harmful_val, harmless_val, False, batch_size,
                                      candidates_per_pass, layers),
        "batched": lambda: _select(model, tokenizer, means, harmful_val, harmless_val, True, batch_size,
                                   candidates_per_pass, layers),
    }
    results = {k: f() for k, f in fns.items()}  # also the warm-up
    stats = interleaved(fns, rounds=rounds, warmup=0, device=device)
    seq, bat = results["sequential"], results["batched"]
    diff = 0.0
    for a, b in zip(seq.table, bat.table):
        for m in ("bypass", "induce", "kl"):
            if not (math.isnan(a[m]) and math.isnan(b[m])):
                diff = max(diff, abs(a[m] - b[m]))
    n_cand = len(seq.table)
    rows = []
    for k, s in stats.items():
        rows.append({
            "model": label, "variant": k, "candidates": n_cand, "n_harmful": len(harmful_val),
            "n_harmless": len(harmless_val), "median_s": s.median, "iqr_rel": s.rel_iqr, "n": s.n,
            "candidates/s": s.rate(n_cand),
            "speedup_vs_sequential": stats["sequential"].median / s.median,
            "max_abs_score_diff": diff if k == "batched" else None,
            "same_choice": ((seq.layer, seq.position) == (bat.layer, bat.position)) if k == "batched" else None,
        })
    return rows


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def setup():
    from .workloads import bench_tokenizer, prompt_groups, random_llama

    torch.set_flush_denormal(True)
    tok = bench_tokenizer()
    cfg = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=2048)
    model = random_llama(cfg, tok)
    means = rf.extract_means(model, tok, prompt_groups(16), progress=False)
    val = prompt_groups(8, val=True)
    return model, tok, means, val


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_selection(benchmark, setup, batched):
    model, tok, means, val = setup
    benchmark.group = "select_direction 20 candidates, d256 x 4 layers"
    benchmark.pedantic(lambda: _select(model, tok, means, val["harmful"], val["harmless"], batched, 8, 8),
                       rounds=2, warmup_rounds=0)

