"""Weight orthogonalization: the permanent form of :func:`refusal_fast.ablate`.

Every weight that writes into the residual stream gets its output side projected,
``W <- W - Q^T Q W`` (``Q`` ``[k, d_model]`` orthonormal rows): the token embedding (and GPT-2's
position embedding), every attention output projection and every MLP down projection, every
expert's down projection (also experts stored as fused 3-D parameters) and shared expert, plus
their biases. The list comes from the model adapter (:meth:`ModelAdapter.residual_weights`),
which refuses, naming the module, when it cannot account for every such weight. No component
along ``Q`` can then enter the residual stream, which is what :func:`refusal_fast.ablate`
enforces with hooks at every layer; a short forward before and after the edit checks that every
writer lost its component. The edited model is an ordinary transformers model: ``save_pretrained``
it and load it in any server.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .basis import check_width, orthonormalize
from .models import UnsupportedModelError, get_adapter, is_quantized
from .types import BasisLike

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

__all__ = ["orthogonalize", "OrthogonalizationRecord"]

_CHUNK_ELEMS = 1 << 24  # rows are projected in chunks of about this many elements

# Per model, the records of orthogonalizations applied and not yet undone, oldest first (weak
# references: a discarded record still counts, as its edit stays in the weights for good).
_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref]] = weakref.WeakKeyDictionary()


@dataclass
class OrthogonalizationRecord:
    """What :func:`orthogonalize` changed, with the originals needed to undo it.

    Attributes:
        model: the edited model.
        basis: ``[k, d_model]`` float64 orthonormal basis that was projected out.
        edited: names of the edited parameters (as in ``model.named_parameters()``).
        untied: True if the LM head was untied from the embedding (a copy of the original
            embedding became ``lm_head.weight`` and ``config.tie_word_embeddings`` was set False).
        originals: ``{name: original tensor}`` (empty when ``keep_originals=False``).
    """

    model: nn.Module
    basis: torch.Tensor
    edited: list[str] = field(default_factory=list)
    untied: bool = False
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    _tie_state: dict[str, Any] = field(default_factory=dict, repr=False)
    _undone: bool = False

    def undo(self) -> None:
        """Restore the original weights bitwise (and re-tie the LM head if it was untied).

        Several orthogonalizations of one model are undone last-applied first: undoing an earlier
        one while a later one is still applied would silently revert the later edit too, so it is
        refused (RuntimeError). So is an undo after one of the edited parameters was replaced by
        another object (``load_state_dict(assign=True)``, assigning a new ``nn.Parameter``): the
        originals could no longer be written back into the model.
        """
        if self._undone:
            raise RuntimeError("this orthogonalization was already undone")
        missing = [n for n in self.edited if n not in self.originals]
        if missing:
            raise RuntimeError("cannot undo: orthogonalize(..., keep_originals=False) kept no originals")
        later = _later_records(self)
        if later:
            raise RuntimeError(
                f"cannot undo this orthogonalization out of order: {later} later orthogonalize() call(s) on the same "
                "model are still applied (their records undo last-applied first); undo them first"
            )
        replaced = [n for n in self.edited if _current_param(self.model, n) is not self._params[n]]
        if self.untied and get_adapter(self.model).lm_head.weight is not self._tie_state.get("lm_head"):
            replaced.append("the untied LM head weight")
        if replaced:
            raise RuntimeError(
                f"cannot undo: parameter(s) {replaced[:3]}{' ...' if len(replaced) > 3 else ''} were replaced by other "
                "objects after orthogonalize() (load_state_dict(assign=True), a new nn.Parameter, ...), so the "
                "originals cannot be written back into the model; they are in this record's .originals"
            )
        _restore(self)
        self._undone = True
        _forget(self)


def orthogonalize(model: nn.Module, basis: BasisLike, normalize: bool = True, untie: bool = True,
                  allow_inexact: bool = False, keep_originals: bool = True) -> OrthogonalizationRecord:
    """Permanently remove a direction / subspace from everything that writes to the residual stream.

    Edits in place ``W <- W - Q^T Q W`` on the output (residual) side of: the token embedding
    ``[vocab, d]`` (rows), GPT-2's position embedding, each attention output projection and each
    MLP down projection (``nn.Linear`` weight ``[d, in]``; GPT-2 ``Conv1D`` weight ``[in, d]``),
    each routed expert's down projection (fused ``[experts, d, in]`` or, transposed as in
    gpt-oss, ``[experts, in, d]``), shared experts, and their biases ``[d]`` / ``[experts, d]``.
    Math in float64 on the CPU, float32 elsewhere, rounded once to the parameter dtype. Logits
    then match those under ``ablate(model, basis)`` (all layers) up to that rounding. Quantized
    (bitsandbytes) and offloaded weights are refused: orthogonalize the full-precision model and
    quantize the saved result.

    Tied embeddings (GPT-2, Gemma2): the embedding matrix is also the unembedding, so editing it
    would also project the direction out of the *readout* (``logits = norm(h) (E - E Q^T Q)^T``),
    which ``ablate`` does not do. With ``untie=True`` (default) the LM head becomes a copy of the
    original embedding first (``config.tie_word_embeddings`` is set False, so ``save_pretrained``
    writes both matrices and a reload keeps them separate): the result equals ``ablate`` at the
    cost of one extra ``[vocab, d]`` matrix. With ``untie=False`` the weights stay tied (no extra
    memory) and the readout changes too.

    Args:
        model: a supported transformers causal LM.
        basis: ``[d_model]`` or ``[k, d_model]``, orthonormalised unless ``normalize=False``.
        untie: see above; ignored for untied models.
        allow_inexact: architectures with a norm between a sub-layer and the residual add (Gemma2)
            cannot be orthogonalized exactly (the norm re-creates the component); they raise
            ValueError unless this is True (then the projections before those norms are edited).
        keep_originals: keep copies of the edited tensors so :meth:`OrthogonalizationRecord.undo`
            works (costs their memory); False frees them after a successful edit.

    Returns:
        an :class:`OrthogonalizationRecord`. If an edit fails midway, everything edited so far
        is restored before the exception propagates.

    Raises:
        UnsupportedModelError: the adapter cannot account for every residual-writing weight (the
            message names the module and how to pass the weights), weights are quantized or
            offloaded, or the check after the edit finds a writer that still writes the direction.
    """
    ad = get_adapter(model)
    q = orthonormalize(basis, normalize)
    check_width(q, ad.d_model)
    if ad.has_post_sublayer_norms and not allow_inexact:
        raise ValueError(
            f"{ad.arch} normalises attention/MLP outputs before adding them to the residual stream, so weight "
            "orthogonalization cannot remove the direction exactly; use refusal_fast.ablate(...) instead, or pass "
            "allow_inexact=True to edit the projections anyway"
        )
    targets = _targets(ad, allow_inexact)
    names = {id(p): n for n, p in ad.model.named_parameters()}
    before = _writer_components(ad, q, skip_post_norms=True)
    rec = OrthogonalizationRecord(model=ad.model, basis=q)
    try:
        if ad.tied and untie:
            _untie(ad, rec)
        for param, side in targets:
            name = names.get(id(param))
            if name is None:
                raise UnsupportedModelError(f"{ad.arch}: a residual-writing weight is not a parameter of the model")
            if name in rec._params:  # shared parameter listed twice
                continue
            rec.originals[name] = param.detach().clone()
            rec._params[name] = param
            rec.edited.append(name)
            _edit(param, q, side)
        _verify_removed(ad, before, _writer_components(ad, q, skip_post_norms=True))
    except BaseException:
        _restore(rec)
        raise
    if not keep_originals:
        rec.originals.clear()
    _APPLIED.setdefault(ad.model, []).append(weakref.ref(rec))
    return rec


def _later_records(rec: OrthogonalizationRecord) -> int:
    """How many orthogonalizations of ``rec.model`` applied after ``rec`` are not undone."""
    stack = _APPLIED.get(rec.model, [])
    for i, ref in enumerate(stack):
        if ref() is rec:
            return len(stack) - 1 - i
    return 0


def _forget(rec: OrthogonalizationRecord) -> None:
    stack = _APPLIED.get(rec.model, [])
    stack[:] = [ref for ref in stack if ref() is not rec]


def _current_param(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _targets(ad, allow_inexact: bool = False) -> list[tuple[nn.Parameter, int]]:
    """(parameter, axis) pairs: every weight writing into the residual stream and its ``d_model``
    axis on the output side (see :meth:`ModelAdapter.residual_weights`).

    Raises:
        UnsupportedModelError: the adapter could not account for every residual-writing weight
            (naming the module), or a weight is quantized or offloaded.
    """
    weights = ad.residual_weights(allow_inexact=allow_inexact)
    _check_editable(ad, weights)
    return [(w.param, w.dim) for w in weights]


def _check_editable(ad, weights) -> None:
    """Refuse quantized (bitsandbytes int8 / packed 4-bit) and offloaded (meta) weights, naming one."""
    model = ad.model
    quantized = [w for w in weights if is_quantized(w.param)]
    if quantized or getattr(model, "is_quantized", False):
        example = quantized[0] if quantized else None
        what = (f"{example.name} is stored as {type(example.param).__name__} {example.param.dtype}"
                if example is not None else "the model was loaded with a quantization_config")
        raise UnsupportedModelError(
            f"orthogonalize edits weights in place, but {what}: quantized weights cannot be edited exactly. "
            "Load the full-precision checkpoint (the same model without quantization_config), orthogonalize it, "
            "save_pretrained, and quantize the saved model; or use refusal_fast.ablate on the quantized model"
        )
    offloaded = [w for w in weights if w.param.device.type == "meta"]
    if offloaded:
        raise UnsupportedModelError(
            f"orthogonalize edits weights in place, but {offloaded[0].name} is offloaded (on the meta device, loaded "
            "by accelerate only during the forward). Load the model without cpu/disk offload (it may be on the CPU), "
            "orthogonalize and save_pretrained; or use refusal_fast.ablate on the offloaded model"
        )


@torch.no_grad()
def _writer_components(ad, q64: torch.Tensor, skip_post_norms: bool) -> dict[str, float]:
    """Relative component ``|Q o| / |o|`` of the block-0 input and of every writer output on the
    adapter's probe tokens: ``{"embed": c, "layer 3 mlp": c, ...}``."""
    from .models import StopForward, block_input, module_output_tensor

    out: dict[str, float] = {}
    handles = []

    def comp(x: torch.Tensor) -> float:
        xf = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        q = q64.double()
        den = float(xf.norm())
        return float((xf @ q.T).norm()) / den if den > 0 else 0.0

    def pre(m, args, kwargs):
        out["embed"] = comp(block_input(args, kwargs))

    def stop(m, args):
        raise StopForward  # the vocabulary projection is not needed

    try:
        handles.append(ad.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(ad.lm_head.register_forward_pre_hook(stop))
        for i in range(ad.n_layers):
            for w, mod in zip(ad.writers(i), ad.writer_modules(i)):
                if skip_post_norms and w.is_post_norm:
                    continue
                key = f"layer {i} {w.path}"
                handles.append(mod.register_forward_hook(
                    lambda m, a, o, key=key: out.__setitem__(key, comp(module_output_tensor(o)))))
        g = torch.Generator().manual_seed(1)
        vocab = int(ad.embed.weight.shape[0])
        ids = torch.randint(0, max(1, min(vocab, 4096)), (1, 8), generator=g).to(ad.device)
        was_training = ad.model.training
        ad.model.eval()
        try:
            ad.model(input_ids=ids, use_cache=False)
        except StopForward:
            pass
        finally:
            ad.model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return out


def _verify_removed(ad, before: dict[str, float], after: dict[str, float]) -> None:
    """Every writer output lost (nearly) all of its component: else name the first that did not."""
    for key, b in before.items():
        a = after.get(key)
        if a is None or b < 1e-6:
            continue
        if a > 0.25 * b:
            raise UnsupportedModelError(
                f"{ad.arch}: after the weight edit, {key} still writes the direction into the residual stream "
                f"(relative component {a:.3g}, was {b:.3g}): some weight writing it was not found. Pass the weights "
                "explicitly (refusal_fast.ModelAdapter(model, writer_weights={...})) or use refusal_fast.ablate"
            )


def _edit_axis(side: str | int, param: torch.Tensor) -> int:
    if side == "rows":
        return -1
    if side == "cols":
        return 0
    return int(side) % max(1, param.dim())


@torch.no_grad()
def _edit(param: nn.Parameter, q64: torch.Tensor, side: str | int) -> None:
    """``param <- param - (param Q^T) Q`` along its axis ``side`` of length ``d_model`` (an int, or
    "rows" = last axis / "cols" = first axis), in chunks, float64 math on the CPU, float32 elsewhere."""
    w = param.data
    math_dtype = torch.float64 if w.device.type == "cpu" else torch.float32
    q = q64.to(device=w.device, dtype=math_dtype)
    if w.dim() == 1:
        views = [w.unsqueeze(0)]
    else:
        moved = w.movedim(_edit_axis(side, w), -1)  # [..., d] view of the parameter
        views = _leading_views(moved)
    for rows in views:
        step = max(1, _CHUNK_ELEMS // max(1, rows.shape[-1]))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step]
            c = chunk.to(math_dtype)
            c = c - (c @ q.T) @ q
            chunk.copy_(c)


def _leading_views(moved: torch.Tensor) -> list[torch.Tensor]:
    """``[a, b, ..., n, d]`` -> the ``[n, d]`` views over all leading indices."""
    if moved.dim() == 2:
        return [moved]
    return [v for i in range(moved.shape[0]) for v in _leading_views(moved[i])]


@torch.no_grad()
def _restore(rec: OrthogonalizationRecord) -> None:
    for name, orig in rec.originals.items():
        rec._params[name].data.copy_(orig)
    if rec.untied:
        ad = get_adapter(rec.model)
        ad.lm_head.weight = ad.embed.weight
        config = cast("PreTrainedConfig", rec.model.config)
        config.tie_word_embeddings = rec._tie_state["config"]
        if "all_tied_weights_keys" in rec._tie_state:
            rec.model.all_tied_weights_keys = rec._tie_state["all_tied_weights_keys"]
        rec.untied = False


def _untie(ad, rec: OrthogonalizationRecord) -> None:
    model = ad.model
    rec._tie_state["config"] = getattr(model.config, "tie_word_embeddings", True)
    if hasattr(model, "all_tied_weights_keys"):
        rec._tie_state["all_tied_weights_keys"] = model.all_tied_weights_keys
    w = ad.embed.weight
    rec.untied = True
    ad.lm_head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    rec._tie_state["lm_head"] = ad.lm_head.weight
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {
            k: v for k, v in model.all_tied_weights_keys.items() if not k.endswith("lm_head.weight")
        }
