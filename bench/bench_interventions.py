"""Intervention overhead: prefill and decode tokens/s under ablation, side by side in one process.

Every variant is its own *shared-weight clone* of the model (``copy.deepcopy`` with the
parameters shared, so no extra memory) with its intervention entered once for the whole
measurement; calls to the variants are interleaved round-robin. Variants:

- ``none``: no intervention (the baseline of the eager rows).
- ``no-op hooks``: hooks that return None at block input / attention out / MLP out of every layer.
- ``naive hooks``: :func:`bench.baselines.naive_ablation_hooks` (``x - (x @ r)[..., None] * r``).
- ``refusal-fast hooks``: ``refusal_fast.ablate(model, r)``.
- ``refusal-fast fused``: ``refusal_fast.ablate(model, r, fused=True)`` (projection fused with the
  residual adds inside each block).
- ``orthogonalized weights``: ``refusal_fast.orthogonalize`` on a clone whose residual-writing
  weights are real copies (the other weights stay shared).
- ``compiled: none`` / ``compiled: refusal-fast hooks``: both ``torch.compile``d (GPU script);
  ``cudagraph: ...``: ``torch.compile(mode="reduce-overhead")``. Compiled rows are compared with
  the compiled ``none`` of the same mode.

Prefill: one forward of ``[batch, seq]`` random tokens, ``use_cache=False``, logits of the last
position only (as ``generate`` does). Decode: after an (untimed) prefill, ``n_new`` greedy steps
with a KV cache (``DynamicCache`` in eager rows; ``StaticCache`` in compiled rows, so shapes are
static); tokens/s = ``batch * n_new / time of the steps``.
Overhead % = ``100 * (t_variant / t_baseline - 1)`` from medians of the same run.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import refusal_fast as rf
from refusal_fast.models import get_adapter

from .baselines import naive_ablation_hooks, noop_hooks
from .common import interleaved, sync

EAGER_VARIANTS = ("none", "no-op hooks", "naive hooks", "refusal-fast hooks", "refusal-fast fused",
                  "orthogonalized weights")


def shared_clone(model, own: Sequence[torch.nn.Parameter] = ()):
    """Deep copy of ``model`` whose parameters are the *same* tensors, except those in ``own`` (copied)."""
    own_ids = {id(p) for p in own}
    memo = {id(p): p for p in model.parameters() if id(p) not in own_ids}
    return copy.deepcopy(model, memo)


def _ortho_clone(model, basis: torch.Tensor):
    ad = get_adapter(model)
    own = [ad.embed.weight]
    if ad.pos_embed is not None:
        own.append(ad.pos_embed.weight)
    if ad.tied:
        own.append(ad.lm_head.weight)
    for i in range(ad.n_layers):
        for mod in (ad.attn_out_proj(i), ad.mlp_out_proj(i)):
            own.append(mod.weight)
            if getattr(mod, "bias", None) is not None:
                own.append(mod.bias)
    clone = shared_clone(model, own)
    rf.orthogonalize(clone, basis, keep_originals=False)
    return clone


def _checksum(model) -> list[float]:
    return [float(p.detach().float().sum()) for p in model.parameters()]


def fused_available() -> bool:
    import inspect

    return "fused" in inspect.signature(rf.ablate).parameters


def build_variants(model, basis: torch.Tensor, variants: Sequence[str], stack: contextlib.ExitStack) -> dict:
    """``{variant: module}`` with each intervention entered on its own shared-weight clone (exited by ``stack``)."""
    out = {}
    for v in variants:
        if v == "none":
            out[v] = model
            continue
        if v == "orthogonalized weights":
            out[v] = _ortho_clone(model, basis)
            continue
        clone = shared_clone(model)
        if v == "no-op hooks":
            stack.enter_context(noop_hooks(clone))
        elif v == "naive hooks":
            stack.enter_context(naive_ablation_hooks(clone, basis))
        elif v == "refusal-fast hooks":
            stack.enter_context(rf.ablate(clone, basis))
        elif v == "refusal-fast fused":
            stack.enter_context(rf.ablate(clone, basis, fused=True))
        else:
            raise ValueError(f"unknown variant {v!r}")
        out[v] = clone
    return out


# ---------------------------------------------------------------------------- workloads
def random_tokens(batch: int, seq: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def prefill_fn(m, ids: torch.Tensor) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return m(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    return run


def decode_fn(m, ids: torch.Tensor, n_new: int, step_model=None, static: bool = False,
              cudagraph: bool = False) -> Callable[[], float]:
    """Callable that prefills (untimed) then times ``n_new`` greedy decode steps; returns their seconds.

    ``step_model``: the (compiled) module used for the decode steps (default ``m``); the prefill
    always runs through ``m`` eagerly. ``static``: use a ``StaticCache`` (needed for compiled steps).
    """
    import time

    from transformers import DynamicCache, StaticCache

    step_model = m if step_model is None else step_model
    B, T = ids.shape
    dev = ids.device
    # One StaticCache per callable, reset in place before each run: its tensors keep their
    # addresses, so compiled graphs are not re-guarded and CUDA graphs are not re-recorded.
    static_cache = None
    if static:
        with torch.inference_mode():  # same tensor kind as the caches made inside runs (no re-guarding)
            static_cache = StaticCache(config=m.config, max_cache_len=T + n_new)

    def run() -> float:
        with torch.inference_mode():
            if static_cache is not None:
                static_cache.reset()
                cache = static_cache
            else:
                cache = DynamicCache(config=m.config)
            out = m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(dev)
            t0 = time.perf_counter()
            for i in range(n_new):
                pos = torch.full((B, 1), T + i, dtype=torch.long, device=dev)
                if cudagraph:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = step_model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True,
                                    logits_to_keep=1).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
            sync(dev)
            return time.perf_counter() - t0
    return run


def _overhead_rows(stats, work: float, baseline: dict[str, str], meta: dict[str, Any], unit: str) -> list[dict]:
    rows = []
    naive_oh = None
    for v, s in stats.items():
        base = stats[baseline.get(v, "none")]
        oh = 100.0 * (s.median / base.median - 1.0)
        if v == "naive hooks":
            naive_oh = oh
        rows.append({**meta, "variant": v, unit: s.rate(work), "median_ms": s.median * 1e3, "iqr_rel": s.rel_iqr,
                     "n": s.n, "baseline": baseline.get(v, "none"), "overhead_%": oh if v != baseline.get(v, "none")
                     else 0.0})
    for r in rows:
        oh = r["overhead_%"]
        r["naive_overhead_/_this"] = (naive_oh / oh
                                      if (naive_oh is not None and oh > 0 and r["variant"] != "naive hooks")
                                      else None)
    return rows


def check_outputs(mods: dict, ids: torch.Tensor, reference: str = "refusal-fast hooks") -> dict[str, float]:
    """Max |logits - logits of ``reference``| relative to its max, per variant (last position)."""
    with torch.inference_mode():
        outs = {v: m(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float() for v, m in mods.items()}
    if reference not in outs:
        return {}
    ref = outs[reference]
    scale = float(ref.abs().max().clamp_min(1e-30))
    return {v: float((o - ref).abs().max()) / scale for v, o in outs.items()}


def overhead_rows(model, basis: torch.Tensor, label: str, batches: Sequence[int] = (1, 4),
                  prefill_seq: int = 128, decode_prompt: int = 32, n_new: int = 16, rounds: int = 5,
                  variants: Sequence[str] = EAGER_VARIANTS,
                  phases: Sequence[str] = ("prefill", "decode")) -> list[dict]:
    """Eager overhead rows for each (phase, batch): tokens/s and overhead % vs ``none``."""
    ad = get_adapter(model)
    dev = ad.device
    variants = [v for v in variants if v != "refusal-fast fused" or fused_available()]
    before = _checksum(model)
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        mods = build_variants(model, basis, variants, stack)
        vocab = model.config.vocab_size
        agree = check_outputs({k: m for k, m in mods.items() if k != "none" and k != "no-op hooks"},
                              random_tokens(2, 16, vocab, dev, seed=1))
        for phase in phases:
            for b in batches:
                if phase == "prefill":
                    ids = random_tokens(b, prefill_seq, vocab, dev)
                    fns = {v: prefill_fn(m, ids) for v, m in mods.items()}
                    work, unit = b * prefill_seq, "prefill tok/s"
                else:
                    ids = random_tokens(b, decode_prompt, vocab, dev)
                    fns = {v: decode_fn(m, ids, n_new) for v, m in mods.items()}
                    work, unit = b * n_new, "decode tok/s"
                stats = interleaved(fns, rounds=rounds, warmup=1, device=dev)
                meta = {"model": label, "phase": phase, "batch": b,
                        "seq": prefill_seq if phase == "prefill" else f"{decode_prompt}+{n_new}"}
                for r in _overhead_rows(stats, work, {}, meta, "tok/s"):
                    r["unit"] = unit
                    r["max_rel_diff_vs_rf_hooks"] = agree.get(r["variant"])
                    rows.append(r)
    if _checksum(model) != before:
        raise RuntimeError("a benchmark variant modified the shared model weights")
    return rows


# ---------------------------------------------------------------------------- compiled rows
def compile_module(m, mode: str | None, cpu_smoke: bool):
    """``torch.compile`` of a module.

    CPU smoke runs trace without code generation: ``aot_eager`` (dynamo + AOT autograd, which
    exercises the custom ops' fake implementations) for the default mode, dynamo-only ``eager``
    for reduce-overhead (CUDA graphs do not exist on CPU anyway).
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Hooks are entered before compiling, and each variant is its own module object; still, make
    # dynamo guard on hooks so a compiled graph can never be reused with different hooks.
    if hasattr(torch._dynamo.config, "skip_nnmodule_hook_guards"):
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    if cpu_smoke:
        return torch.compile(m, backend="aot_eager" if not mode else "eager", dynamic=False)
    return torch.compile(m, mode=mode, dynamic=False) if mode else torch.compile(m, dynamic=False)


def _first_step_logits(m, step_model, ids: torch.Tensor, n_new: int, cudagraph: bool) -> torch.Tensor:
    """Eager prefill into a fresh StaticCache (sized as in the timed runs), then one decode step
    through ``step_model``; its logits ``[batch, 1, vocab]`` float32."""
    from transformers import StaticCache

    B, T = ids.shape
    with torch.inference_mode():
        cache = StaticCache(config=m.config, max_cache_len=T + n_new)
        tok = m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, True)
        pos = torch.full((B, 1), T, dtype=torch.long, device=ids.device)
        if cudagraph:
            torch.compiler.cudagraph_mark_step_begin()
        out = step_model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits.float().clone()


