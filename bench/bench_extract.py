"""Extraction benchmarks: prompts/s, peak memory vs prompt count, bitwise repeatability.

Variants (same model, same prompts, same batch size, interleaved in one process):

- ``refusal-fast``: ``extract_means`` (all layers, end-of-instruction positions): length-bucketed
  batches, gather-only pre-hooks feeding ``ops.group_accumulate_``, forward stopped at the last
  needed block (with all layers selected the last block, final norm and LM head never run).
- ``plain forward (decoder only)``: the same length-bucketed batches through ``model.model`` with
  no hooks and no LM head — the strictest "just run the model" baseline.
- ``plain forward (+ logits)``: the same batches through the full causal LM (all-position logits).
- ``RD-style``: :func:`bench.baselines.rd_style_means` (reference repo: full-activation float64
  clones in every block's pre-hook, dataset-order batches per group, full logits).

Peak RSS of a 2,000- vs a 200-prompt extraction runs each in a fresh subprocess
(``python -m bench.bench_extract --rss-child N``) so the numbers are clean.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

import refusal_fast as rf

from .baselines import plain_forward, rd_style_means
from .common import REPO, Stats, interleaved, peak_rss_mb, reset_peak_rss, rss_mb

VARIANTS = ("refusal-fast", "plain forward (decoder only)", "plain forward (+ logits)", "RD-style")


def extraction_fns(model, tokenizer, groups: dict[str, list[str]], batch_size: int = 32,
                   deterministic: bool = False) -> dict[str, Any]:
    """The four extraction variants as zero-argument callables over the same prompts."""
    flat = [p for ps in groups.values() for p in ps]
    return {
        "refusal-fast": lambda: rf.extract_means(model, tokenizer, groups, batch_size=batch_size, progress=False,
                                                 deterministic=deterministic),
        "plain forward (decoder only)": lambda: plain_forward(model, tokenizer, flat, batch_size, logits=False),
        "plain forward (+ logits)": lambda: plain_forward(model, tokenizer, flat, batch_size, logits=True),
        "RD-style": lambda: rd_style_means(model, tokenizer, groups, batch_size=batch_size),
    }


def check_agreement(model, tokenizer, groups: dict[str, list[str]], batch_size: int = 32) -> float:
    """Max relative difference between refusal-fast's and the RD-style means (sanity check)."""
    means = rf.extract_means(model, tokenizer, groups, batch_size=batch_size, progress=False)
    rd = rd_style_means(model, tokenizer, groups, batch_size=batch_size)
    worst = 0.0
    for g in groups:
        a = means.mean(g).to(rd[g].device)  # [L, P, d]
        b = rd[g].transpose(0, 1)           # [P, L, d] -> [L, P, d]
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


