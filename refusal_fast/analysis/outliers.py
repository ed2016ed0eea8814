"""Massive-activation coordinates of the residual stream (a confound for random-direction controls).

Many LMs keep a few residual coordinates at values hundreds to thousands of times the typical
magnitude, mostly on the first token, which serves as an attention sink ("massive activations",
Sun et al. 2024). Ablating a direction ``u`` removes ``(x . u) u`` from every residual: on a
sink token that is about ``x_c * u_c`` along ``u`` for each massive coordinate ``c``, spread over
every other coordinate. A Gaussian random unit vector has ``|u_c| ~ 1/sqrt(d)``, so in a small
model (SmolLM2-135M: d=576, ``|x_c|`` ~ 19,000) some random directions disturb the sink enough
to change the model's output on *any* prompt, whatever the direction means. A random-direction
control for ablation should then match the tested direction on those coordinates
(:func:`refusal_fast.analysis.random_like` with ``match_dims=``) and vary it elsewhere; report
it beside the plain isotropic control.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..chat import encode_prompts
from ..models import block_input, get_adapter
from ._common import JSONResult

__all__ = ["MassiveActivations", "massive_activation_dims"]


@dataclasses.dataclass
class MassiveActivations(JSONResult):
    """Coordinates whose largest ``|activation|`` exceeds ``ratio`` times the typical one.

    Attributes:
        dims: coordinate indices, largest first.
        max_abs: ``[len(dims)]`` largest ``|x_c|`` seen at any block input, token and prompt.
        layer: ``[len(dims)]`` block whose input holds that largest value.
        median_abs: median ``|x|`` over every coordinate, token and block input (the typical size).
        ratio: the threshold used, as a multiple of ``median_abs``.
        n_prompts: prompts scanned.
    """

    dims: list
    max_abs: list
    layer: list
    median_abs: float
    ratio: float
    n_prompts: int


@torch.no_grad()
def massive_activation_dims(model: nn.Module, tokenizer, prompts: Sequence[str], ratio: float = 1000.0,
                            batch_size: int = 16, system_prompt: str | None = None) -> MassiveActivations:
    """Find the residual coordinates with massive activations.

    Scans the input of every block (``[batch, seq, d_model]``, padding excluded) over the chat-
    formatted ``prompts`` and returns the coordinates ``c`` with ``max |x_c| > ratio * median |x|``
    (the default 1000 follows Sun et al.: massive activations are ~10^3-10^4 times the median;
    SmolLM2-135M-Instruct has one, coordinate 507, ~19,000 on the first token from block 12 on).

    Args:
        model: a supported causal LM; tokenizer: its tokenizer (left padding is set if needed).
        prompts: instructions to scan (a handful is enough: the sink token is in every prompt).
        ratio: threshold as a multiple of the median magnitude (> 1).
        batch_size: prompts per forward pass.

    Returns:
        :class:`MassiveActivations` (``dims`` may be empty).
    """
    ratio = float(ratio)
    if not ratio > 1.0:
        raise ValueError(f"ratio must be a number > 1, got {ratio!r}")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of instructions")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    ad = get_adapter(model)
    device = next(model.parameters()).device
    d = ad.d_model
    max_abs = torch.zeros(ad.n_layers, d, dtype=torch.float64)
    medians: list[float] = []
    samples: list[torch.Tensor] = []  # subsampled |x| of the current batch, for its median
    mask_box: list[torch.Tensor] = []

    def record(layer: int):
        def hook(module, args, kwargs):
            x = block_input(args, kwargs).detach()
            a = x.abs().to(torch.float64)[mask_box[0]]  # [valid tokens, d]
            if a.numel():
                max_abs[layer] = torch.maximum(max_abs[layer], a.amax(0).cpu())
                samples.append(a.flatten()[:: max(1, a.numel() // 65536)].cpu())
        return hook

    handles = []
    try:
        for i, blk in enumerate(ad.blocks):
            handles.append(blk.register_forward_pre_hook(record(i), with_kwargs=True))
        for s in range(0, len(prompts), int(batch_size)):
            enc = encode_prompts(tokenizer, list(prompts[s:s + int(batch_size)]), system_prompt, device=device)
            mask_box[:] = [enc["attention_mask"].bool()]
            ad.base_model(**enc)
            medians.append(float(torch.cat(samples).median()))
            samples.clear()
    finally:
        for h in handles:
            h.remove()
    median = float(torch.tensor(medians).median())
    per_dim, layer_of = max_abs.max(0)
    hit = (per_dim > ratio * median).nonzero().flatten()
    order = hit[per_dim[hit].argsort(descending=True)]
    return MassiveActivations(dims=order.tolist(), max_abs=per_dim[order].tolist(), layer=layer_of[order].tolist(),
                              median_abs=median, ratio=ratio, n_prompts=len(prompts))
