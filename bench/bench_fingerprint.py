"""Cost of the weights fingerprint (refusal_fast.fingerprint.weights_fingerprint).

Two measurements, each printed as a Markdown table:

- **side by side** on a random Llama (``SMALL_LLAMA``, 6 layers, d_model 768, bf16): the sampled
  fingerprint vs the baseline of hashing every weight byte (sha256 over each parameter), timed
  interleaved in one process (bench.common.interleaved); the ratio is the speed-up;
- **Llama-3-8B shapes**: the fingerprint alone over 291 bf16 parameters of Llama-3-8B's shapes
  (8.0 B elements, allocated with ``torch.empty`` so only the sampled pages are touched; a full hash
  would read 16 GB). Its cost depends on the number of tensors, not on their size.

Run: ``python -m bench.bench_fingerprint`` (``--smoke``: tiny shapes, for the test suite).
"""
from __future__ import annotations

import argparse
import hashlib
from typing import Any

import torch
from torch import nn

from refusal_fast.artifacts import tensor_sha256
from refusal_fast.fingerprint import weights_fingerprint

from .common import interleaved, markdown_table
from .workloads import SMALL_LLAMA, TINY_LLAMA, random_llama


def full_hash(model: nn.Module) -> str:
    """Baseline: sha256 over every parameter's bytes."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(tensor_sha256(p).encode())
    return h.hexdigest()


class LlamaShapes(nn.Module):
    """Parameters with Llama-3-8B's names and shapes (uninitialised; nothing else)."""

    def __init__(self, n_layers: int = 32, d: int = 4096, ffn: int = 14336, kv: int = 1024, vocab: int = 128256):
        super().__init__()

        def p(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=torch.bfloat16), requires_grad=False)

        self.embed_tokens, self.lm_head, self.norm = p(vocab, d), p(vocab, d), p(d)
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            m = nn.Module()
            m.q_proj, m.k_proj, m.v_proj, m.o_proj = p(d, d), p(kv, d), p(kv, d), p(d, d)
            m.gate_proj, m.up_proj, m.down_proj = p(ffn, d), p(ffn, d), p(d, ffn)
            m.input_layernorm, m.post_attention_layernorm = p(d), p(d)
            self.layers.append(m)


def rows(smoke: bool = False, rounds: int = 5) -> list[dict[str, Any]]:
    """One row per measurement: model, n tensors, n parameters, median seconds per variant, ratio."""
    out = []
    small = random_llama(dict(TINY_LLAMA if smoke else SMALL_LLAMA, vocab_size=512 if smoke else 32000),
                         dtype=torch.bfloat16)
    st = interleaved({"fingerprint": lambda: weights_fingerprint(small), "full sha256": lambda: full_hash(small)},
                     rounds=rounds)
    n_t, n_p = len(list(small.parameters())), sum(p.numel() for p in small.parameters())
    out.append({"model": "random Llama (bf16)", "tensors": n_t, "params": n_p,
                "fingerprint_s": st["fingerprint"].median, "full_sha256_s": st["full sha256"].median,
                "speedup": st["full sha256"].median / st["fingerprint"].median})
    big = LlamaShapes(n_layers=2, d=256, ffn=512, kv=64, vocab=1024) if smoke else LlamaShapes()
    st = interleaved({"fingerprint": lambda: weights_fingerprint(big)}, rounds=rounds)
    out.append({"model": "Llama-3-8B shapes (bf16, empty)" if not smoke else "Llama shapes (smoke)",
                "tensors": len(list(big.parameters())), "params": sum(p.numel() for p in big.parameters()),
                "fingerprint_s": st["fingerprint"].median, "full_sha256_s": None, "speedup": None})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = rows(a.smoke, a.rounds)
    print(markdown_table(r))
    return r


if __name__ == "__main__":
    main()
