"""The benchmark scripts must keep working: run ``bench/gpu.py --cpu-smoke`` and ``bench/run_cpu.py --smoke``.

Both run as subprocesses (concurrently, to stay fast) with tiny models on the CPU; the test checks
that every section produced rows (no section failed or was skipped), the outputs are well-formed
JSON / CSV / Markdown / PNG, and the correctness columns the benchmarks record (refusal-fast vs
RD-style means, interventions vs refusal-fast hooks, compiled vs eager, batched vs sequential
selection, deterministic repeatability) are within tolerance. No timing is asserted.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

GPU_SECTIONS = ["kernels", "triton_interpreted", "extraction", "determinism", "interventions", "selection",
                "compiled", "memory", "goals"]
CPU_SECTIONS = ["kernels", "triton_interpreted", "extraction", "extraction_rss", "determinism", "interventions",
                "selection", "goals"]
EAGER_VARIANTS = {"none", "no-op hooks", "naive hooks", "refusal-fast hooks", "refusal-fast fused",
                  "orthogonalized weights"}


def _run_both(tmp_path: Path) -> tuple[Path, Path]:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    gpu_out, cpu_out = tmp_path / "gpu", tmp_path / "cpu"
    cmds = [[sys.executable, "bench/gpu.py", "--cpu-smoke", "--out", str(gpu_out)],
            [sys.executable, "bench/run_cpu.py", "--smoke", "--out", str(cpu_out)]]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    try:
        for c, p in zip(cmds, procs):
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"{' '.join(c)} failed (rc {p.returncode}):\n{err[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return gpu_out, cpu_out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_common(sections: dict, names: list[str]) -> None:
    for name in names:
        rows = sections.get(name)
        assert isinstance(rows, list) and rows, f"section {name!r} produced no rows: {rows!r}"
    for r in sections["kernels"]:
        assert _finite(r["median_us"]) and r["median_us"] > 0 and _finite(r["GB/s"]) and r["GB/s"] > 0
    for r in sections["kernels"]:
        if str(r["variant"]).startswith("refusal-fast"):
            assert r["max_rel_err_vs_f64"] < (2e-2 if r["dtype"] == "bf16" else 1e-5), r
    for r in sections["triton_interpreted"]:
        assert r["max_rel_err_vs_f64"] < 2e-2, r
    ext = {r["variant"]: r for r in sections["extraction"]}
    assert set(ext) == {"refusal-fast", "plain forward (decoder only)", "plain forward (+ logits)", "RD-style"}
    assert all(_finite(r["prompts/s"]) and r["prompts/s"] > 0 for r in ext.values())
    det = {r["deterministic"]: r for r in sections["determinism"]}
    assert det[True]["bitwise_identical"] is True
    iv = sections["interventions"]
    assert {r["variant"] for r in iv} == EAGER_VARIANTS
    assert {r["phase"] for r in iv} == {"prefill", "decode"}
    for r in iv:
        assert _finite(r["tok/s"]) and r["tok/s"] > 0 and _finite(r["overhead_%"])
    sel = {r["variant"]: r for r in sections["selection"]}
    assert set(sel) == {"sequential", "batched"} and sel["batched"]["same_choice"] in (True, False)
    goals = sections["goals"]
    assert goals and all(set(g) == {"goal", "target", "measured", "met"} for g in goals)


def test_bench_scripts_smoke(tmp_path):
    gpu_out, cpu_out = _run_both(tmp_path)

    # --- bench/gpu.py --cpu-smoke
    data = json.loads((gpu_out / "gpu.json").read_text())
    sections = data["sections"]
    _check_common(sections, GPU_SECTIONS)
    assert data["environment"]["model"]["layers"] == 3
    for r in sections["extraction"]:
        if r["variant"] == "refusal-fast":
            assert r["rf_vs_RD_max_rel_diff"] < 5e-2  # bf16 model, different batch padding
    for r in sections["interventions"]:
        if r.get("max_rel_diff_vs_rf_hooks") is not None:
            assert r["max_rel_diff_vs_rf_hooks"] < 5e-2, r  # bf16
    comp = sections["compiled"]
    assert {r["variant"] for r in comp} == {"compiled: none", "compiled: refusal-fast hooks",
                                            "cudagraph: none", "cudagraph: refusal-fast hooks"}
    assert {r["phase"] for r in comp} == {"prefill", "decode"}
    for r in comp:
        assert r["compiled_vs_eager_max_rel_diff"] < 1e-2, r
    assert [m["section"] for m in sections["memory"]] == ["kernels", "extraction", "determinism", "interventions",
                                                          "selection", "compiled"]
    md = (gpu_out / "gpu.md").read_text()
    assert md.startswith("# refusal-fast GPU benchmark (CPU SMOKE RUN)")
    assert "| goal | target | measured | met |" in md and "## Extraction throughput" in md

    # --- bench/run_cpu.py --smoke
    data = json.loads((cpu_out / "cpu.json").read_text())
    sections = data["sections"]
    _check_common(sections, CPU_SECTIONS)
    for r in sections["extraction"]:
        if r["variant"] == "refusal-fast":
            assert r["rf_vs_RD_max_rel_diff"] < 1e-4  # fp32
    for r in sections["interventions"]:
        if r.get("max_rel_diff_vs_rf_hooks") is not None:
            assert r["max_rel_diff_vs_rf_hooks"] < 1e-3, r  # fp32
    sel = {r["variant"]: r for r in sections["selection"]}
    assert sel["batched"]["max_abs_score_diff"] < 1e-3
    rss = sections["extraction_rss"]
    assert [r["prompts"] for r in rss] == [8, 40] and all(r["peak_rss_mb"] > 0 for r in rss)
    assert (cpu_out / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(cpu_out / "cpu_kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"op", "variant", "GB/s", "pct_of_copy_GB/s"} <= set(rows[0])
    assert "## Kernels" in (cpu_out / "cpu.md").read_text()
