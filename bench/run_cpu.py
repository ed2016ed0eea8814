#!/usr/bin/env python
"""The CPU benchmark suite in one command: CSV/JSON/Markdown + a PNG chart in --out.

    python bench/run_cpu.py --out bench/results            # full suite (~5-10 min on 2 cores)
    python bench/run_cpu.py --smoke --out /tmp/cpu-smoke   # tiny sizes, every code path

Runs the comparisons directly (not through pytest; the ``bench_*.py`` pytest-benchmark files
time the same callables one at a time). Every comparison interleaves its variants in this
process and reports the median with the IQR; ratios come from the same run.

Sections: kernels (C++ ext vs naive torch vs torch copy; Triton interpreted for correctness),
extraction prompts/s (small random Llama and the SmolLM2 demo model), peak RSS 200 vs 2,000
prompts (fresh subprocesses), determinism, intervention overhead (prefill / decode tokens/s),
batched vs sequential direction selection.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton rows are interpreted on CPU (correctness only)
REPO = Path(__file__).resolve().parent.parent

#: CPU "small model" rows: Llama layout, d_model 512, 4 layers, GQA, random init, fp32.
CPU_SMALL = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1536, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="refusal-fast CPU benchmark suite")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes through every code path (seconds)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / C++ threads (default 1: on a shared machine multi-thread timings are dominated "
                        "by OpenMP waits on preempted threads)")
    p.add_argument("--no-demo", action="store_true", help="skip the rows on the real SmolLM2 demo model")
    p.add_argument("--sections", default="kernels,extraction,rss,determinism,interventions,selection")
    p.add_argument("--strict", action="store_true", help="raise on the first failing section (default with --smoke)")
    p.add_argument("--shared-machine-note", default=None,
                   help="text of a note about other load on the machine (default: from the load average)")
    return p.parse_args(argv)


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(
            kernel=dict(dtypes=("bf16",), ds=(256,), ks=(1, 4), n_rows=32, rounds=2, min_time_s=0.0),
            triton=dict(ds=(256,), ks=(1,), dtypes=("bf16",)),
            extract=dict(n_per_group=4, batch_size=4, rounds=1), demo_extract=None,
            rss=dict(counts=(8, 40), config="tiny", batch_size=4),
            det_prompts=4,
            interv=dict(batches=(2,), prefill_seq=16, decode_prompt=8, n_new=2, rounds=1), demo_interv=None,
            select=dict(n_extract=4, n_val=2, batch_size=4, rounds=1, layers=[0]),
        )
    return dict(
        kernel=dict(dtypes=("bf16", "fp32"), ds=(2048, 4096), ks=(1, 4, 16), n_rows=2048, rounds=9,
                    min_time_s=0.02),
        triton=dict(ds=(2048, 4096), ks=(1, 4, 16), dtypes=("bf16", "fp32")),
        extract=dict(n_per_group=32, batch_size=32, rounds=5),
        demo_extract=dict(n_per_group=8, batch_size=16, rounds=3),
        rss=dict(counts=(200, 2000), config="rss", batch_size=32),
        det_prompts=16,
        interv=dict(batches=(1, 4), prefill_seq=128, decode_prompt=32, n_new=16, rounds=9),
        demo_interv=dict(batches=(1,), prefill_seq=64, decode_prompt=32, n_new=8, rounds=7),
        select=dict(n_extract=32, n_val=8, batch_size=8, rounds=1, layers=None),
    )


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    import refusal_fast as rf
    from bench import bench_extract, bench_interventions, bench_kernels, bench_select
    from bench.common import environment, log, peak_rss_mb
    from bench.summary import plot, write_outputs
    from bench.workloads import TINY_LLAMA, bench_tokenizer, prompt_groups, random_direction, random_llama

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    s = sizes(a.smoke)
    wanted = set(a.sections.split(","))
    strict = a.strict or a.smoke
    env = environment("cpu")
    load = env.get("loadavg_1m_at_start") or 0.0
    notes = [
        a.shared_machine_note or (
            f"Shared machine: {os.cpu_count()} cores, 1-minute load average {load:.1f} at start (other jobs ran "
            "alongside); absolute numbers are depressed and noisy, compare ratios within a table."),
        f"torch threads = C++ extension threads = {a.threads}.",
        ("Tiny model (smoke): random-init Llama, d_model 96, 3 layers." if a.smoke else
         "Small model: random-init Llama, d_model 512, 4 layers, MLP 1536, 8 heads / 4 KV heads, fp32, "
         "test-suite BPE tokenizer (vocab ~700)."),
    ]
    if a.smoke:
        notes.append("SMOKE RUN: tiny sizes; the numbers are meaningless.")
    t_start = time.perf_counter()
    sections: dict = {}

    def section(name: str, fn) -> None:
        if name not in wanted:
            return
        log(f"[run_cpu] {name} (t={time.perf_counter() - t_start:.0f}s)")
        try:
            for k, v in fn().items():
                sections.setdefault(k, []).extend(v) if isinstance(v, list) else sections.__setitem__(k, v)
        except Exception as exc:  # noqa: BLE001
            if strict:
                raise
            sections[name] = f"error: {type(exc).__name__}: {exc}"
            log(traceback.format_exc())

    tok = bench_tokenizer("chatml")
    small_cfg = TINY_LLAMA if a.smoke else CPU_SMALL
    small = random_llama(small_cfg, tok)
    small_label = "tiny d96x3" if a.smoke else "small d512x4"
    basis = random_direction(small.config.hidden_size)[0]
    demo, demo_label = None, None
    if not (a.smoke or a.no_demo):
        try:
            try:
                demo = rf.load_demo_model()
                demo_label = "SmolLM2-135M demo (patched)"
            except FileNotFoundError as exc:
                demo = rf.load_demo_model(base=True)
                demo_label = "SmolLM2-135M (base)"
                notes.append(f"Demo model: refusal patch not available ({exc}); timed the base SmolLM2 "
                             "(identical compute).")
            notes.append(f"Demo model rows: {demo_label}, fp32, d_model 576, 30 layers, vocab 49,152.")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"Demo model rows skipped: {type(exc).__name__}: {exc}")
            demo = None

    def kernels():
        return {"kernels": bench_kernels.kernel_rows(device="cpu", **s["kernel"]),
                "triton_interpreted": bench_kernels.triton_interpreted_rows(**s["triton"])}

    def extraction():
        e = s["extract"]
        rows = bench_extract.extraction_rows(small, tok, prompt_groups(e["n_per_group"]), small_label,
                                             batch_size=e["batch_size"], rounds=e["rounds"])
        if demo is not None:
            d = s["demo_extract"]
            rows += bench_extract.extraction_rows(demo[0], demo[1], prompt_groups(d["n_per_group"]), demo_label,
                                                  batch_size=d["batch_size"], rounds=d["rounds"])
        return {"extraction": rows}

    def rss():
        return {"extraction_rss": bench_extract.rss_rows(**s["rss"])}

    def determinism():
        return {"determinism": bench_extract.determinism_rows(small, tok, prompt_groups(s["det_prompts"] // 2),
                                                              small_label)}

    def interventions():
        rows = bench_interventions.overhead_rows(small, basis, small_label, **s["interv"])
        if demo is not None:
            dbasis = random_direction(demo[0].config.hidden_size)[0]
            rows += bench_interventions.overhead_rows(demo[0], dbasis, demo_label, **s["demo_interv"])
        return {"interventions": rows}

    def selection():
        sel = s["select"]
        means = rf.extract_means(small, tok, prompt_groups(sel["n_extract"] // 2), progress=False)
        val = prompt_groups(sel["n_val"], val=True)
        return {"selection": bench_select.selection_rows(small, tok, means, val["harmful"], val["harmless"],
                                                         small_label, batch_size=sel["batch_size"],
                                                         rounds=sel["rounds"], layers=sel["layers"])}

    section("kernels", kernels)
    section("extraction", extraction)
    section("rss", rss)
    section("determinism", determinism)
    section("interventions", interventions)
    section("selection", selection)
    env["total_s"] = time.perf_counter() - t_start
    env["peak_rss_mb"] = peak_rss_mb()
    env["loadavg_1m_at_end"] = os.getloadavg()[0]
    notes.append(f"Load average 1 min at end: {env['loadavg_1m_at_end']:.1f}; total {env['total_s']:.0f} s.")
    title = "refusal-fast CPU benchmarks" + (" (SMOKE RUN)" if a.smoke else "")
    md = write_outputs(a.out, "cpu", title, env, sections, notes)
    plot(sections, a.out / "cpu.png", f"{title} — {env['date_utc']}, commit {env['commit']}, "
                                      f"{env['cpu']} x{env['cpu_count']}, {a.threads} thread(s), shared machine")
    print(md)
    log(f"[run_cpu] done in {time.perf_counter() - t_start:.0f}s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
