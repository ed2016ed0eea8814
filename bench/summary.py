"""Goal checks, Markdown/CSV/JSON writers and the chart shared by ``run_cpu.py`` and ``gpu.py``."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refusal_fast.artifacts import write_figure, write_text

from .common import fmt, markdown_table, write_csv, write_json

#: Columns shown in the Markdown tables (CSV/JSON keep every column).
COLUMNS: dict[str, list[str]] = {
    "kernels": ["op", "dtype", "d", "k", "variant", "median_us", "iqr_rel", "GB/s", "pct_of_copy_GB/s",
                "pct_of_peak", "speedup_vs_naive", "max_rel_err_vs_f64"],
    "triton_interpreted": ["op", "dtype", "d", "k", "rows", "max_rel_err_vs_f64", "note"],
    "extraction": ["model", "variant", "prompts", "batch_size", "prompts/s", "iqr_rel", "x_vs_plain_decoder",
                   "x_vs_RD", "rf_vs_RD_max_rel_diff", "peak_mem_mb"],
    "extraction_rss": ["config", "prompts", "batch_size", "rss_before_mb", "peak_rss_mb", "peak_vs_first",
                       "max_prompt_tokens", "accumulator_bytes", "prompts/s"],
    "determinism": ["model", "deterministic", "bitwise_identical", "max_abs_diff", "backend"],
    "interventions": ["model", "phase", "batch", "seq", "variant", "tok/s", "median_ms", "iqr_rel", "overhead_%",
                      "naive_overhead_/_this", "max_rel_diff_vs_rf_hooks"],
    "compiled": ["model", "phase", "batch", "seq", "variant", "tok/s", "median_ms", "iqr_rel", "overhead_%",
                 "overhead_ms_per_layer", "compiled_vs_eager_max_rel_diff", "backend"],
    "selection": ["model", "variant", "candidates", "n_harmful", "n_harmless", "median_s", "iqr_rel",
                  "candidates/s", "speedup_vs_sequential", "max_abs_score_diff", "same_choice"],
    "memory": ["section", "peak_mb", "what"],
}

TITLES = {
    "kernels": "Kernels (effective GB/s; copy = bandwidth ceiling)",
    "triton_interpreted": "Triton kernels under TRITON_INTERPRET=1 (correctness only, not timed)",
    "extraction": "Extraction throughput",
    "extraction_rss": "Extraction peak RSS vs number of prompts (fresh subprocess each)",
    "determinism": "Repeatability of extraction (two runs, float64 sums compared bitwise)",
    "interventions": "Intervention overhead (eager)",
    "compiled": "Intervention overhead under torch.compile / CUDA graphs",
    "selection": "Direction selection: batched sweep vs sequential",
    "memory": "Peak memory per section",
    "goals": "Goals (GPU targets of issue 9; on CPU informative only)",
}


def _rows(sections: Mapping[str, Any], name: str) -> list[dict]:
    v = sections.get(name)
    return v if isinstance(v, list) else []


def goal_rows(sections: Mapping[str, Any]) -> list[dict]:
    """One row per goal: target, what was measured, met yes/no (None when not measured)."""
    goals: list[dict] = []
    for r in _rows(sections, "extraction"):
        if r.get("variant") != "refusal-fast":
            continue
        for key, target, text in (("x_vs_plain_decoder", 1.0, "extraction vs plain forward (decoder only)"),
                                  ("x_vs_RD", 3.0, "extraction vs RD-style")):
            v = r.get(key)
            if v is not None:
                goals.append({"goal": f"{text} [{r['model']}]", "target": f">= {target}x",
                              "measured": f"{v:.2f}x", "met": v >= target})
    for table in ("interventions", "compiled"):
        rows = _rows(sections, table)
        by_cfg: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            by_cfg.setdefault((r["model"], r["phase"], r["batch"]), {})[r["variant"]] = r
        for (model, phase, batch), vs in by_cfg.items():
            limit = 2.0 if phase == "prefill" else 5.0
            for v, r in vs.items():
                if "refusal-fast" not in v:
                    continue
                oh = r["overhead_%"]
                goals.append({"goal": f"{phase} overhead, {v} [{model}, batch {batch}]", "target": f"<= {limit:g}%",
                              "measured": f"{oh:+.1f}% (IQR {100 * r['iqr_rel']:.0f}%)", "met": oh <= limit})
                naive = vs.get("naive hooks")
                if naive is not None and v == "refusal-fast hooks":
                    n_oh = naive["overhead_%"]
                    if n_oh <= 0 and oh <= 0:
                        met, meas = None, f"naive {n_oh:+.1f}%, rf {oh:+.1f}%: both within noise"
                    elif oh <= 0:
                        met, meas = True, f"naive {n_oh:+.1f}% vs rf {oh:+.1f}% (rf within noise)"
                    elif n_oh <= 0:
                        met, meas = False, f"naive {n_oh:+.1f}% (within noise) vs rf {oh:+.1f}%"
                    else:
                        met, meas = n_oh / oh >= 3.0, f"naive {n_oh:+.1f}% / rf {oh:+.1f}% = {n_oh / oh:.2f}x"
                    goals.append({"goal": f"{phase} overhead 3x below naive hooks [{model}, batch {batch}]",
                                  "target": ">= 3x", "measured": meas, "met": met})
    krows = [r for r in _rows(sections, "kernels") if str(r.get("variant", "")).startswith("refusal-fast")]
    if krows:
        pct = [r["pct_of_copy_GB/s"] for r in krows]
        ok = sum(p >= 80 for p in pct)
        goals.append({"goal": "kernels >= 80% of copy bandwidth", "target": ">= 80% (every config)",
                      "measured": f"{ok}/{len(pct)} configs; min {min(pct):.0f}%, "
                                  f"median {sorted(pct)[len(pct) // 2]:.0f}%",
                      "met": ok == len(pct)})
    for r in _rows(sections, "selection"):
        if r.get("variant") == "batched":
            goals.append({"goal": f"batched selection vs sequential [{r['model']}]", "target": ">= 10x",
                          "measured": f"{r['speedup_vs_sequential']:.2f}x", "met": r["speedup_vs_sequential"] >= 10})
    for r in _rows(sections, "determinism"):
        if r.get("deterministic"):
            goals.append({"goal": f"deterministic extraction bitwise repeatable [{r['model']}]", "target": "identical",
                          "measured": "identical" if r["bitwise_identical"] else f"max diff {r['max_abs_diff']:.3g}",
                          "met": bool(r["bitwise_identical"])})
    rss = _rows(sections, "extraction_rss")
    if len(rss) >= 2:
        ratio = rss[-1]["peak_rss_mb"] / rss[0]["peak_rss_mb"]
        goals.append({"goal": f"peak RSS {rss[-1]['prompts']} vs {rss[0]['prompts']} prompts", "target": "<= 1.10x",
                      "measured": f"{ratio:.3f}x", "met": ratio <= 1.10})
    return goals


def markdown_report(title: str, env: Mapping[str, Any], sections: Mapping[str, Any], notes: Sequence[str]) -> str:
    """The whole report: header facts, notes, goals table, then one table per section."""
    lines = [f"# {title}", ""]
    keys = ["date_utc", "commit", "gpu", "device_peak_GB/s", "device_peak_source", "cpu", "cpu_count",
            "torch_threads", "torch", "cuda", "transformers", "loadavg_1m_at_start", "backends", "model", "total_s"]
    for k in keys:
        if k in env:
            v = env[k]
            if isinstance(v, dict):
                v = ", ".join(f"{a}={b}" for a, b in v.items())
            lines.append(f"- **{k}**: {v}")
    lines.append("")
    if notes:
        lines += ["**Notes**", ""] + [f"- {n}" for n in notes] + [""]
    goals = sections.get("goals") or goal_rows(sections)
    if goals:
        lines += [f"## {TITLES['goals']}", "", markdown_table(goals, ["goal", "target", "measured", "met"])]
    for name, rows in sections.items():
        if name == "goals":
            continue
        lines.append(f"## {TITLES.get(name, name)}")
        lines.append("")
        if isinstance(rows, str):  # skipped / error
            lines += [f"_{rows}_", ""]
            continue
        lines.append(markdown_table(rows, [c for c in COLUMNS.get(name, list(rows[0]) if rows else [])
                                           if any(c in r for r in rows)]))
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, title: str, env: Mapping[str, Any], sections: dict[str, Any],
                  notes: Sequence[str]) -> str:
    """``<stem>.json`` (everything), ``<stem>_<section>.csv`` per table, ``<stem>.md``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    sections = dict(sections)
    sections["goals"] = goal_rows(sections)
    write_json(out / f"{stem}.json", {"title": title, "environment": env, "notes": list(notes), "sections": sections})
    for name, rows in sections.items():
        if isinstance(rows, list) and rows:
            write_csv(out / f"{stem}_{name}.csv", rows)
    md = markdown_report(title, env, sections, notes)
    write_text(out / f"{stem}.md", md)
    return md


