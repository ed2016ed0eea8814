"""Kernel benchmarks: grouped accumulation and rank-k projection ablation.

Variants, timed interleaved in one process on the same tensors:

- ``copy``: ``out.copy_(x)`` of the same tensor — the memory-bandwidth ceiling.
- ``refusal-fast``: ``ops.group_accumulate_`` / ``ops.project_`` with the automatic backend
  (C++ extension on CPU, Triton on CUDA).
- ``naive torch``: ``acc.index_add_(0, index, x.float())`` / ``x - (x @ Q^T) @ Q`` (out of place,
  activation dtype).

GB/s is *effective* bandwidth: the minimum bytes the op must move (``ops.accumulate_bytes`` /
``ops.project_bytes``: read x once, write it once for the projection) divided by the median
time — the same byte count for every variant, so GB/s ratios are speed ratios. The copy row
moves ``2 * x.nbytes``.

Triton under ``TRITON_INTERPRET=1`` is run for correctness only (:func:`triton_interpreted_rows`),
never timed. Run with ``pytest bench/bench_kernels.py --benchmark-only`` or via ``run_cpu.py``.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from refusal_fast import ops

from .baselines import naive_group_accumulate, naive_project
from .common import interleaved

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _basis(k: int, d: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(k * 7919 + d)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.T.contiguous().to(device=device, dtype=torch.float32)


def _x(n: int, d: int, dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)  # generated on the device (fast for big GPU tensors)
    return torch.randn(n, d, generator=g, device=device).to(dtype)


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def accumulate_case(n: int, d: int, dtype, device, groups: int = 10) -> dict[str, Any]:
    """Tensors and callables for one grouped-accumulation configuration."""
    x = _x(n, d, dtype, device)
    index = (torch.arange(n, device=device) % groups).to(torch.int64)
    acc = torch.zeros(groups, d, dtype=torch.float32, device=device)
    acc_naive = acc.clone()
    out = torch.empty_like(x)
    # correctness of the timed path against the float64 reference
    check = torch.zeros_like(acc)
    ops.group_accumulate_(check, x, index)
    ref = ops.reference.accumulate(torch.zeros_like(acc), x, index)
    return {
        "fns": {
            "copy": lambda: out.copy_(x),
            "refusal-fast": lambda: ops.group_accumulate_(acc, x, index),
            "naive torch": lambda: naive_group_accumulate(acc_naive, x, index),
        },
        "bytes": {
            "copy": 2 * x.numel() * x.element_size(),
            "refusal-fast": ops.accumulate_bytes(n, d, dtype, groups_touched=groups),
            "naive torch": ops.accumulate_bytes(n, d, dtype, groups_touched=groups),
        },
        "max_rel_err": _max_rel_err(check, ref),
    }


def project_case(n: int, d: int, k: int, dtype, device) -> dict[str, Any]:
    """Tensors and callables for one rank-k projection configuration."""
    x = _x(n, d, dtype, device)
    x_rf = x.clone()
    q = _basis(k, d, device)
    out = torch.empty_like(x)
    check = x.clone()
    ops.project_(check, q)
    ref = ops.reference.project(x, q)
    b = ops.project_bytes(n, d, k, dtype)
    return {
        "fns": {
            "copy": lambda: out.copy_(x),
            "refusal-fast": lambda: ops.project_(x_rf, q),
            "naive torch": lambda: naive_project(x, q),
        },
        "bytes": {"copy": 2 * x.numel() * x.element_size(), "refusal-fast": b, "naive torch": b},
        "max_rel_err": _max_rel_err(check, ref),
    }


def kernel_rows(device="cpu", dtypes: Sequence[str] = ("bf16", "fp32"), ds: Sequence[int] = (2048, 4096),
                ks: Sequence[int] = (1, 4, 16), n_rows: int = 2048, rounds: int = 7, min_time_s: float = 0.02,
                peak_gbs: float | None = None) -> list[dict[str, Any]]:
    """One row per (op, dtype, d, k, variant) with median time, spread, GB/s and ratios."""
    rows: list[dict[str, Any]] = []
    configs = [("group_accumulate_", dt, d, None) for dt, d in itertools.product(dtypes, ds)]
    configs += [("project_", dt, d, k) for dt, d, k in itertools.product(dtypes, ds, ks)]
    backend = ops.backend_info()["cuda_backend" if torch.device(device).type == "cuda" else "cpu_backend"]
    for op, dt, d, k in configs:
        dtype = DTYPES[dt]
        case = accumulate_case(n_rows, d, dtype, device) if op == "group_accumulate_" else \
            project_case(n_rows, d, k, dtype, device)
        stats = interleaved(case["fns"], rounds=rounds, warmup=2, device=device, min_time_s=min_time_s)
        gbs = {v: case["bytes"][v] / s.median / 1e9 for v, s in stats.items()}
        for v, s in stats.items():
            row = {
                "op": op, "dtype": dt, "d": d, "k": k if k is not None else "–", "rows": n_rows,
                "variant": v if v != "refusal-fast" else f"refusal-fast ({backend})",
                "median_us": s.median * 1e6, "iqr_rel": s.rel_iqr, "n": s.n,
                "bytes": case["bytes"][v], "GB/s": gbs[v],
                "pct_of_copy_GB/s": 100 * gbs[v] / gbs["copy"],
                "speedup_vs_naive": stats["naive torch"].median / s.median,
                "max_rel_err_vs_f64": case["max_rel_err"] if v == "refusal-fast" else None,
            }
            if peak_gbs:
                row["pct_of_peak"] = 100 * gbs[v] / peak_gbs
            rows.append(row)
    return rows


def triton_interpreted_rows(ds: Sequence[int] = (2048, 4096), ks: Sequence[int] = (1, 4, 16),
                            dtypes: Sequence[str] = ("bf16", "fp32"), n_rows: int = 3) -> list[dict[str, Any]]:
    """Correctness (max relative error vs float64) of the Triton kernels run by the interpreter on CPU.

    Needs ``TRITON_INTERPRET=1`` set before triton is imported; returns [] (with a note row)
    otherwise. NOT a timing: the interpreter runs kernels in numpy, orders of magnitude slower.
    """
    info = ops.backend_info()
    if not (info["triton"] and info["triton_interpret"]):
        return [{"op": "triton", "note": "skipped: needs triton and TRITON_INTERPRET=1 before import"}]
    rows = []
    with ops.use_backend("triton"):
        for dt, d in itertools.product(dtypes, ds):
            dtype = DTYPES[dt]
            x = _x(n_rows, d, dtype, "cpu", seed=1)
            index = torch.tensor([i % 2 for i in range(n_rows)], dtype=torch.int64)
            for det in (False, True):
                acc = torch.zeros(2, d)
                ops.group_accumulate_(acc, x, index, deterministic=det)
                ref = ops.reference.accumulate(torch.zeros(2, d), x, index)
                rows.append({"op": "group_accumulate_" + (" (deterministic)" if det else ""), "dtype": dt, "d": d,
                             "k": "–", "rows": n_rows, "max_rel_err_vs_f64": _max_rel_err(acc, ref),
                             "note": "Triton interpreted on CPU: correctness only, not timed"})
            for k in ks:
                q = _basis(k, d, "cpu")
                y = x.clone()
                ops.project_(y, q)
                ref = ops.reference.project(x, q)
                rows.append({"op": "project_", "dtype": dt, "d": d, "k": k, "rows": n_rows,
                             "max_rel_err_vs_f64": _max_rel_err(y, ref),
                             "note": "Triton interpreted on CPU: correctness only, not timed"})
    return rows


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
@pytest.mark.parametrize("d", [2048, 4096])
@pytest.mark.parametrize("variant", ["copy", "refusal-fast", "naive torch"])
def test_group_accumulate(benchmark, dt, d, variant):
    case = accumulate_case(2048, d, DTYPES[dt], "cpu")
    benchmark.group = f"group_accumulate_ {dt} d={d}"
    benchmark.extra_info["bytes"] = case["bytes"][variant]
    benchmark(case["fns"][variant])
    assert case["max_rel_err"] < 1e-5


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
@pytest.mark.parametrize("d", [2048, 4096])
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("variant", ["copy", "refusal-fast", "naive torch"])
def test_project(benchmark, dt, d, k, variant):
    case = project_case(2048, d, k, DTYPES[dt], "cpu")
    benchmark.group = f"project_ {dt} d={d} k={k}"
    benchmark.extra_info["bytes"] = case["bytes"][variant]
    benchmark(case["fns"][variant])
    assert case["max_rel_err"] < (1e-2 if dt == "bf16" else 1e-5)
