"""Baselines that refusal-fast is compared against (written here, never imported by the package).

- :func:`naive_ablation_hooks`: Python forward hooks at the same points refusal-fast's ``ablate``
  uses (block input, attention output, MLP output), computing the textbook out-of-place
  ``x - (x @ r)[..., None] * r`` (rank-k: ``x - (x @ Q^T) @ Q``) in the activation dtype.
- :func:`noop_hooks`: the same hook points with hooks that do nothing (pure hook-call cost).
- :func:`rd_style_means`: extraction as in the reference ``refusal_direction`` repository
  (Arditi et al. 2024, ``pipeline/submodules/generate_directions.py``): a forward pre-hook on
  every block clones the **full** ``[batch, seq, d_model]`` input, casts it to float64, sums the
  wanted positions into a float64 cache; each group runs separately in dataset order and the
  forward computes the full LM head logits.
- :func:`plain_forward`: the same prompts through the model with no hooks at all.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from refusal_fast import chat
from refusal_fast.models import get_adapter


def _hook_layers(adapter, layers) -> list[int]:
    return list(range(adapter.n_layers)) if layers is None else adapter.check_layers(layers)


def _as_basis(basis: torch.Tensor, d_model: int) -> torch.Tensor:
    """Orthonormal float32 rows ``[k, d]`` from ``[d]`` or ``[k, d]`` (QR, like refusal-fast)."""
    b = torch.as_tensor(basis, dtype=torch.float64)
    if b.dim() == 1:
        b = b[None]
    if b.shape[-1] != d_model:
        raise ValueError(f"basis width {b.shape[-1]} != d_model {d_model}")
    q, _ = torch.linalg.qr(b.T)
    return q.T.contiguous()


@contextlib.contextmanager
def naive_ablation_hooks(model, basis: torch.Tensor, layers=None) -> Iterator[None]:
    """Project ``basis`` out at block inputs and attention/MLP outputs with plain torch ops.

    ``basis``: ``[d]`` or ``[k, d]``. Activations ``[batch, seq, d_model]`` are replaced by new
    tensors ``x - (x @ r)[..., None] * r`` (rank 1) or ``x - (x @ Q^T) @ Q`` computed in the
    activation dtype — what a user writes without refusal-fast.
    """
    adapter = get_adapter(model)
    q64 = _as_basis(basis, adapter.d_model)
    q = q64.to(device=adapter.device, dtype=adapter.dtype)
    r = q[0]
    rank1 = q.shape[0] == 1

    def ablate(x: torch.Tensor) -> torch.Tensor:
        if rank1:
            return x - (x @ r)[..., None] * r
        return x - (x @ q.T) @ q

    def pre_hook(module, args, kwargs):
        if args:
            return (ablate(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = ablate(kwargs["hidden_states"])
        return args, kwargs

    def out_hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return ablate(output)
        return (ablate(output[0]), *output[1:])

    handles = []
    try:
        for i in _hook_layers(adapter, layers):
            handles.append(adapter.blocks[i].register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(adapter.attn_out(i).register_forward_hook(out_hook))
            handles.append(adapter.mlp_out(i).register_forward_hook(out_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def noop_hooks(model, layers=None) -> Iterator[None]:
    """Hooks that return None at the same points as :func:`naive_ablation_hooks` (call overhead only)."""
    adapter = get_adapter(model)

    def pre_hook(module, args, kwargs):
        return None

    def out_hook(module, args, output):
        return None

    handles = []
    try:
        for i in _hook_layers(adapter, layers):
            handles.append(adapter.blocks[i].register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(adapter.attn_out(i).register_forward_hook(out_hook))
            handles.append(adapter.mlp_out(i).register_forward_hook(out_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def rd_style_means(model, tokenizer, groups: dict[str, Sequence[str]], positions: Sequence[int] | None = None,
                   batch_size: int = 32, system_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Reference-repo extraction: ``{group: mean [n_positions, n_layers, d_model] float64}``.

    Mirrors ``get_mean_activations`` of the refusal_direction repo: pre-hooks on every block do
    ``activation = input[0].clone().to(float64 cache)`` and add ``activation[:, positions].sum(0) / n``;
    batches in dataset order, one group at a time, full forward with logits.
    """
    adapter = get_adapter(model)
    if positions is None:
        positions = chat.eoi_positions(tokenizer, system_prompt)
    positions = list(positions)
    out = {}
    for name, prompts in groups.items():
        n = len(prompts)
        cache = torch.zeros(len(positions), adapter.n_layers, adapter.d_model, dtype=torch.float64,
                            device=adapter.device)

        def make_hook(layer: int, cache: torch.Tensor = cache, n: int = n):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                activation = x.clone().to(cache)  # full [batch, seq, d] copy in float64, as the reference does
                cache[:, layer] += (1.0 / n) * activation[:, positions, :].sum(dim=0)
            return hook

        handles = []
        try:
            for layer in range(adapter.n_layers):
                handles.append(adapter.blocks[layer].register_forward_pre_hook(make_hook(layer), with_kwargs=True))
            for i in range(0, n, batch_size):
                enc = chat.encode_prompts(tokenizer, list(prompts[i:i + batch_size]), system_prompt,
                                          device=adapter.device)
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        finally:
            for h in handles:
                h.remove()
        out[name] = cache
    return out


@torch.inference_mode()
def plain_forward(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, bucketed: bool = True,
                  logits: bool = True, system_prompt: str | None = None) -> int:
    """Run ``prompts`` through the model with no hooks; returns the number of prompts.

    ``bucketed``: length-sorted batches (as ``extract_means`` uses) instead of dataset order.
    ``logits``: full causal LM with logits at every position; False runs only the decoder stack
    (``model.model`` / ``model.transformer``, no final LM head).
    """
    adapter = get_adapter(model)
    prompts = list(prompts)
    if bucketed:
        lengths = chat.prompt_lengths(tokenizer, prompts, system_prompt)
        batches = [[prompts[i] for i in b] for b in chat.length_buckets(lengths, batch_size)]
    else:
        batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    net = model if logits else adapter.base_model
    for batch in batches:
        enc = chat.encode_prompts(tokenizer, batch, system_prompt, device=adapter.device)
        net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=enc["position_ids"],
            use_cache=False)
    return len(prompts)


def naive_group_accumulate(acc: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``acc[index[i]] += x[i]`` with ``index_add_`` after an fp32 cast (the plain-torch way)."""
    return acc.index_add_(0, index, x.float())


def naive_project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Out-of-place ``x - (x @ Q^T) @ Q`` in ``x``'s dtype (rank 1: ``x - (x @ r)[..., None] * r``)."""
    q = basis.to(x.dtype)
    if q.shape[0] == 1:
        r = q[0]
        return x - (x @ r)[..., None] * r
    return x - (x @ q.T) @ q