def plot(sections: Mapping[str, Any], path: Path, title: str) -> None:
    """Three panels: kernel GB/s per config, extraction prompts/s, intervention overhead %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5))
    # kernels
    ax = axes[0]
    krows = _rows(sections, "kernels")
    cfgs: list[str] = []
    series: dict[str, list[float]] = {}
    for r in krows:
        if r["variant"] == "copy":
            continue
        cfg = f"{'acc' if r['op'].startswith('group') else 'proj'} {r['dtype']} d{r['d']}" + \
              (f" k{r['k']}" if r["k"] not in ("–", None) else "")
        if cfg not in cfgs:
            cfgs.append(cfg)
        v = "refusal-fast" if str(r["variant"]).startswith("refusal-fast") else r["variant"]
        series.setdefault(v, []).append(r["pct_of_copy_GB/s"])
    width = 0.8 / max(1, len(series))
    for i, (v, ys) in enumerate(series.items()):
        ax.barh([j + i * width for j in range(len(ys))], ys, height=width, label=v)
    ax.axvline(100, color="k", lw=0.8, label="torch copy (ceiling)")
    ax.axvline(80, color="k", lw=0.8, ls="--", label="goal 80%")
    ax.set_yticks([j + 0.4 - width / 2 for j in range(len(cfgs))], cfgs, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("effective bandwidth, % of torch copy of the same tensor")
    ax.set_title("Kernels: % of copy bandwidth (higher is better)")
    ax.legend(fontsize=8)
    # extraction
    ax = axes[1]
    erows = _rows(sections, "extraction")
    models = list(dict.fromkeys(r["model"] for r in erows))
    variants = list(dict.fromkeys(r["variant"] for r in erows))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, m in enumerate(models):
            for r in erows:
                if r["model"] == m and r["variant"] == v:
                    xs.append(j + i * width)
                    ys.append(r["x_vs_plain_decoder"] if r.get("x_vs_plain_decoder") else math.nan)
        ax.bar(xs, ys, width=width, label=v)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
    ax.set_ylabel("speed relative to plain forward (decoder only)")
    ax.set_title("Extraction prompts/s (ratio, same run)")
    ax.legend(fontsize=8)
    # interventions
    ax = axes[2]
    irows = _rows(sections, "interventions")
    cfgs = list(dict.fromkeys(f"{r['model']} {r['phase']} b{r['batch']}" for r in irows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in irows) if v != "none"]
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ys, errs = [], [], []
        for j, c in enumerate(cfgs):
            for r in irows:
                if f"{r['model']} {r['phase']} b{r['batch']}" == c and r["variant"] == v:
                    xs.append(j + i * width)
                    ys.append(r["overhead_%"])
                    errs.append(100 * r["iqr_rel"] / 2 if r.get("iqr_rel") == r.get("iqr_rel") else 0)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=2, label=v)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cfgs))], cfgs, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("overhead vs no intervention, % (error bar: half IQR)")
    ax.set_title("Ablation overhead (lower is better)")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_figure(fig, path, dpi=110)
    plt.close(fig)


__all__ = ["goal_rows", "markdown_report", "write_outputs", "plot", "fmt"]