#: (mode, phase) order of the compiled rows: the most informative first, in case the time budget runs out.
COMPILED_ORDER = (("reduce-overhead", "decode"), ("default", "decode"), ("default", "prefill"),
                  ("reduce-overhead", "prefill"))


def compiled_rows(model, basis: torch.Tensor, label: str, batches: Sequence[int] = (1, 32), prefill_seq: int = 512,
                  decode_prompt: int = 128, n_new: int = 64, rounds: int = 5, order=COMPILED_ORDER,
                  cpu_smoke: bool = False, inner: Sequence[str] = ("none", "refusal-fast hooks"),
                  deadline: float | None = None, skipped: list | None = None) -> list[dict]:
    """Compiled / CUDA-graph rows: ``torch.compile(dynamic=False)`` of ``none`` and ``refusal-fast hooks``.

    For each (mode, phase) of ``order`` both variants are compiled (``"default"`` -> rows
    ``compiled: ...``, ``"reduce-overhead"`` -> ``cudagraph: ...``; CUDA graphs exist only on CUDA)
    and timed interleaved at each batch size; overhead is vs the compiled ``none`` of the same
    mode. Static shapes: one graph per (variant, mode, phase, batch size). Decode
    steps use a ``StaticCache`` (same shapes every step); the prefill before them runs eagerly.
    ``compiled_vs_eager_max_rel_diff`` compares the compiled variant's logits with its eager
    module's on the timed shapes. Past ``deadline`` (``time.perf_counter()``) the remaining
    combinations are skipped and named in ``skipped``.
    """
    import time

    ad = get_adapter(model)
    dev = ad.device
    vocab = model.config.vocab_size
    rows: list[dict] = []
    for mode, phase in order:
        if deadline is not None and time.perf_counter() > deadline:
            if skipped is not None:
                skipped.append(f"{mode}/{phase}")
            continue
        tag = "compiled" if mode == "default" else "cudagraph"
        cudagraph = mode == "reduce-overhead" and dev.type == "cuda"
        with contextlib.ExitStack() as stack:
            mods = build_variants(model, basis, inner, stack)
            comp = {f"{tag}: {v}": compile_module(m, None if mode == "default" else mode, cpu_smoke)
                    for v, m in mods.items()}
            eager = {f"{tag}: {v}": m for v, m in mods.items()}
            base = f"{tag}: none"
            for b in batches:
                if phase == "prefill":
                    ids = random_tokens(b, prefill_seq, vocab, dev)

                    def mk(cm, ids=ids, cudagraph=cudagraph):
                        def run():
                            with torch.inference_mode():
                                if cudagraph:
                                    torch.compiler.cudagraph_mark_step_begin()
                                return cm(input_ids=ids, use_cache=False, logits_to_keep=1).logits
                        return run
                    fns = {k: mk(cm) for k, cm in comp.items()}
                    work, unit = b * prefill_seq, "prefill tok/s"
                    err = {}
                    for k in comp:
                        a = mk(comp[k])().float().clone()
                        with torch.inference_mode():
                            ref = eager[k](input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()
                        err[k] = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                else:
                    ids = random_tokens(b, decode_prompt, vocab, dev)
                    fns = {k: decode_fn(eager[k], ids, n_new, step_model=comp[k], static=True, cudagraph=cudagraph)
                           for k in comp}
                    work, unit = b * n_new, "decode tok/s"
                    err = {}
                    for k in comp:
                        a = _first_step_logits(eager[k], comp[k], ids, n_new, cudagraph)
                        ref = _first_step_logits(eager[k], eager[k], ids, n_new, False)
                        err[k] = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                stats = interleaved(fns, rounds=rounds, warmup=2, device=dev)
                meta = {"model": label, "phase": phase, "batch": b,
                        "seq": prefill_seq if phase == "prefill" else f"{decode_prompt}+{n_new}"}
                for r in _overhead_rows(stats, work, {k: base for k in comp}, meta, "tok/s"):
                    r["unit"] = unit
                    r["overhead_ms_per_layer"] = (stats[r["variant"]].median - stats[base].median) * 1e3 / ad.n_layers
                    r["compiled_vs_eager_max_rel_diff"] = err[r["variant"]]
                    r["backend"] = (("aot_eager" if mode == "default" else "eager") + " (CPU smoke)") if cpu_smoke \
                        else f"inductor mode={mode}"
                    rows.append(r)
    return rows


# ---------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def small_model():
    from .workloads import bench_tokenizer, random_llama

    torch.set_flush_denormal(True)
    tok = bench_tokenizer()
    cfg = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1536, num_attention_heads=8,
               num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)
    model = random_llama(cfg, tok)
    basis = torch.randn(512, generator=torch.Generator().manual_seed(0))
    return model, basis


@pytest.mark.parametrize("variant", EAGER_VARIANTS)
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_intervention(benchmark, small_model, variant, phase):
    model, basis = small_model
    if variant == "refusal-fast fused" and not fused_available():
        pytest.skip("ablate(fused=True) not available")
    with contextlib.ExitStack() as stack:
        m = build_variants(model, basis, [variant], stack)[variant]
        ids = random_tokens(1, 128 if phase == "prefill" else 32, model.config.vocab_size, "cpu")
        fn = prefill_fn(m, ids) if phase == "prefill" else decode_fn(m, ids, 16)
        benchmark.group = f"{phase} batch 1, d512 x 4 layers"
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)

