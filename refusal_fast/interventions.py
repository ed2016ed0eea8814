"""Interventions on the residual stream: directional ablation, steering, activation addition.

All of them are context managers that register forward hooks on entry and remove them in
``finally`` (also on exceptions and KeyboardInterrupt); the model's parameters are never
touched, so it is bitwise identical afterwards. Contexts nest: hooks run in registration order
(outer context first). The permanent weight edit lives in :mod:`refusal_fast.weight_edit`
(:func:`orthogonalize`, re-exported here).

Hook points of layer ``i`` (see :mod:`refusal_fast.models`): the input of block ``i``
(``resid_pre``, ``hidden_states[i]``) and the attention / MLP outputs that block ``i`` adds to
the residual stream, all ``[batch, seq, d_model]``.

In place or not: when autograd is not tracking the hooked tensor (``torch.no_grad()``,
``torch.inference_mode()``, or a tensor that does not require grad) the hooks edit it in place
through the :mod:`refusal_fast.ops` kernels (one read and one write per row, fp32 math).
Otherwise they compute the same thing out of place with differentiable torch ops. The input
of block 0 may be a caller's ``inputs_embeds``; it is copied before being edited. Bases and
vectors are validated in float64 and cast once, on entry, to float32 on each block's device
(the kernels read float32 bases and do fp32 math on bf16/fp16/fp32 activations).

torch.compile: the hooks and the ``torch.ops.refusal_fast`` custom ops trace into the graph
(``fullgraph=True`` works). Dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards = True``), so a compiled model that was
already called *before* a context was entered keeps running its hook-free graph. Set that
flag to False before compiling: each hook configuration then compiles once and is reused by
later contexts with the same ranks and layers (bases are graph inputs, not constants).
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, overload

import torch
from torch import nn

from . import ops
from .basis import as_float64_matrix, check_castable, check_width, orthonormalize, raw_vector, unit_vector
from .models import ModelAdapter, block_input, get_adapter, module_device, module_output_tensor
from .types import BasesLike, BasisLike, IndexLike, LayersLike, MeanLike, VectorLike
from .weight_edit import OrthogonalizationRecord, orthogonalize

__all__ = [
    "ablate", "steer", "add", "orthogonalize", "orthonormalize", "OrthogonalizationRecord",
    "row_interventions", "RowInterventions", "FUSED_ARCHS",
]

#: Architectures whose decoder block ``fused=True`` ablation re-implements (pre-norm, plain residual adds).
FUSED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


# --------------------------------------------------------------------------------------------
# hook plumbing


def _tracking(x: torch.Tensor) -> bool:
    """True when autograd records operations on ``x`` (then hooks must not edit it in place)."""
    return torch.is_grad_enabled() and x.requires_grad


def _block_device(block: nn.Module, default: torch.device) -> torch.device:
    """Where ``block`` computes (accelerate's execution device for offloaded / device_map blocks)."""
    return module_device(block, default)


def _warn_unverified(ad: ModelAdapter, what: str) -> None:
    if ad.hook_issues:
        warnings.warn(f"{what}: {ad.arch}: " + "; ".join(ad.hook_issues), stacklevel=3)


@overload
def _to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...
@overload
def _to(t: None, like: torch.Tensor) -> None: ...
def _to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` on ``like``'s device (no copy when it already is there)."""
    if t is None or t.device == like.device:
        return t
    return t.to(device=like.device)


def _project(x: torch.Tensor, q: torch.Tensor | None, add: torch.Tensor | None = None,
             alpha: float = 1.0, copy: bool = False) -> torch.Tensor:
    """``x - q^T (q x) + alpha * add`` for ``x [..., d]``, ``q [k, d]`` orthonormal rows (or None).

    In place through ``ops.project_`` unless autograd tracks ``x`` (or ``copy``: edit a copy).
    Returns the edited tensor (``x`` itself when edited in place).
    """
    q, add = _to(q, x), _to(add, x)
    if _tracking(x):
        xf = x.float()
        y = xf
        if q is not None:
            qf = q.float()
            y = y - (xf @ qf.T) @ qf
        if add is not None:
            y = y + alpha * add.float()
        return y.to(x.dtype)
    if copy:
        x = x.clone()
    ops.project_(x, q, add, alpha)
    return x


def _projector(q: torch.Tensor | None, add: torch.Tensor | None = None, alpha: float = 1.0,
               copy: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> _project(x, q, add, alpha, copy)`` with its arguments bound."""
    return lambda x: _project(x, q, add, alpha, copy=copy)


def _replace_block_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


def _pre_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    """Forward pre-hook (``with_kwargs=True``) applying ``fn`` to the block input."""

    def hook(module, args, kwargs):
        x = block_input(args, kwargs)
        y = fn(x)
        if y is x:
            return None
        return _replace_block_input(args, kwargs, y)

    return hook


def _out_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    """Forward hook applying ``fn`` to a module's output tensor (or ``output[0]``)."""

    def hook(module, args, output):
        x = module_output_tensor(output)
        y = fn(x)
        if y is x:
            return None
        if isinstance(output, torch.Tensor):
            return y
        return type(output)((y, *output[1:])) if isinstance(output, tuple) else [y, *output[1:]]

    return hook


def _remove(handles: list) -> None:
    """Remove hook handles (all of them, even if one removal fails)."""
    err = None
    for h in reversed(handles):
        try:
            h.remove()
        except BaseException as exc:  # noqa: BLE001 - keep removing, re-raise the first at the end
            err = err or exc
    handles.clear()
    if err is not None:
        raise err


@contextmanager
def _hooks(register: Callable[[list], None]) -> Iterator[None]:
    handles: list = []
    try:
        register(handles)
        yield
    finally:
        _remove(handles)


def _layer_means(mean: MeanLike, layers: list[int], d_model: int) -> dict[int, torch.Tensor] | None:
    """``mean`` ([d], [len(layers), d] or {layer: [d]}) -> {layer: [d] float64}."""
    if mean is None:
        return None
    if isinstance(mean, Mapping):
        out = {}
        for layer in layers:
            if layer not in mean:
                raise ValueError(f"mean: no vector for layer {layer} (mapping has layers {sorted(mean)})")
            out[layer] = raw_vector(mean[layer], d_model, f"mean[{layer}]")
        return out
    t = mean.detach() if isinstance(mean, torch.Tensor) else torch.as_tensor(mean)
    if t.dim() == 1:
        v = raw_vector(t, d_model, "mean")
        return {layer: v for layer in layers}
    if t.dim() != 2 or t.shape[0] != len(layers):
        raise ValueError(
            f"mean must be [d], [len(layers), d] = [{len(layers)}, {d_model}] or a {{layer: [d]}} mapping; "
            f"got shape {tuple(t.shape)}"
        )
    m = as_float64_matrix(t, "mean")
    check_width(m, d_model, "mean")
    return {layer: m[j] for j, layer in enumerate(layers)}


def _check_alpha(alpha: Any) -> float:
    """A finite real ``alpha``: Python / NumPy numbers and 0-d (one-element) real tensors are accepted."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or alpha.dim() > 1 or alpha.is_complex() or alpha.dtype == torch.bool:
            raise ValueError(f"alpha must be a finite number or a 0-d real tensor, got a {alpha.dtype} tensor "
                             f"of shape {tuple(alpha.shape)}")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


def _check_rank(q: torch.Tensor, what: str = "basis") -> None:
    """The kernels project at most ``ops.MAX_K`` directions; the same limit holds with autograd."""
    if q.shape[0] > ops.MAX_K:
        raise ValueError(f"{what} has rank k={q.shape[0]}, above the maximum {ops.MAX_K} an intervention supports; "
                         f"use at most {ops.MAX_K} directions (orthogonalize() has no such limit)")


# --------------------------------------------------------------------------------------------
# ablate


@contextmanager
def ablate(model: nn.Module, basis: BasisLike, layers: LayersLike = None, mean: MeanLike = None, normalize: bool = True,
           fused: bool = False) -> Iterator[torch.Tensor]:
    """Project a direction / subspace out of the residual stream: ``x <- x - Q (Q^T x)``.

    Applied at each selected block's input and to every output the block adds to the residual
    stream (attention, MLP or mixture-of-experts block, any further writer the adapter found;
    after a post-sub-layer norm where there is one), so the direction is never written back:
    equivalent to :func:`orthogonalize` (weight edit) for all layers, but reversible, exact also
    where no weight edit is (Gemma 2/3 post-norms), and restricted to ``layers`` if given.

    Args:
        model: a supported transformers causal LM (or its :class:`ModelAdapter`).
        basis: ``[d_model]`` direction or ``[k, d_model]`` subspace, any dtype/device; orthonormalised
            with QR (see :func:`orthonormalize`).
        layers: None (all blocks), an int, or an iterable such as ``range(20, 28)``.
        mean: affine ablation target: ``[d_model]``, ``[len(layers), d_model]`` or ``{layer: [d_model]}``
            (e.g. the harmless mean at each layer). The block input's component along the
            subspace is set to that of ``mean`` (``x <- x - Q Q^T x + Q Q^T mean``) instead of zero;
            attention/MLP outputs still get a zero component, so the residual's component equals
            the mean's throughout the block.
        normalize: False demands an already orthonormal basis.
        fused: llama-family only (:data:`FUSED_ARCHS`): fuse the projection with the residual adds
            inside each block (``h <- P(h + attn)``, ``h <- P(h + mlp)``, one pass each) instead of
            three hooks per block. Same result up to rounding. Not with ``mean``.

    Yields:
        the orthonormal basis ``[k, d_model]`` float64.

    Nesting two ablations applies both projections in turn (outer first); that removes both
    subspaces only when they are orthogonal to each other. To remove several non-orthogonal
    directions pass them together as one ``[k, d_model]`` basis.
    """
    ad = get_adapter(model)
    q64 = orthonormalize(basis, normalize)
    check_width(q64, ad.d_model)
    _check_rank(q64)
    sel = ad.check_layers(layers)
    means = _layer_means(mean, sel, ad.d_model)
    for layer, m in (means or {}).items():
        check_castable(q64.T @ (q64 @ m), ad.dtype, f"mean[{layer}]'s component along the basis")
    if fused:
        if means is not None:
            raise ValueError("ablate(fused=True) does not support mean= (affine ablation); use fused=False")
        with _fused_ablation(ad, q64, sel):
            yield q64
        return

    def register(handles: list) -> None:
        for i in sel:
            block = ad.blocks[i]
            q = q64.to(device=_block_device(block, ad.device), dtype=torch.float32)
            shift = None if means is None else (q64.T @ (q64 @ means[i])).to(q)  # float32, like q
            pre, out = _projector(q, shift, copy=i == 0), _projector(q)
            handles.append(block.register_forward_pre_hook(_pre_hook(pre), with_kwargs=True))
            for mod in ad.writer_modules(i):  # attention, MLP / mixture of experts, any other writer
                handles.append(mod.register_forward_hook(_out_hook(out)))

    _warn_unverified(ad, "ablate")
    with _hooks(register):
        yield q64


# --------------------------------------------------------------------------------------------
# steer / add


@contextmanager
def steer(model: nn.Module, vector: VectorLike, layers: LayersLike, alpha: float = 1.0,
          norm_match: bool = False) -> Iterator[torch.Tensor]:
    """Add ``alpha * unit(vector)`` to the input of each block in ``layers``, at every position.

    Args:
        vector: ``[d_model]`` direction (normalised here; its length is ignored).
        layers: int or iterable of block indices (None = all blocks).
        alpha: scale; with ``norm_match=False`` the residual ``[batch, seq, d_model]`` gets exactly
            ``alpha * v / |v|`` added.
        norm_match: scale per token to the residual's own norm: token ``t`` gets
            ``alpha * |x_t| * v / |v|`` (norm taken before the addition), so ``alpha`` is a
            fraction of the residual norm and is comparable across layers and models.

    Yields:
        the unit vector ``[d_model]`` float64.
    """
    ad = get_adapter(model)
    v64 = unit_vector(vector, ad.d_model)
    sel = ad.check_layers(layers)
    alpha = _check_alpha(alpha)
    if not norm_match:
        check_castable(alpha * v64, ad.dtype, f"steer: alpha * unit vector (alpha={alpha:g})")

    def fn_for(v: torch.Tensor, copy: bool):
        if not norm_match:
            return _projector(None, v, alpha, copy)

        def fn(x):
            vv = _to(v, x).float()
            delta = (alpha * torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True) * vv).to(x.dtype)
            if _tracking(x) or copy:
                return x + delta
            return x.add_(delta)

        return fn

    def register(handles: list) -> None:
        for i in sel:
            block = ad.blocks[i]
            v = v64.to(device=_block_device(block, ad.device), dtype=torch.float32)
            handles.append(block.register_forward_pre_hook(_pre_hook(fn_for(v, i == 0)), with_kwargs=True))

    with _hooks(register):
        yield v64


@contextmanager
def add(model: nn.Module, vector: VectorLike, layers: LayersLike, alpha: float = 1.0) -> Iterator[None]:
    """Activation addition: add ``alpha * vector`` (raw, not normalised) ``[d_model]`` to the
    input of each block in ``layers`` at every position of ``[batch, seq, d_model]``."""
    ad = get_adapter(model)
    v64 = raw_vector(vector, ad.d_model)
    sel = ad.check_layers(layers)
    alpha = _check_alpha(alpha)
    check_castable(alpha * v64, ad.dtype, f"add: alpha * vector (alpha={alpha:g})")

    def register(handles: list) -> None:
        for i in sel:
            block = ad.blocks[i]
            v = v64.to(device=_block_device(block, ad.device), dtype=torch.float32)
            fn = _projector(None, v, alpha, copy=i == 0)
            handles.append(block.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))

    with _hooks(register):
        yield None


# --------------------------------------------------------------------------------------------
# fused in-layer ablation (llama family)


def _fused_block_forward(block: nn.Module, q: torch.Tensor):
    """A replacement for a llama-style decoder block's forward that projects while adding:
    ``h = P(x + attn(norm(x)))``, ``out = P(h + mlp(norm(h)))`` with ``P = I - Q^T Q``."""
    sig = inspect.signature(type(block).forward)

    def forward(*args, **kwargs):
        if len(args) != 1 or "hidden_states" in kwargs:
            bound = sig.bind(block, *args, **kwargs)
            bound.apply_defaults()
            kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
            kwargs.update(kwargs.pop("kwargs", {}) or {})
            x = kwargs.pop("hidden_states")
        else:
            x = args[0]
        attn = block.self_attn(hidden_states=block.input_layernorm(x), **kwargs)[0]
        h = _project_add(attn, q, x)
        mlp = block.mlp(block.post_attention_layernorm(h))
        return _project_add(mlp, q, h)

    return forward


def _project_add(o: torch.Tensor, q: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``P(residual + o)``, in place in ``o`` (a fresh sub-layer output) when autograd allows."""
    q = _to(q, o)
    if _tracking(o) or _tracking(residual):
        return _project(residual + o, q)
    ops.project_(o, q, None, 1.0, residual)
    return o


@contextmanager
def _fused_ablation(ad: ModelAdapter, q64: torch.Tensor, sel: list[int]) -> Iterator[None]:
    if ad.arch not in FUSED_ARCHS:
        raise ValueError(f"ablate(fused=True) supports {', '.join(FUSED_ARCHS)}, not {ad.arch}; use fused=False")
    patched: list[nn.Module] = []
    handles: list = []
    try:
        for i in sel:
            block = ad.blocks[i]
            if "forward" in block.__dict__:
                raise ValueError(
                    f"block {i} already has an instance-level forward (accelerate dispatch or another fused "
                    "ablation); ablate(fused=True) cannot patch it, use fused=False"
                )
        sel_set = set(sel)
        for i in sel:
            block = ad.blocks[i]
            q = q64.to(device=_block_device(block, ad.device), dtype=torch.float32)
            if i - 1 not in sel_set:  # first block of a window: its input comes from unablated layers
                fn = _projector(q, copy=i == 0)
                handles.append(block.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
            block.forward = _fused_block_forward(block, q)
            patched.append(block)
        yield
    finally:
        for block in patched:
            block.__dict__.pop("forward", None)
        _remove(handles)


# --------------------------------------------------------------------------------------------
# per-row interventions (batched direction selection)


class RowInterventions:
    """Different interventions for different batch rows, in one forward pass.

    Use as ``with row_interventions(model) as ri:`` and call :meth:`set` before each batch. For
    batch row ``b`` of the residual stream ``[batch, seq, d_model]``:

    - ablation: if ``ablate_index[b] >= 0``, project ``ablate_bases[ablate_index[b]]`` (``[k, d]``)
      out at every block input and every residual writer's output (all layers), as :func:`ablate`;
    - addition: if ``add_index[b] >= 0`` and ``add_layers[b] >= 0``, add
      ``alpha * add_vectors[add_index[b]]`` at every position of the input of block
      ``add_layers[b]`` (after that block input's ablation, if any).

    Rows with index -1 are untouched, so one batch can hold e.g. the unmodified baseline, each
    candidate direction ablated, and each candidate added at its own layer. The batch size of
    every forward must equal ``len(index)`` (generation with a KV cache keeps the batch size,
    so ``generate`` works). Without a :meth:`set` (or after :meth:`clear`) the hooks do nothing.
    """

    def __init__(self, model: nn.Module):
        self.adapter = get_adapter(model)
        self._handles: list = []
        self._active = False
        self.clear()

    # -- configuration -----------------------------------------------------------------------
    def clear(self) -> None:
        """Remove any per-row configuration (hooks stay registered but do nothing)."""
        self._bases: dict[torch.device, torch.Tensor] | None = None
        self._ablate_index: dict[torch.device, torch.Tensor] | None = None
        self._adds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batch: int | None = None

    def set(self, ablate_bases: BasesLike | None = None, ablate_index: IndexLike | None = None,
            add_vectors: BasisLike | None = None, add_index: IndexLike | None = None,
            add_layers: IndexLike | None = None, alpha: float = 1.0, normalize: bool = True) -> None:
        """Configure the per-row interventions for the next forward passes.

        Args:
            ablate_bases: ``[m, k, d_model]`` (or ``[m, d_model]`` for k = 1) candidate bases;
                each ``[k, d_model]`` slice is orthonormalised unless ``normalize=False``.
            ablate_index: ``[batch]`` int64 in ``[-1, m)``; -1 = no ablation for that row.
            add_vectors: ``[m2, d_model]`` vectors to add (raw, not normalised).
            add_index: ``[batch]`` int64 in ``[-1, m2)``; add_layers: ``[batch]`` int64 in
                ``[-1, n_layers)``; a row gets an addition only where both are >= 0.
            alpha: scale of the added vectors.
        """
        ad = self.adapter
        alpha = _check_alpha(alpha)
        self.clear()
        batch = None
        bases = index = None
        if (ablate_bases is None) != (ablate_index is None):
            raise ValueError("ablate_bases and ablate_index must be given together")
        if ablate_bases is not None:
            bases = _row_bases(ablate_bases, ad.d_model, normalize)
            index = _index(ablate_index, bases.shape[0], "ablate_index")
            batch = index.shape[0]
        given = [a is not None for a in (add_vectors, add_index, add_layers)]
        if any(given) and not all(given):
            raise ValueError("add_vectors, add_index and add_layers must be given together")
        adds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if add_vectors is not None and add_index is not None and add_layers is not None:  # all(given)
            vecs = as_float64_matrix(add_vectors, "add_vectors")
            if torch.as_tensor(add_vectors).dim() != 2:
                raise ValueError(f"add_vectors must have shape [m, d_model], "
                                 f"got {tuple(torch.as_tensor(add_vectors).shape)}")
            check_width(vecs, ad.d_model, "add_vectors")
            aidx = _index(add_index, vecs.shape[0], "add_index")
            alay = _index(add_layers, ad.n_layers, "add_layers")
            if aidx.shape != alay.shape:
                raise ValueError(f"add_index {tuple(aidx.shape)} and add_layers {tuple(alay.shape)} differ in length")
            if batch is not None and aidx.shape[0] != batch:
                raise ValueError(f"add_index has {aidx.shape[0]} rows but ablate_index has {batch}")
            batch = aidx.shape[0]
            check_castable(alpha * vecs, ad.dtype, "alpha * add_vectors")
            on = (aidx >= 0) & (alay >= 0)
            for layer in torch.unique(alay[on]).tolist():
                rows = torch.nonzero(on & (alay == layer)).flatten()
                adds[int(layer)] = (rows, alpha * vecs[aidx[rows]])
        dev0 = ad.device
        if bases is not None:
            assert index is not None, "ablate_index is parsed together with ablate_bases above"
            # Cast once per device holding blocks (model-parallel models may span several).
            devs = {_block_device(b, dev0) for b in ad.blocks}
            self._bases = {dv: bases.to(device=dv, dtype=torch.float32) for dv in devs}
            self._ablate_index = {dv: index.to(dv) for dv in devs}
        for layer, (rows, v) in adds.items():
            dv = _block_device(ad.blocks[layer], dev0)
            self._adds[layer] = (rows.to(dv), v.to(device=dv, dtype=ad.dtype))
        self._batch = batch

    # -- hooks -------------------------------------------------------------------------------
    def _check_batch(self, x: torch.Tensor) -> None:
        if x.shape[0] != self._batch:
            raise ValueError(
                f"row_interventions was set for batch size {self._batch} but the model ran on a batch of {x.shape[0]}"
            )

    def _ablate(self, x: torch.Tensor, copy: bool = False) -> torch.Tensor:
        if self._bases is None:
            return x
        self._check_batch(x)
        assert self._ablate_index is not None, "set() assigns _ablate_index together with _bases"
        bases, index = self._bases[x.device], self._ablate_index[x.device]
        bases = _to(bases, x)
        if _tracking(x):
            qb = bases[index.clamp(min=0)].float()  # [B, k, d]
            flat = x.float().reshape(x.shape[0], -1, x.shape[-1])  # [B, N, d]
            proj = torch.einsum("bnk,bkd->bnd", torch.einsum("bnd,bkd->bnk", flat, qb), qb)
            keep = (index >= 0).to(flat.dtype).reshape(-1, 1, 1)
            return (flat - keep * proj).reshape(x.shape).to(x.dtype)
        if copy:
            x = x.clone()
        ops.project_rows_(x, bases, index)
        return x

    def _pre(self, layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            y = self._ablate(x, copy=layer == 0)
            add = self._adds.get(layer)
            if add is None:
                return y
            self._check_batch(y)
            rows, vecs = add
            src = (vecs.to(device=y.device, dtype=y.dtype)
                   .reshape(vecs.shape[0], *([1] * (y.dim() - 2)), vecs.shape[-1])
                   .expand(-1, *y.shape[1:]))
            if _tracking(y) or (y is x and layer == 0):
                return y.index_add(0, rows, src)
            return y.index_add_(0, rows, src)

        return fn

    def __enter__(self) -> RowInterventions:
        if self._active:
            raise RuntimeError("this RowInterventions context is already active")
        ad = self.adapter
        try:
            for i in range(ad.n_layers):
                self._handles.append(ad.blocks[i].register_forward_pre_hook(_pre_hook(self._pre(i)), with_kwargs=True))
                for mod in ad.writer_modules(i):
                    self._handles.append(mod.register_forward_hook(_out_hook(self._ablate)))
        except BaseException:
            _remove(self._handles)
            raise
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        self.clear()
        _remove(self._handles)


def row_interventions(model: nn.Module) -> RowInterventions:
    """Context manager for per-row ablation / addition in one batch; see :class:`RowInterventions`.

    Example (direction selection: baseline, candidate j ablated, candidate j added at layer l)::

        with row_interventions(model) as ri:
            ri.set(ablate_bases=dirs[:, None, :], ablate_index=torch.tensor([-1, 0, 1, -1]),
                   add_vectors=dirs, add_index=torch.tensor([-1, -1, -1, 0]),
                   add_layers=torch.tensor([-1, -1, -1, 12]))
            logits = model(**batch).logits
    """
    return RowInterventions(model)


def _row_bases(bases: Any, d_model: int, normalize: bool) -> torch.Tensor:
    """``[m, k, d]`` or ``[m, d]`` candidate bases -> ``[m, k, d]`` float64 orthonormal."""
    t = bases.detach() if isinstance(bases, torch.Tensor) else torch.as_tensor(bases)
    if t.dim() == 2:
        t = t.unsqueeze(1)
    if t.dim() != 3:
        raise ValueError(f"ablate_bases must have shape [m, k, d_model] or [m, d_model], got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError("ablate_bases is empty (m = 0)")
    out = []
    for j in range(t.shape[0]):
        check_width(t[j], d_model, f"ablate_bases[{j}]")
        out.append(orthonormalize(t[j], normalize))
        _check_rank(out[-1], f"ablate_bases[{j}]")
    return torch.stack(out)


def _index(idx: Any, n: int, what: str) -> torch.Tensor:
    """Validate a ``[batch]`` integer index with values in ``[-1, n)``; returns int64 CPU."""
    t = idx.detach() if isinstance(idx, torch.Tensor) else torch.as_tensor(idx)
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what} must have shape [batch], got {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.int64)
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n):
        raise ValueError(f"{what} values must be in [-1, {n}), got range [{int(t.min())}, {int(t.max())}]")
    return t
