"""Models, tokenizers and prompt sets the benchmarks run on (all offline, no downloads).

- :func:`bench_tokenizer`: the test suite's small BPE tokenizer (~700 tokens, trained on the
  shipped prompts, in ``python_tests/tiny_models.py``) with a ChatML or Llama-3 template.
- :func:`random_llama`: a random-initialised ``LlamaForCausalLM`` from a config dict, e.g.
  :data:`SMALL_LLAMA` (CPU rows) or :data:`LLAMA31_8B` (GPU rows; optionally truncated layers).
- :func:`prompt_groups`: harmful / harmless instructions from the shipped datasets, cycled when
  more prompts are asked for than the dataset holds.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
import transformers

from refusal_fast import datasets

from .common import REPO, cycle_to

#: Llama-3.1-8B architecture (config.json of meta-llama/Llama-3.1-8B), weights random.
LLAMA31_8B: dict[str, Any] = dict(
    hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=False,
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)

#: Small CPU model: Llama layout, d_model 768, 6 layers, GQA; vocab set from the tokenizer.
SMALL_LLAMA: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=6, intermediate_size=2048, num_attention_heads=12,
    num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048,
)

#: Tiny config for smoke runs (every code path, seconds on CPU).
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=96, num_hidden_layers=3, intermediate_size=192, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=1024,
)


def bench_tokenizer(template: str = "chatml"):
    """Small offline BPE tokenizer with a chat template (from the test fixtures).

    If ``$RF_BENCH_TOKENIZER_DIR`` names a directory written by ``save_pretrained`` it is loaded
    from there instead (subprocesses skip re-training the BPE).
    """
    cached = os.environ.get("RF_BENCH_TOKENIZER_DIR")
    if cached and os.path.isdir(cached):
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(cached)
        tok.padding_side = "left"
        return tok
    tests_dir = str(REPO / "python_tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from tiny_models import make_tokenizer

    return make_tokenizer(template)


def random_llama(cfg: dict[str, Any], tokenizer=None, n_layers: int | None = None, dtype=torch.float32,
                 device: str | torch.device = "cpu", attn: str = "sdpa", seed: int = 0):
    """Random-initialised ``LlamaForCausalLM`` (eval mode) built directly on ``device`` in ``dtype``.

    ``n_layers`` truncates the config; ``tokenizer`` supplies pad/bos/eos ids (vocab stays the
    config's when given, else the tokenizer's size). Weights ~ N(0, 0.02) (HF default init).
    """
    c = dict(cfg)
    if n_layers is not None:
        c["num_hidden_layers"] = int(n_layers)
    if "vocab_size" not in c:
        if tokenizer is None:
            raise ValueError("vocab_size missing from the config and no tokenizer given")
        c["vocab_size"] = len(tokenizer)
    if tokenizer is not None:
        c.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id)
    config = transformers.LlamaConfig(**c)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prompt_groups(n_per_group: int, val: bool = False) -> dict[str, list[str]]:
    """``{"harmful": [...], "harmless": [...]}`` with ``n_per_group`` each (cycled if needed)."""
    if val:
        harmful, harmless = datasets.instructions("harmful_val"), datasets.instructions("harmless_val")
    else:
        harmful = datasets.instructions("harmful_train") + datasets.instructions("advbench")
        harmless = datasets.instructions("harmless_train", n=max(n_per_group, 1))
    return {"harmful": cycle_to(harmful, n_per_group), "harmless": cycle_to(harmless, n_per_group)}


def random_direction(d_model: int, k: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded random float32 basis ``[k, d]`` (rows not orthonormalised; callers do that)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d_model, generator=g)
