#!/usr/bin/env python
"""One-command GPU benchmark (<= 10 minutes on one H100): writes JSON + Markdown to --out.

    python bench/gpu.py --out bench/results/gpu            # on the GPU machine
    python bench/gpu.py --cpu-smoke --out /tmp/gpu-smoke   # every code path, tiny model, CPU, < 1 min

Model: random-initialised ``LlamaForCausalLM`` with the Llama-3.1-8B config in bf16 (d 4096,
32 layers, MLP 14336, vocab 128256, 32 heads / 8 KV heads); ``--layers N`` truncates it (stated
in the output). The torch.compile / CUDA-graph rows use a shared-weight clone truncated to
``--compile-layers`` (default 4) layers, because compiling 2 variants x 2 modes x 2 phases x 2 batch
sizes (16 static-shape graphs) of the full 32-layer model does not fit the 10-minute budget; the
other rows use ``--layers``. Compiled rows also report the overhead in ms per layer, which does
not depend on the depth.
Prompts come from the shipped datasets, tokenised with the test suite's small BPE tokenizer
(vocab ~700, Llama-3 chat template), so prompts are somewhat longer in tokens than with the real
Llama tokenizer; token counts are reported.

Sections (each timed side by side in this process; a section that fails is recorded and the run
goes on, except under --cpu-smoke / --strict): kernels (GB/s vs torch copy and vs device peak),
extraction (refusal-fast / plain forward / RD-style), determinism (bitwise), eager intervention
overhead at batch 1 and 32, batched vs sequential selection, compiled / CUDA-graph overhead.
A time budget (--budget-s) skips remaining sections rather than overrun.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="refusal-fast GPU benchmark (one command)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny config on CPU through every code path (compile with the aot_eager backend)")
    p.add_argument("--layers", type=int, default=None, help="truncate the 8B config to N layers (default 32)")
    p.add_argument("--compile-layers", type=int, default=4, help="layers of the model used by the compiled rows")
    p.add_argument("--compile-batches", default="1,32", help="batch sizes of the compiled rows")
    p.add_argument("--budget-s", type=float, default=570.0, help="skip remaining sections after this many seconds")
    p.add_argument("--sections", default="kernels,extraction,determinism,interventions,selection,compiled",
                   help="comma-separated subset of sections to run")
    p.add_argument("--strict", action="store_true", help="stop at the first failing section (default with --cpu-smoke)")
    p.add_argument("--device", default=None, help="override the device (default cuda, cpu with --cpu-smoke)")
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> dict:
    """Workload sizes: full GPU run or the tiny CPU smoke run."""
    if a.cpu_smoke:
        return dict(
            kernel=dict(dtypes=("bf16", "fp32"), ds=(256,), ks=(1, 4), n_rows=64, rounds=2, min_time_s=0.0),
            extract=dict(n_per_group=4, batch_size=4, rounds=1), det_prompts=4,
            interv=dict(batches=(2,), prefill_seq=16, decode_prompt=8, n_new=3, rounds=1),
            select=dict(n_val=2, batch_size=4, candidates_per_pass=8, rounds=1, n_extract=4, layers=[0]),
            compiled=dict(prefill_seq=16, decode_prompt=8, n_new=2, rounds=1),
        )
    return dict(
        kernel=dict(dtypes=("bf16", "fp32"), ds=(2048, 4096), ks=(1, 4, 16), n_rows=16384, rounds=15,
                    min_time_s=0.005),
        extract=dict(n_per_group=256, batch_size=32, rounds=5), det_prompts=64,
        interv=dict(batches=(1, 32), prefill_seq=512, decode_prompt=128, n_new=32, rounds=5),
        select=dict(n_val=32, batch_size=32, candidates_per_pass=8, rounds=1, n_extract=64, layers=None),
        compiled=dict(prefill_seq=512, decode_prompt=128, n_new=32, rounds=5),
    )


def device_peak_gbs(device) -> tuple[float | None, str]:
    """Theoretical DRAM bandwidth of the GPU from its memory clock and bus width (or a known-name table)."""
    import torch

    p = torch.cuda.get_device_properties(device)
    clock_khz = getattr(p, "memory_clock_rate", None)
    bus_bits = getattr(p, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "2 x memory clock x bus width (device properties)"
    table = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}
    for k, v in table.items():
        if k in p.name:
            return v, f"datasheet value for {k}"
    return None, "unknown"


class Runner:
    """Runs sections within a time budget, recording rows, errors and peak memory."""

    def __init__(self, a: argparse.Namespace, device):
        self.a, self.device = a, device
        self.t0 = time.perf_counter()
        self.sections: dict = {}
        self.memory: list[dict] = []
        self.strict = a.strict or a.cpu_smoke
        self.wanted = set(a.sections.split(","))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn, table: str | None = None) -> None:
        import torch

        from bench.common import log, peak_rss_mb, reset_peak_rss

        table = table or name
        if name not in self.wanted:
            return
        if self.elapsed() > self.a.budget_s:
            self.sections.setdefault(table, f"skipped: time budget of {self.a.budget_s:.0f} s used up")
            log(f"[gpu.py] skip {name}: budget")
            return
        log(f"[gpu.py] {name} (t={self.elapsed():.0f}s)")
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        t = time.perf_counter()
        try:
            rows = fn()
        except Exception as exc:  # noqa: BLE001 - a failed section is recorded, the run goes on
            if self.strict:
                raise
            self.sections[table] = f"error: {type(exc).__name__}: {exc}"
            log(traceback.format_exc())
            return
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
        self.memory.append({"section": name, "peak_mb": peak, "seconds": time.perf_counter() - t,
                            "what": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (VmHWM)"})
        if isinstance(rows, dict):
            for k, v in rows.items():
                self.sections.setdefault(k, []).extend(v)
        else:
            self.sections.setdefault(table, []).extend(rows)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton can be imported
    sys.path.insert(0, str(REPO))
    import torch

    import refusal_fast as rf
    from bench import bench_extract, bench_interventions, bench_kernels, bench_select
    from bench.common import environment, log
    from bench.summary import write_outputs
    from bench.workloads import LLAMA31_8B, TINY_LLAMA, bench_tokenizer, prompt_groups, random_direction, random_llama

    device = torch.device(a.device or ("cpu" if a.cpu_smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; run with --cpu-smoke for the CPU code-path check", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    if a.cpu_smoke:
        torch.set_num_threads(1)  # shared 2-core machines: OpenMP waits dominate multi-thread runs
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    s = settings(a)
    env = environment(device)
    notes = []
    peak, peak_src = (device_peak_gbs(device) if device.type == "cuda" else (None, "n/a on CPU"))
    env["device_peak_GB/s"] = peak
    env["device_peak_source"] = peak_src

    cfg = TINY_LLAMA if a.cpu_smoke else LLAMA31_8B
    n_layers = a.layers or cfg["num_hidden_layers"]
    dtype = torch.bfloat16
    tok = bench_tokenizer("llama3")
    t = time.perf_counter()
    model = random_llama(cfg, tok, n_layers=n_layers, dtype=dtype, device=device)
    build_s = time.perf_counter() - t
    ad = rf.get_adapter(model)
    env["model"] = {
        "config": "tiny Llama (CPU smoke)" if a.cpu_smoke else "Llama-3.1-8B architecture, random init",
        "layers": n_layers, "layers_of_config": cfg["num_hidden_layers"],
        "truncated": n_layers != cfg["num_hidden_layers"],
        "d_model": ad.d_model, "vocab": model.config.vocab_size, "dtype": str(dtype),
        "params": sum(p.numel() for p in model.parameters()),
        "compile_rows_layers": min(2 if a.cpu_smoke else a.compile_layers, n_layers), "build_s": build_s,
    }
    notes.append(f"Model: {env['model']['config']}, {n_layers} of {cfg['num_hidden_layers']} layers "
                 f"({'truncated' if env['model']['truncated'] else 'full depth'}), bf16, "
                 f"{env['model']['params'] / 1e9:.2f} B parameters; "
                 f"compiled rows: {env['model']['compile_rows_layers']} layers.")
    notes.append("Tokenizer: the test suite's BPE (vocab ~700) with a Llama-3 chat template; prompts are longer in "
                 "tokens than with the real Llama-3 tokenizer (mean tokens per prompt in the extraction rows).")
    if a.cpu_smoke:
        notes.append("CPU SMOKE RUN: tiny model, tiny sizes, compile rows use the aot_eager / eager backends; "
                     "numbers are meaningless, this run only proves every code path works.")
    basis = random_direction(ad.d_model, 1, seed=0)[0]
    run = Runner(a, device)
    groups = prompt_groups(s["extract"]["n_per_group"])

    def kernels():
        rows = bench_kernels.kernel_rows(device=device, peak_gbs=peak, **s["kernel"])
        out = {"kernels": rows}
        if device.type == "cpu":
            out["triton_interpreted"] = bench_kernels.triton_interpreted_rows(ds=(256,), ks=(1, 4), dtypes=("bf16",))
        return out

    def extraction():
        rows = bench_extract.extraction_rows(model, tok, groups, "8B-config" if not a.cpu_smoke else "tiny",
                                             batch_size=s["extract"]["batch_size"], rounds=s["extract"]["rounds"],
                                             device=device)
        from refusal_fast import chat

        lengths = chat.prompt_lengths(tok, [p for ps in groups.values() for p in ps])
        for r in rows:
            r["mean_tokens_per_prompt"] = sum(lengths) / len(lengths)
        return rows

    def determinism():
        g = prompt_groups(s["det_prompts"] // 2)
        return bench_extract.determinism_rows(model, tok, g, "8B-config" if not a.cpu_smoke else "tiny",
                                              batch_size=min(16, s["det_prompts"]))

    def interventions():
        return bench_interventions.overhead_rows(model, basis, "8B-config" if not a.cpu_smoke else "tiny",
                                                 **s["interv"])

    def selection():
        sel = s["select"]
        means = rf.extract_means(model, tok, prompt_groups(sel["n_extract"] // 2), progress=False,
                                 batch_size=sel["batch_size"])
        val = prompt_groups(sel["n_val"], val=True)
        return bench_select.selection_rows(model, tok, means, val["harmful"], val["harmless"],
                                           "8B-config" if not a.cpu_smoke else "tiny", batch_size=sel["batch_size"],
                                           candidates_per_pass=sel["candidates_per_pass"], rounds=sel["rounds"],
                                           device=device, layers=sel["layers"])

    def compiled():
        n = min(2 if a.cpu_smoke else a.compile_layers, n_layers)
        small = bench_interventions.shared_clone(model)
        small.model.layers = small.model.layers[:n]
        small.config.num_hidden_layers = n
        label = f"{'8B-config' if not a.cpu_smoke else 'tiny'} {n} layers"
        batches = (2,) if a.cpu_smoke else tuple(int(b) for b in a.compile_batches.split(","))
        skipped: list = []
        rows = bench_interventions.compiled_rows(small, basis, label, batches=batches, cpu_smoke=a.cpu_smoke,
                                                 deadline=run.t0 + a.budget_s, skipped=skipped, **s["compiled"])
        if skipped:
            notes.append(f"Compiled rows skipped for lack of time (budget {a.budget_s:.0f} s): {', '.join(skipped)}.")
        return rows

    run.run("kernels", kernels)
    run.run("extraction", extraction)
    run.run("determinism", determinism)
    run.run("interventions", interventions)
    run.run("selection", selection)
    run.run("compiled", compiled)
    sections = dict(run.sections)
    sections["memory"] = run.memory
    env["total_s"] = run.elapsed()
    title = "refusal-fast GPU benchmark" + (" (CPU SMOKE RUN)" if a.cpu_smoke else "")
    md = write_outputs(a.out, "gpu", title, env, sections, notes)
    print(md)
    log(f"[gpu.py] done in {run.elapsed():.0f}s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