def extraction_rows(model, tokenizer, groups: dict[str, list[str]], label: str, batch_size: int = 32,
                    rounds: int = 3, device="cpu", variants=VARIANTS) -> list[dict[str, Any]]:
    """prompts/s of each variant (median, IQR) and ratios vs the plain forward and RD-style."""
    n = sum(len(v) for v in groups.values())
    fns = extraction_fns(model, tokenizer, groups, batch_size)
    fns = {k: fns[k] for k in variants}
    small = {g: ps[: max(2, batch_size // 4)] for g, ps in groups.items()}
    warm = extraction_fns(model, tokenizer, small, batch_size)
    for k in fns:  # warm-up on a few prompts (lazy inits, allocator) without paying a full run
        warm[k]()
    stats: dict[str, Stats] = interleaved(fns, rounds=rounds, warmup=0, device=device)
    agree = check_agreement(model, tokenizer, small, batch_size)
    base = stats.get("plain forward (decoder only)")
    rd_s = stats.get("RD-style")
    rows = []
    for k, s in stats.items():
        rows.append({
            "model": label, "variant": k, "prompts": n, "batch_size": batch_size,
            "prompts/s": s.rate(n), "median_s": s.median, "iqr_rel": s.rel_iqr, "n": s.n,
            "x_vs_plain_decoder": base.median / s.median if base else None,
            "x_vs_RD": rd_s.median / s.median if rd_s else None,
            "rf_vs_RD_max_rel_diff": agree if k == "refusal-fast" else None,
        })
    return rows


def determinism_rows(model, tokenizer, groups: dict[str, list[str]], label: str, batch_size: int = 8) -> list[dict]:
    """Run extraction twice per mode; report whether the float64 sums are bitwise identical."""
    rows = []
    for det in (True, False):
        a = rf.extract_means(model, tokenizer, groups, batch_size=batch_size, progress=False, deterministic=det)
        b = rf.extract_means(model, tokenizer, groups, batch_size=batch_size, progress=False, deterministic=det)
        same = all(torch.equal(a.sum(g), b.sum(g)) for g in groups)
        diff = max(float((a.sum(g) - b.sum(g)).abs().max()) for g in groups)
        device = next(model.parameters()).device
        rows.append({"model": label, "deterministic": det, "bitwise_identical": same, "max_abs_diff": diff,
                     "backend": rf.backend_info()["cuda_backend" if device.type == "cuda" else "cpu_backend"]})
    return rows


# ---------------------------------------------------------------------------- RSS in subprocesses
def rss_child(n_prompts: int, config: str, batch_size: int) -> dict[str, Any]:
    """In a fresh process: build the model, warm up, reset the peak, extract ``n_prompts``, report RSS."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from .workloads import SMALL_LLAMA, TINY_LLAMA, bench_tokenizer, prompt_groups, random_llama

    cfgs = {"tiny": TINY_LLAMA, "small": SMALL_LLAMA, "rss": RSS_LLAMA}
    tok = bench_tokenizer()
    model = random_llama(cfgs[config], tok)
    rf.extract_means(model, tok, prompt_groups(batch_size), batch_size=batch_size, progress=False)  # warm-up
    groups = prompt_groups(n_prompts // 2)
    import gc

    gc.collect()
    before = rss_mb()
    reset_ok = reset_peak_rss()
    means = rf.extract_means(model, tok, groups, batch_size=batch_size, progress=False)
    peak = peak_rss_mb()
    from refusal_fast import chat

    lengths = chat.prompt_lengths(tok, [p for ps in groups.values() for p in ps])
    return {"prompts": n_prompts, "config": config, "rss_before_mb": before, "peak_rss_mb": peak,
            "max_prompt_tokens": max(lengths), "mean_prompt_tokens": sum(lengths) / len(lengths),
            "peak_reset": reset_ok, "accumulator_bytes": means.stats.get("accumulator_nbytes"),
            "prompts/s": means.stats.get("prompts_per_s"), "batch_size": batch_size}


#: Model of the RSS rows: the CPU small-model layout with 2 layers (memory, not speed, is measured).
RSS_LLAMA: dict[str, Any] = dict(hidden_size=512, num_hidden_layers=2, intermediate_size=1536,
                                 num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                                 max_position_embeddings=2048)


def rss_rows(counts=(200, 2000), config: str = "rss", batch_size: int = 32, timeout: float = 600) -> list[dict]:
    """Peak RSS of extractions of ``counts`` prompts, each in its own subprocess."""
    import tempfile

    from .workloads import bench_tokenizer

    rows = []
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    tmp = tempfile.TemporaryDirectory(prefix="rf-bench-tok-")
    bench_tokenizer().save_pretrained(tmp.name)
    env["RF_BENCH_TOKENIZER_DIR"] = tmp.name
    # The children run concurrently (each measures only its own process's RSS).
    procs = []
    try:
        for n in counts:
            cmd = [sys.executable, "-m", "bench.bench_extract", "--rss-child", str(n), "--config", config,
                   "--batch-size", str(batch_size)]
            procs.append((n, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True, env=env)))
        for n, proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"RSS child for {n} prompts failed:\n{stderr[-3000:]}")
            rows.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        tmp.cleanup()
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["peak_vs_first"] = r["peak_rss_mb"] / base
    return rows


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def small_setup():
    from .workloads import bench_tokenizer, prompt_groups, random_llama

    torch.set_flush_denormal(True)
    tok = bench_tokenizer()
    cfg = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1536, num_attention_heads=8,
               num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)
    return random_llama(cfg, tok), tok, prompt_groups(16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_extraction(benchmark, small_setup, variant):
    model, tok, groups = small_setup
    fn = extraction_fns(model, tok, groups, batch_size=32)[variant]
    benchmark.group = "extraction 32 prompts, d512 x 4 layers"
    benchmark.extra_info["prompts"] = 32
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


def _main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rss-child", type=int, required=True, help="extract this many prompts and print RSS JSON")
    p.add_argument("--config", default="rss", choices=["tiny", "small", "rss"])
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    print(json.dumps(rss_child(a.rss_child, a.config, a.batch_size)))


if __name__ == "__main__":
    _main()
