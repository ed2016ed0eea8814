"""Model adapter: where the residual stream lives in a transformers causal LM.

Every other module reaches into a model only through :func:`get_adapter`. The adapter is found
automatically from the module structure and one tiny probe forward (8 tokens, no gradients):

- the decoder blocks (the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks), checked to
  be chained: block ``i + 1`` receives exactly what block ``i`` returned;
- the **writers** of each block: its sub-modules whose outputs are added to the residual stream.
  The probe finds them by *accounting*: ``block_output - block_input`` must equal a weighted sum
  of sub-module outputs (least squares in float64; Granite's ``residual_multiplier`` is such a
  weight). Attention, MLP, mixture-of-experts blocks, parallel attention + MLP (Cohere, Phi,
  GPT-NeoX), post-sub-layer norms (Gemma 2/3, OLMo 2) are all found this way;
- the token embedding (and learned position embeddings) whose sum, times a measured scale
  (``sqrt(d)`` for Gemma, ``embedding_multiplier`` for Granite), is the input of block 0;
- the final norm (the module receiving the last block's output) and the LM head;
- for weight orthogonalization, every parameter that writes into the residual stream and the
  axis of length ``d_model`` on its output side: a writer's output is traced to the linear layer
  producing it (``o_proj``, ``down_proj``, ``c_proj``, ``dense``, ...), to a per-token weighted
  sum of sub-module outputs (routed experts + gated shared experts), and to experts stored as
  fused 3-D parameters (transformers' ``use_experts_implementation`` layout, plain or
  transposed, with biases).

Whatever cannot be proven is recorded, not guessed: hooks (``ablate``, ``steer``, extraction)
still work from the block inputs and the writers found, while :func:`refusal_fast.orthogonalize`
refuses and names the module. Anything the search gets wrong or cannot find can be passed
explicitly, e.g. ``ModelAdapter(model, blocks="model.layers", writers={"attn": "self_attn",
"mlp": "mlp"})``; the adapter is then used by every function given that model.

Hook points, named as in TransformerLens:

- ``resid_pre`` of layer ``i``: the input of decoder block ``i`` (``hidden_states[i]``
  of a forward with ``output_hidden_states=True``), shape ``[batch, seq, d_model]``.
- ``attn_out`` / ``mlp_out`` of layer ``i``: the tensor the block adds to the residual
  stream after attention / after the MLP (further writers, if a block has any, are listed by
  :meth:`ModelAdapter.writers`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .types import LayersLike

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

__all__ = [
    "ModelAdapter", "UnsupportedModelError", "get_adapter", "SUPPORTED_ARCHS", "Writer", "ResidualWeight",
    "block_input", "module_output_tensor", "module_device", "is_quantized", "StopForward", "offloaded_parameters",
    "check_weights_loaded",
]


class UnsupportedModelError(ValueError):
    """The model's structure could not be found, or a requested operation cannot be done exactly on it."""


#: Architectures (``config.model_type``) built and tested in the test suite; the table in
#: docs/architectures.md is generated from the same list. Others go through the same automatic
#: adapter (see the module docstring).
SUPPORTED_ARCHS = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "phi", "gpt2", "gpt_neox", "olmo2", "olmoe", "granite", "cohere", "starcoder2", "stablelm", "smollm3",
    "gpt_oss", "deepseek_v3",
)

#: Explicit overrides by ``config.model_type``, for structures the search finds ambiguous. Each
#: entry holds :class:`ModelAdapter` keyword arguments. Empty for every tested architecture: the
#: automatic search finds them all; an entry here is the place for a model it gets wrong.
_OVERRIDES: dict[str, dict[str, Any]] = {}

_PROBE_TOKENS = 8
_ATTN_WORDS = ("attn", "attention", "mixer")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "moe", "expert", "fc")


@dataclass(frozen=True)
class Writer:
    """A module of a decoder block whose output is added to the residual stream.

    Attributes:
        path: module path relative to the block, e.g. ``"self_attn"`` or ``"post_feedforward_layernorm"``.
        kind: ``"attn"``, ``"mlp"`` or ``"other"``.
        scale: the block adds ``scale * output`` (1.0, or e.g. Granite's ``residual_multiplier``).
        sublayer: for a norm between a sub-layer and the residual add (Gemma 2), the path of the
            sub-layer it normalises; None when ``path`` itself is the sub-layer.
    """

    path: str
    kind: str
    scale: float = 1.0
    sublayer: str | None = None

    @property
    def is_post_norm(self) -> bool:
        return self.sublayer is not None


@dataclass(frozen=True)
class ResidualWeight:
    """One parameter whose output side writes into the residual stream.

    Attributes:
        name: as in ``model.named_parameters()``.
        param: the parameter.
        dim: its axis of length ``d_model`` (``0`` for an ``nn.Linear`` weight ``[d_model, in]``,
            ``-1`` for an embedding ``[vocab, d_model]``, GPT-2 ``Conv1D`` ``[in, d_model]`` and
            biases ``[d_model]``, ``1`` for fused experts ``[experts, d_model, in]``).
        layer: the block index, or None for embeddings.
        module: the writer it belongs to (block-relative path, or ``"embed"`` / ``"pos_embed"``).
    """

    name: str
    param: nn.Parameter
    dim: int
    layer: int | None
    module: str


@dataclass
class _Layout:
    """Everything the search found, as paths (no module references: cached per model)."""

    arch: str
    base: str
    blocks: str
    embed: str
    pos_embeds: tuple[str, ...]
    final_norm: str
    lm_head: str
    embed_scale: float
    writers: list[tuple[Writer, ...]]
    weights: list[tuple[tuple[str, int, str], ...] | None]  # per block: (param path, dim, writer path)
    weight_issues: list[str] = field(default_factory=list)
    hook_issues: list[str] = field(default_factory=list)


_LAYOUT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------
# small helpers


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual tensor ``[batch, seq, d_model]`` passed to a decoder block's forward."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise UnsupportedModelError("could not find hidden_states among a decoder block's inputs")


def module_output_tensor(output: Any) -> torch.Tensor:
    """The residual-write tensor in a module's output (the tensor itself or ``output[0]``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedModelError(f"cannot find the residual-write tensor in a module output "
                                f"of type {type(output).__name__}")


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """Device where ``module`` computes: accelerate's execution device for an offloaded /
    ``device_map`` module, else the device of its first parameter (``default`` if it has none)."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    for sub in module.modules():  # offloaded parameters: a sub-module's hook knows where they run
        dev = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    return default if default is not None else torch.device("cpu")


def _align_hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # accelerate's SequentialHook holds several


def offloaded_parameters(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """``{parameter name: loader}`` for the parameters accelerate offloaded (on the meta device, their
    values kept in an offload hook's weights map, e.g. ``device_map`` with ``"disk"``/``"cpu"`` offload).

    Each loader returns the real tensor (from memory or the memory-mapped offload folder).
    """
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for mname, mod in model.named_modules():
        for hook in _align_hooks(mod):
            wmap = getattr(hook, "weights_map", None)
            if wmap is None or not getattr(hook, "offload", False):
                continue
            for pname, p in mod.named_parameters(recurse=False):
                if p.device.type == "meta":
                    out[f"{mname}.{pname}" if mname else pname] = functools.partial(wmap.__getitem__, pname)
    return out


def check_weights_loaded(model: nn.Module) -> None:
    """Raise ValueError naming a parameter that is on the meta device without an offload hook
    (an ``init_empty_weights`` / ``device="meta"`` model whose weights were never loaded)."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not meta:
        return
    offloaded = offloaded_parameters(model)
    missing = [n for n in meta if n not in offloaded]
    if missing:
        raise ValueError(
            f"the model's parameter {missing[0]!r} is on the meta device: its weights were never loaded (an "
            "init_empty_weights / device='meta' model). Load the weights first (from_pretrained without "
            "device_map='meta', or to_empty() followed by load_state_dict)"
        )


def is_quantized(param: torch.Tensor) -> bool:
    """True for weights stored quantized (bitsandbytes 8-/4-bit, integer or packed storage)."""
    if type(param).__name__ in ("Int8Params", "Params4bit") or hasattr(param, "quant_state"):
        return True
    return not (param.dtype.is_floating_point or param.dtype.is_complex)


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    if not path:
        return obj
    for part in path.split("."):
        if isinstance(obj, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise AttributeError(part)
    return obj


def _resolve(root: nn.Module, path: str, what: str, arg: str, arch: str) -> Any:
    try:
        return _get_path(root, path)
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{type(root).__name__} ({arch}): could not find the {what} at '{path}' (missing attribute "
            f"'{exc.args[0]}'); pass its path explicitly: refusal_fast.ModelAdapter(model, {arg}=\"...\")"
        ) from None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _module_path(root: nn.Module, target: nn.Module) -> str | None:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def _has_matrix_params(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _tol(dtype: torch.dtype) -> float:
    """Relative tolerance of probe identities for activations of ``dtype``."""
    if dtype in (torch.float32, torch.float64):
        return 1e-5
    return max(1e-5, 3.0 * torch.finfo(dtype).eps)


# ------------------------------------------------------------------------------------------
# the adapter


class ModelAdapter:
    """Uniform view of a decoder-only causal LM's residual stream.

    ``get_adapter(model)`` builds one automatically; construct it yourself to override what the
    search finds (paths are relative to the causal LM; the adapter is then used by every
    refusal-fast function given ``model``)::

        rf.ModelAdapter(model, blocks="model.layers", final_norm="model.norm",
                        writers={"attn": "self_attn", "mlp": "mlp"})

    Args:
        model: a transformers causal LM (``...ForCausalLM``).
        blocks, embed, final_norm, lm_head: module paths (default: found automatically).
        pos_embed: learned position embedding path, ``""`` for none (default: found automatically).
        writers: the modules of each block whose outputs are added to the residual stream, as
            ``{"attn": path, "mlp": path, ...}`` or a list of paths, relative to a block.
        writer_weights: ``{block-relative parameter path: d_model axis}`` of every parameter
            writing into the residual stream (for :func:`orthogonalize` on a structure the
            automatic accounting cannot prove), e.g. ``{"mlp.experts.down_proj": 1}``.

    Attributes:
        model, arch (``config.model_type``), base_model (the decoder without the LM head),
        blocks (``nn.ModuleList``; block ``i``'s input is residual layer ``i``), embed,
        pos_embed (GPT-2's ``wpe`` or None), final_norm, lm_head, embed_scale (block 0's input is
        ``embed_scale * embed(ids)`` (+ position embeddings); ``sqrt(d)`` for Gemma),
        has_post_sublayer_norms (a norm sits between a sub-layer and the residual add, so weight
        orthogonalization cannot be exact), n_layers, d_model, weight_issues (why
        :func:`orthogonalize` would refuse; empty when every residual-writing weight is known),
        hook_issues (what the probe could not account for; hooks then act on block inputs and the
        writers found only).
    """

    def __init__(self, model: nn.Module, *, blocks: str | None = None, embed: str | None = None,
                 pos_embed: str | None = None, final_norm: str | None = None, lm_head: str | None = None,
                 writers: Mapping[str, str] | Sequence[str] | None = None,
                 writer_weights: Mapping[str, int] | None = None):
        if isinstance(model, ModelAdapter):
            raise TypeError("ModelAdapter(model): pass the model, not an adapter")
        overrides = dict(blocks=blocks, embed=embed, pos_embed=pos_embed, final_norm=final_norm, lm_head=lm_head,
                         writers=writers, writer_weights=writer_weights)
        layout = _discover(model, {k: v for k, v in overrides.items() if v is not None})
        self._init_from_layout(model, layout)
        _LAYOUT_CACHE[model] = layout

    @classmethod
    def _from_layout(cls, model: nn.Module, layout: _Layout) -> ModelAdapter:
        self = cls.__new__(cls)
        self._init_from_layout(model, layout)
        return self

    def _init_from_layout(self, model: nn.Module, layout: _Layout) -> None:
        arch = layout.arch
        self.model = model
        self.arch = arch
        self._layout = layout
        self.base_model = _resolve(model, layout.base, "base decoder model", "blocks", arch)
        self.blocks = _resolve(model, layout.blocks, "decoder blocks", "blocks", arch)
        self.embed = _resolve(model, layout.embed, "token embedding", "embed", arch)
        pos = [_resolve(model, p, "position embedding", "pos_embed", arch) for p in layout.pos_embeds]
        self.pos_embeds = pos
        self.pos_embed = pos[0] if pos else None
        self.final_norm = _resolve(model, layout.final_norm, "final norm", "final_norm", arch)
        self.lm_head = _resolve(model, layout.lm_head, "LM head", "lm_head", arch)
        self.embed_scale = layout.embed_scale
        self.n_layers = len(self.blocks)
        self.d_model = int(self.embed.weight.shape[-1])
        self.has_post_sublayer_norms = any(w.is_post_norm for ws in layout.writers for w in ws)
        self.weight_issues = list(layout.weight_issues)
        self.hook_issues = list(layout.hook_issues)

    # -- structure ---------------------------------------------------------------------------
    @property
    def tied(self) -> bool:
        """Whether ``lm_head.weight`` is the embedding matrix itself."""
        return getattr(self.lm_head, "weight", None) is self.embed.weight

    def _check_layer(self, i: int) -> int:
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(f"layer {i} out of range for a model with {self.n_layers} layers")
        return i % self.n_layers

    def writers(self, i: int) -> list[Writer]:
        """The :class:`Writer` s of block ``i`` (modules whose outputs are added to the residual)."""
        return list(self._layout.writers[self._check_layer(i)])

    def writer_modules(self, i: int) -> list[nn.Module]:
        """Modules whose output (or ``output[0]``) block ``i`` adds to the residual, ``[batch, seq, d_model]``."""
        block = self.blocks[self._check_layer(i)]
        return [_resolve(block, w.path, "residual writer", "writers", self.arch) for w in self.writers(i)]

    def _writer_of_kind(self, i: int, kind: str) -> Writer:
        for w in self.writers(i):
            if w.kind == kind:
                return w
        have = ", ".join(f"{w.path} ({w.kind})" for w in self.writers(i)) or "none"
        raise UnsupportedModelError(
            f"{self.arch}: block {i} has no {'attention' if kind == 'attn' else 'MLP'} output among its residual "
            f"writers ({have}); pass them explicitly: refusal_fast.ModelAdapter(model, writers={{'attn': ..., "
            "'mlp': ...}})"
        )

    def attn_out(self, i: int) -> nn.Module:
        """Module whose output (or ``output[0]``) is the attention write to the residual, ``[batch, seq, d_model]``."""
        i = self._check_layer(i)
        return _resolve(self.blocks[i], self._writer_of_kind(i, "attn").path, "attention output", "writers",
                        self.arch)

    def mlp_out(self, i: int) -> nn.Module:
        """Module whose output is the MLP (or mixture-of-experts) write to the residual, ``[batch, seq, d_model]``."""
        i = self._check_layer(i)
        return _resolve(self.blocks[i], self._writer_of_kind(i, "mlp").path, "MLP output", "writers", self.arch)

    def _single_projection(self, i: int, kind: str) -> nn.Module:
        i = self._check_layer(i)
        w = self._writer_of_kind(i, kind)
        sub = w.sublayer or w.path
        weights = self._layout.weights[i]
        mats = [] if weights is None else [p for p, _dim, wp in weights if wp == w.path and not p.endswith("bias")]
        if len(mats) != 1 or not mats[0].endswith(".weight"):
            raise UnsupportedModelError(
                f"{self.arch}: block {i}'s {kind} output '{sub}' is not written by a single linear layer "
                f"({', '.join(mats) or 'none found'}); use ModelAdapter.residual_weights()"
            )
        return _resolve(self.blocks[i], mats[0][: -len(".weight")], "output projection", "writer_weights", self.arch)

    def attn_out_proj(self, i: int) -> nn.Module:
        """Linear layer (``nn.Linear`` ``[d_model, in]`` or GPT-2 ``Conv1D`` ``[in, d_model]``) writing
        attention out."""
        return self._single_projection(i, "attn")

    def mlp_out_proj(self, i: int) -> nn.Module:
        """Linear layer writing the MLP output into the residual (see :meth:`attn_out_proj`); raises for
        mixture-of-experts blocks, whose weights :meth:`residual_weights` lists."""
        return self._single_projection(i, "mlp")

    def hook_points(self, i: int) -> dict[str, nn.Module]:
        """``{"resid_pre": block, "attn_out": module, "mlp_out": module}`` for layer ``i``; further
        writers (if any) as ``"writer.<path>"``."""
        i = self._check_layer(i)
        block = self.blocks[i]
        out: dict[str, nn.Module] = {"resid_pre": block}
        for w, mod in zip(self.writers(i), self.writer_modules(i)):
            key = f"{w.kind}_out" if w.kind in ("attn", "mlp") else f"writer.{w.path}"
            if key in out:
                key = f"writer.{w.path}"
            out[key] = mod
        return out

    def residual_weights(self, allow_inexact: bool = False) -> list[ResidualWeight]:
        """Every parameter writing into the residual stream with its ``d_model`` axis: embeddings first,
        then block by block. Post-sub-layer norms (Gemma 2) are not weights that can be edited
        exactly; with ``allow_inexact=True`` the projections before them are listed instead.

        Raises:
            UnsupportedModelError: some writer's weights could not be found (see :attr:`weight_issues`),
                or the model has post-sub-layer norms and ``allow_inexact`` is False.
        """
        if self.weight_issues:
            raise UnsupportedModelError(
                f"{self.arch}: cannot list every weight that writes into the residual stream: "
                + "; ".join(self.weight_issues)
                + ". Hooks (refusal_fast.ablate) still work; for a weight edit pass the weights explicitly: "
                "refusal_fast.ModelAdapter(model, writer_weights={'<block-relative parameter>': <d_model axis>, ...})"
            )
        if self.has_post_sublayer_norms and not allow_inexact:
            norms = sorted({w.path for ws in self._layout.writers for w in ws if w.is_post_norm})
            raise UnsupportedModelError(
                f"{self.arch}: norms between sub-layers and the residual add ({', '.join(norms)}) re-create any "
                "removed direction, so no weight edit removes it exactly"
            )
        names = {id(p): n for n, p in self.model.named_parameters()}
        out: list[ResidualWeight] = []

        def add(param, dim, layer, module):
            name = names.get(id(param))
            if name is None:
                raise UnsupportedModelError(f"{self.arch}: residual-writing weight of {module} is not a parameter "
                                            "of the model")
            out.append(ResidualWeight(name, param, dim, layer, module))

        add(self.embed.weight, -1, None, "embed")
        for j, pe in enumerate(self.pos_embeds):
            add(pe.weight, -1, None, "pos_embed" if j == 0 else f"pos_embed.{j}")
        for i, block in enumerate(self.blocks):
            for path, dim, writer in self._layout.weights[i] or ():
                try:
                    param = _get_path(block, path)
                except AttributeError:
                    raise UnsupportedModelError(
                        f"{self.arch}: block {i} has no parameter '{path}' (the model changed since its adapter was "
                        "built?)") from None
                add(param, dim, i, writer)
        for w in out:
            if w.param.dim() == 0 or w.param.shape[w.dim] != self.d_model:
                raise UnsupportedModelError(f"{self.arch}: residual-writing weight {w.name} of shape "
                                            f"{tuple(w.param.shape)} has no d_model={self.d_model} axis {w.dim}")
        return out

    def describe(self) -> str:
        """A few lines naming what was found (paths, writers of block 0, issues)."""
        ly = self._layout
        lines = [f"{self.arch}: {self.n_layers} blocks at '{ly.blocks}', d_model {self.d_model}",
                 f"  embed '{ly.embed}' x {self.embed_scale:g}" + (f", position {list(ly.pos_embeds)}"
                                                                   if ly.pos_embeds else "")
                 + f"; final norm '{ly.final_norm}'; LM head '{ly.lm_head}'" + (" (tied)" if self.tied else "")]
        for i in sorted({0, self.n_layers - 1}):
            ws = ", ".join(f"{w.path} [{w.kind}{'' if w.scale == 1 else f' x{w.scale:.3g}'}"
                           f"{', norm of ' + w.sublayer if w.sublayer else ''}]" for w in self.writers(i))
            lines.append(f"  block {i} writers: {ws or 'none'}")
            weights = ly.weights[i]
            if weights:
                lines.append(f"  block {i} weights: {', '.join(f'{p}[{d}]' for p, d, _ in weights)}")
        for issue in self.hook_issues + self.weight_issues:
            lines.append(f"  ! {issue}")
        return "\n".join(lines)

    # -- metadata ----------------------------------------------------------------------------
    @property
    def name_or_path(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    @property
    def config_hash(self) -> str:
        """Short sha256 of the model config (architecture-defining fields), for artifact metadata."""
        cfg = cast("PreTrainedConfig", self.model.config).to_dict()
        keys = sorted(k for k in cfg if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS)
        blob = json.dumps({k: cfg[k] for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        """Where the token embedding computes (accelerate's execution device for offloaded models)."""
        return module_device(self.embed, self.embed.weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def check_layers(self, layers: LayersLike, what: str = "layers") -> list[int]:
        """Validate a layer selection (None = all, int, or iterable of ints; negatives count from the end)."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, int):
            layers = [layers]
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not hasattr(layer, "__index__"):
                raise TypeError(f"{what} must be ints, got {layer!r}")
            layer = int(layer.__index__())
            if not -self.n_layers <= layer < self.n_layers:
                raise ValueError(f"{what}: layer {layer} out of range for a model with {self.n_layers} layers")
            out.append(layer % self.n_layers)
        if not out:
            raise ValueError(f"{what} is empty")
        return sorted(set(out))

    def __repr__(self) -> str:
        return f"ModelAdapter({self.describe()})"


# Config fields that do not change what the weights compute.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "torch_dtype", "dtype", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "quantization_config", "attn_implementation",
    "pad_token_id", "architectures", "name_or_path",
}


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The :class:`ModelAdapter` of ``model``: found automatically on first use (one probe forward)
    and cached per model object; an adapter built with explicit overrides is reused.

    Raises:
        UnsupportedModelError: no transformers config, or blocks / embedding / final norm / LM head
            could not be found (the message names the override to pass).
    """
    if isinstance(model, ModelAdapter):
        return model
    layout = _LAYOUT_CACHE.get(model)
    if layout is not None:
        try:
            ad = ModelAdapter._from_layout(model, layout)
            if ad.n_layers == len(layout.writers):
                return ad
        except UnsupportedModelError:
            pass  # the model changed: search again
        _LAYOUT_CACHE.pop(model, None)
    check_weights_loaded(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no transformers config with a model_type; "
            "refusal-fast needs a transformers causal LM"
        )
    return ModelAdapter(model, **_OVERRIDES.get(model_type, {}))


# ------------------------------------------------------------------------------------------
# discovery


def _discover(model: nn.Module, ov: dict[str, Any]) -> _Layout:
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformers config with a model_type; "
                                    "refusal-fast needs a transformers causal LM")
    arch = str(arch)
    # -- blocks, base --------------------------------------------------------------------------
    if "blocks" in ov:
        blocks_path = ov["blocks"]
        blocks = _resolve(model, blocks_path, "decoder blocks", "blocks", arch)
    else:
        blocks_path, blocks = _find_blocks(model, arch)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UnsupportedModelError(f"{arch}: decoder blocks at '{blocks_path}' are not a non-empty ModuleList; pass "
                                    "their path: refusal_fast.ModelAdapter(model, blocks=\"model.layers\")")
    base = getattr(model, "base_model", None)
    base_path = _module_path(model, base) if isinstance(base, nn.Module) else None
    if base_path is None or (base_path and not blocks_path.startswith(base_path + ".")):
        base_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    base = _get_path(model, base_path)
    # -- embedding, LM head --------------------------------------------------------------------
    if "embed" in ov:
        embed_path = ov["embed"]
        embed = _resolve(model, embed_path, "token embedding", "embed", arch)
    else:
        get_in = getattr(model, "get_input_embeddings", None)
        embed = get_in() if callable(get_in) else None
        embed_path = _module_path(model, embed) if isinstance(embed, nn.Module) else None
        if embed_path is None:
            raise UnsupportedModelError(f"{arch}: could not find the token embedding (get_input_embeddings()); "
                                        "pass it: refusal_fast.ModelAdapter(model, embed=\"model.embed_tokens\")")
    if getattr(embed, "weight", None) is None or embed.weight.dim() != 2:
        raise UnsupportedModelError(f"{arch}: token embedding at '{embed_path}' has no [vocab, d_model] weight")
    d_model = int(embed.weight.shape[1])
    if "lm_head" in ov:
        head_path = ov["lm_head"]
        head = _resolve(model, head_path, "LM head", "lm_head", arch)
    else:
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        head_path = _module_path(model, head) if isinstance(head, nn.Module) else None
        if head_path is None:
            raise UnsupportedModelError(
                f"{arch}: could not find the LM head (get_output_embeddings() is None: is this a ...ForCausalLM?); "
                "pass it: refusal_fast.ModelAdapter(model, lm_head=\"lm_head\")")
    # -- the probe -----------------------------------------------------------------------------
    signatures = [tuple((n, type(m).__name__) for n, m in b.named_modules()) for b in blocks]
    deep = {signatures.index(s) for s in set(signatures)}  # first block of each structure
    if "pos_embed" in ov:
        pos_paths = [ov["pos_embed"]] if ov["pos_embed"] else []
        pos_mods = [_resolve(model, p, "position embedding", "pos_embed", arch) for p in pos_paths]
    else:
        pos_mods = [m for m in base.modules() if isinstance(m, nn.Embedding) and m is not embed
                    and m.weight.dim() == 2 and m.weight.shape[1] == d_model
                    and not any(m is x for b in blocks for x in b.modules())]
        pos_paths = [_module_path(model, m) or "" for m in pos_mods]
    probe = _Probe(model, base, blocks, embed, pos_mods, deep, head)
    probe.run()
    hook_issues: list[str] = []
    weight_issues: list[str] = []
    dtype = probe.dtype
    tol = _tol(dtype)
    # chained blocks
    for i in range(len(blocks) - 1):
        out_i, in_next = probe.block_out[i], probe.block_in[i + 1]
        if out_i is None or in_next is None or out_i.shape != in_next.shape or not torch.equal(out_i, in_next):
            hook_issues.append(f"block {i + 1}'s input is not block {i}'s output (something runs between blocks)")
            break
    # -- embedding scale and position embeddings -----------------------------------------------
    embed_scale, used_pos = _fit_embedding(probe, embed, pos_mods, tol, weight_issues)
    pos_paths = [p for p, m in zip(pos_paths, pos_mods) if any(m is u for u in used_pos)] if "pos_embed" not in ov \
        else pos_paths
    # -- final norm ----------------------------------------------------------------------------
    if "final_norm" in ov:
        norm_path = ov["final_norm"]
        _resolve(model, norm_path, "final norm", "final_norm", arch)
    else:
        norm_path = _find_final_norm(model, base, blocks, head, probe, arch)
    # -- writers -------------------------------------------------------------------------------
    given = ov.get("writers")
    writers: list[tuple[Writer, ...]] = []
    for i, block in enumerate(blocks):
        ws, issue = _find_writers(block, i, probe, given, tol, arch)
        writers.append(ws)
        if issue:
            hook_issues.append(issue)
    weight_issues.extend(f"(hooks) {h}" for h in hook_issues)
    # -- weights -------------------------------------------------------------------------------
    weights: list[tuple[tuple[str, int, str], ...] | None] = [None] * len(blocks)
    if ov.get("writer_weights") is not None:
        spec = _check_writer_weights(ov["writer_weights"], blocks, writers[0], d_model, arch)
        weights = [spec] * len(blocks)
    else:
        # blocks of one structure with the same writers share the weights traced on the first of them
        def key_of(i: int) -> tuple:
            return signatures[i], tuple((w.path, w.sublayer) for w in writers[i])

        per_sig: dict[tuple, tuple[tuple[str, int, str], ...] | None] = {}
        for i in sorted(deep):
            try:
                per_sig[key_of(i)] = _writer_weights(blocks[i], writers[i], probe, d_model, tol)
            except _Unprovable as exc:
                per_sig[key_of(i)] = None
                weight_issues.append(f"block {i}: {exc}")
        for i in range(len(blocks)):
            key = key_of(i)
            if key not in per_sig:  # same structure as a probed block but other writers: probe this one
                try:
                    per_sig[key] = _writer_weights(blocks[i], writers[i], probe, d_model, tol)
                except _Unprovable as exc:
                    per_sig[key] = None
                    weight_issues.append(f"block {i}: {exc}")
            weights[i] = per_sig[key]
    return _Layout(
        arch=arch, base=base_path, blocks=blocks_path, embed=embed_path, pos_embeds=tuple(pos_paths),
        final_norm=norm_path, lm_head=head_path, embed_scale=embed_scale, writers=writers, weights=weights,
        weight_issues=_dedupe(weight_issues), hook_issues=_dedupe(hook_issues),
    )


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _find_blocks(model: nn.Module, arch: str) -> tuple[str, nn.ModuleList]:
    n = getattr(_text_config(model), "num_hidden_layers", None)
    cands = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and _has_matrix_params(mod[0]):
            if len({type(m) for m in mod}) == 1 or len(mod) == n:
                cands.append((name, mod))
    # outermost lists only (a block's experts ModuleList is not a block list)
    cands = [(nm, m) for nm, m in cands if not any(nm.startswith(o + ".") for o, _ in cands if o != nm)]
    if n is not None:
        exact = [(nm, m) for nm, m in cands if len(m) == n]
        if exact:
            cands = exact
    if len(cands) == 1:
        return cands[0]
    found = ", ".join(f"'{nm}' ({len(m)})" for nm, m in cands) or "none"
    raise UnsupportedModelError(
        f"{arch}: could not tell which module list holds the decoder blocks (candidates: {found}; "
        f"config.num_hidden_layers={n}); pass their path: refusal_fast.ModelAdapter(model, blocks=\"model.layers\")"
    )


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by whoever registered the hook)."""


def _stop_at_head(module, args):
    raise StopForward


def _capture(x: torch.Tensor | None) -> torch.Tensor | None:
    """A CPU copy of a probe tensor (so tensors of a model spread over devices compare directly)."""
    if x is None or x.device.type == "meta":
        return None
    return x.detach().to("cpu", copy=True)


@dataclass
class _Call:
    inp: torch.Tensor | None
    out: torch.Tensor | None = None


class _Probe:
    """One forward on a few token ids recording block inputs/outputs and sub-module outputs."""

    def __init__(self, model, base, blocks, embed, pos_mods, deep: set[int], head: nn.Module | None = None):
        self.model, self.base, self.blocks, self.embed, self.pos_mods, self.deep = model, base, blocks, embed, \
            pos_mods, deep
        self.head = head  # the forward stops at its input (the vocabulary projection is not needed)
        self.block_in: list[torch.Tensor | None] = [None] * len(blocks)
        self.block_out: list[torch.Tensor | None] = [None] * len(blocks)
        self.calls: dict[int, list[_Call]] = {}
        self.ids: torch.Tensor | None = None
        self.dtype = embed.weight.dtype

    def _first_tensor(self, args, kwargs) -> torch.Tensor | None:
        for a in args:
            if isinstance(a, torch.Tensor):
                return a
        t = kwargs.get("hidden_states")
        if isinstance(t, torch.Tensor):
            return t
        return None

    def _watch(self, mod: nn.Module, handles: list) -> None:
        if id(mod) in self.calls:
            return
        self.calls[id(mod)] = []

        def pre(m, args, kwargs):
            x = self._first_tensor(args, kwargs)
            self.calls[id(m)].append(_Call(_capture(x)))

        def post(m, args, kwargs, output):
            try:
                y = module_output_tensor(output)
            except UnsupportedModelError:
                y = None
            if self.calls[id(m)]:
                self.calls[id(m)][-1].out = _capture(y)

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))

    def run(self) -> None:
        model = self.model
        handles: list = []
        in_blocks = {id(m) for b in self.blocks for m in b.modules()}
        try:
            for i, block in enumerate(self.blocks):
                def pre(m, args, kwargs, i=i):
                    self.block_in[i] = _capture(block_input(args, kwargs))

                def post(m, args, output, i=i):
                    self.block_out[i] = _capture(module_output_tensor(output))

                handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(block.register_forward_hook(post))
                subs = block.modules() if i in self.deep else block.children()
                for sub in subs:
                    if sub is not block:
                        self._watch(sub, handles)
            for mod in model.modules():  # everything outside the blocks (embeddings, final norm)
                if id(mod) not in in_blocks and mod is not model:
                    self._watch(mod, handles)
            if self.head is not None:
                handles.append(self.head.register_forward_pre_hook(_stop_at_head))
            vocab = int(self.embed.weight.shape[0])
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, max(1, min(vocab, 4096)), (1, _PROBE_TOKENS), generator=g)
            self.ids = ids
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    model(input_ids=ids.to(module_device(self.embed, self.embed.weight.device)), use_cache=False)
            except StopForward:
                pass
            except Exception as exc:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: the structure probe (one forward of {_PROBE_TOKENS} tokens) failed: "
                    f"{type(exc).__name__}: {exc}") from exc
            finally:
                model.train(was_training)
        finally:
            for h in handles:
                h.remove()
        missing = [i for i, x in enumerate(self.block_in) if x is None]
        if missing:
            raise UnsupportedModelError(f"{type(model).__name__}: the probe forward never ran blocks {missing[:5]}")

    def outputs(self, mod: nn.Module) -> list[torch.Tensor | None]:
        return [c.out for c in self.calls.get(id(mod), [])]

    def inputs(self, mod: nn.Module) -> list[torch.Tensor | None]:
        return [c.inp for c in self.calls.get(id(mod), [])]


def _lstsq_fit(cols: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least squares ``target ~ sum_j c_j cols[j]`` in float64; returns (c [m], relative residual)."""
    t = target.reshape(-1).double()
    if not cols:
        return torch.zeros(0, dtype=torch.float64), float(t.norm())
    a = torch.stack([c.reshape(-1).double() for c in cols], dim=1)
    sol = torch.linalg.lstsq(a, t[:, None], driver="gelsd").solution[:, 0]
    return sol, float((a @ sol - t).norm())


def _fit_embedding(probe: _Probe, embed: nn.Module, pos_mods: list[nn.Module], tol: float,
                   issues: list[str]) -> tuple[float, list[nn.Module]]:
    assert probe.block_in[0] is not None and probe.ids is not None, "run() checked that every block ran"
    x0 = probe.block_in[0].double()
    weight = embed.weight
    assert isinstance(weight, torch.Tensor)
    e_out = probe.outputs(embed)
    if not e_out or e_out[0] is None:
        issues.append("the token embedding never ran in the probe")
        return 1.0, []
    e = e_out[0].double()
    rows = weight.detach()[probe.ids.to(weight.device)].double().cpu() if weight.device.type != "meta" else None
    ratio = 1.0
    if rows is not None and rows.shape == e.shape:
        c, res = _lstsq_fit([rows], e)
        if res > tol * max(float(e.norm()), 1e-30):
            issues.append("the token embedding's output is not a multiple of its weight rows")
        ratio = float(c[0])
    pos_outs = []
    for m in pos_mods:
        outs = probe.outputs(m)
        if outs and outs[0] is not None and outs[0].shape[-1] == x0.shape[-1]:
            pos_outs.append((m, outs[0].double().expand_as(x0)))
    cols = [e.reshape(x0.shape)] + [p for _, p in pos_outs]
    c, res = _lstsq_fit(cols, x0)
    used = [m for (m, _), cj in zip(pos_outs, c[1:].tolist()) if abs(cj) > 1e-3]
    if res > tol * max(float(x0.norm()), 1e-30):
        issues.append("the input of block 0 is not a multiple of the token embedding plus position embeddings "
                      "(e.g. an embedding norm or projection sits between them), so editing the embedding cannot "
                      "remove a direction from it")
    return float(f"{float(c[0]) * ratio:.7g}"), used  # measured: 1, sqrt(d), a multiplier


def _find_final_norm(model, base, blocks, head, probe: _Probe, arch: str) -> str:
    last = probe.block_out[-1]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    best = None
    for name, mod in model.named_modules():
        if id(mod) in in_blocks or mod is model or mod is base or mod is blocks or mod is head:
            continue
        ins = probe.inputs(mod)
        if ins and ins[0] is not None and last is not None and ins[0].shape == last.shape \
                and torch.equal(ins[0], last):
            key = (_n_params(mod) > 0, -name.count("."))
            if best is None or key > best[0]:
                best = (key, name)
    if best is None:
        raise UnsupportedModelError(
            f"{arch}: could not find the final norm (no module receives the last block's output); pass it: "
            "refusal_fast.ModelAdapter(model, final_norm=\"model.norm\")")
    return best[1]


def _kind(block: nn.Module, path: str) -> str:
    low = path.lower()
    if any(w in low for w in _ATTN_WORDS):
        return "attn"
    if any(w in low for w in _MLP_WORDS):
        return "mlp"
    mod = _get_path(block, path)
    names = " ".join(type(m).__name__.lower() for m in mod.modules())
    if "attention" in names:
        return "attn"
    if "mlp" in names or "expert" in names:
        return "mlp"
    return "other"


def _find_writers(block: nn.Module, i: int, probe: _Probe, given, tol: float,
                  arch: str) -> tuple[tuple[Writer, ...], str | None]:
    """Writers of block ``i`` by accounting: ``out - in = sum_j c_j * child_j(out)``."""
    x_in, x_out = probe.block_in[i], probe.block_out[i]
    if x_in is None or x_out is None:
        raise UnsupportedModelError(f"{arch}: block {i} did not run in the probe forward")
    delta = (x_out.double() - x_in.double())
    scale = float(x_out.double().norm()) + float(x_in.double().norm())
    children = list(block.named_children())
    if given is not None:
        items = list(given.items()) if isinstance(given, Mapping) else [(None, p) for p in given]
        named = []
        for kind, path in items:
            mod = _resolve(block, path, f"residual writer of block {i}", "writers", arch)
            named.append((path, mod, kind))
        cand = [(path, mod, j, out) for path, mod, _k in named for j, out in enumerate(probe.outputs(mod))
                if out is not None]
        kinds = {path: (k or _kind(block, path)) for path, _m, k in named}
    else:
        cand = []
        for name, mod in children:
            for j, out in enumerate(probe.outputs(mod)):
                if out is not None and out.shape == x_in.shape:
                    cand.append((name, mod, j, out))
        kinds = {}
    # identical outputs (an eval-mode dropout returns its input): keep the module with parameters
    uniq: list[tuple[str, nn.Module, int, torch.Tensor]] = []
    for c in cand:
        dup = next((k for k, u in enumerate(uniq) if u[3].shape == c[3].shape and torch.equal(u[3], c[3])), None)
        if dup is None:
            uniq.append(c)
        elif _n_params(c[1]) > _n_params(uniq[dup][1]):
            uniq[dup] = c
    cols = [u[3].reshape(x_in.shape) for u in uniq]
    coef, res = _lstsq_fit(cols, delta)
    keep = list(range(len(uniq)))
    if given is None:  # backward elimination of sub-modules that do not take part
        while True:
            if not keep:
                break
            order = sorted(keep, key=lambda k: abs(float(coef[keep.index(k)])) * float(cols[k].double().norm()))
            dropped = False
            for k in order:
                trial = [x for x in keep if x != k]
                c2, r2 = _lstsq_fit([cols[x] for x in trial], delta)
                if r2 <= tol * scale:
                    keep, coef, res, dropped = trial, c2, r2, True
                    break
            if not dropped:
                break
    ok = res <= tol * scale
    chosen = [(uniq[k], float(coef[n])) for n, k in enumerate(keep)]
    # a module called several times must have all its calls chosen (hooks act on every call)
    by_mod: dict[str, list[float]] = {}
    for (name, _mod, _j, _o), cf in chosen:
        by_mod.setdefault(name, []).append(cf)
    issue = None
    writers = []
    for name, cfs in by_mod.items():
        mod = _get_path(block, name)
        n_calls = len(probe.outputs(mod))
        if n_calls != len(cfs) or max(cfs) - min(cfs) > 1e-3 * max(abs(x) for x in cfs):
            issue = f"block {i}: '{name}' is called {n_calls} times but only some of its outputs are added to the " \
                    "residual stream; hooks on it would change the others"
            continue
        writers.append(_classify_writer(block, name, cfs[0], probe, kinds.get(name), tol))
    if not ok:
        missing = f"{res / max(float(delta.norm()), 1e-30):.1%} of block {i}'s residual update"
        issue = (f"{missing} is not a sum of its sub-modules' outputs (found: "
                 f"{', '.join(w.path for w in writers) or 'none'}); hooks act on the block inputs and these only. "
                 "Pass the writers explicitly: refusal_fast.ModelAdapter(model, writers={'attn': ..., 'mlp': ...})")
    position = {name: n for n, (name, _m) in enumerate(children)}
    writers.sort(key=lambda w: position.get(w.path.split(".")[0], len(position)))
    return tuple(writers), issue


def _classify_writer(block: nn.Module, path: str, scale: float, probe: _Probe, kind: str | None,
                     tol: float) -> Writer:
    mod = _get_path(block, path)
    source = _source_sublayer(block, mod, probe) if not _has_matrix_params(mod) else None
    k = kind or _kind(block, source or path)
    # a norm (1-D weights) between a sub-layer and the add is a post-sub-layer norm; a parameter-free
    # map (an eval-mode dropout) is transparent and its sub-layer's weights write the residual
    post_norm = source if source is not None and _n_params(mod) > 0 else None
    # the scale as measured on the probe (to the activations' precision): 1, or e.g. Granite's 0.22
    scale = 1.0 if abs(scale - 1.0) < max(1e-4, tol) else float(f"{scale:.{3 if tol > 1e-4 else 5}g}")
    return Writer(path=path, kind=k, scale=scale, sublayer=post_norm)


def _source_sublayer(block: nn.Module, mod: nn.Module, probe: _Probe) -> str | None:
    """The sibling of ``mod`` in ``block`` whose output ``mod`` receives as input (None if none)."""
    ins = probe.inputs(mod)
    x = ins[0] if ins else None
    if x is None:
        return None
    for name, child in block.named_children():
        if child is not mod and any(o is not None and o.shape == x.shape and torch.equal(o, x)
                                    for o in probe.outputs(child)):
            return name
    return None


class _Unprovable(Exception):
    """The weights writing a module's output could not be identified."""


def _is_fused_experts(mod: nn.Module) -> bool:
    p = getattr(mod, "down_proj", None)
    return isinstance(p, nn.Parameter) and p.dim() == 3


def _writer_weights(block: nn.Module, writers: tuple[Writer, ...], probe: _Probe, d_model: int,
                    tol: float) -> tuple[tuple[str, int, str], ...]:
    out: list[tuple[str, int, str]] = []
    for w in writers:
        src = w.sublayer if w.sublayer is not None else w.path
        mod = _get_path(block, src)
        if not _has_matrix_params(mod):
            # parameter-free writer (e.g. a dropout on a sub-layer output): trace to the sub-layer
            src2 = _source_sublayer(block, mod, probe)
            if src2 is None:
                raise _Unprovable(f"'{w.path}' has no weights and its input is no sub-layer's output")
            src, mod = src2, _get_path(block, src2)
        for p, dim in _module_weights(mod, src, probe, d_model, tol, depth=0):
            out.append((p, dim, w.path))
    return tuple(out)


def _linear_weights(mod: nn.Module, path: str, d_model: int) -> list[tuple[str, int]] | None:
    if isinstance(mod, nn.Linear) or (hasattr(mod, "weight") and hasattr(mod, "in_features")
                                      and getattr(mod, "out_features", None) == d_model):
        out = [(_join(path, "weight"), 0)]
    elif type(mod).__name__ == "Conv1D":
        out = [(_join(path, "weight"), -1)]
    else:
        return None
    if getattr(mod, "bias", None) is not None:
        out.append((_join(path, "bias"), -1))
    return out


def _module_weights(mod: nn.Module, path: str, probe: _Probe, d_model: int, tol: float,
                    depth: int) -> list[tuple[str, int]]:
    """Parameters (block-relative path, d_model axis) that write the output of ``mod``."""
    lin = _linear_weights(mod, path, d_model)
    if lin is not None:
        return lin
    if _is_fused_experts(mod):
        return _fused_expert_weights(mod, path, d_model)
    if depth > 6:
        raise _Unprovable(f"'{path}': output traced too deep")
    outs = [o for o in probe.outputs(mod) if o is not None]
    if not outs:
        raise _Unprovable(f"'{path}' did not run in the probe (a block of this structure must run to be traced)")
    y = outs[0]
    if y.shape[-1] != d_model:
        raise _Unprovable(f"'{path}' output has width {y.shape[-1]}, not d_model={d_model}")
    y2 = y.reshape(-1, d_model)
    kids = list(mod.named_children())
    # rule 1: a sub-module produced exactly this output (attention's o_proj, an MLP's down_proj)
    equal = [(n, c) for n, c in kids if any(o is not None and o.numel() == y.numel() and
                                             torch.equal(o.reshape(-1, d_model), y2) for o in probe.outputs(c))]
    if equal:
        with_params = [(n, c) for n, c in equal if _n_params(c) > 0]
        if with_params:
            n, c = max(with_params, key=lambda nc: _n_params(nc[1]))
            return _module_weights(c, _join(path, n), probe, d_model, tol, depth + 1)
        # a parameter-free child (dropout) returned it: trace its input among the siblings
        n, c = equal[0]
        x = probe.inputs(c)[0]
        for n2, c2 in kids:
            if c2 is not c and x is not None and any(o is not None and o.numel() == x.numel()
                                                     and torch.equal(o.reshape(x.shape), x)
                                                     for o in probe.outputs(c2)):
                return _module_weights(c2, _join(path, n2), probe, d_model, tol, depth + 1)
    # rule 2: a per-token weighted sum of sub-module outputs (routed experts + gated shared experts)
    cand = []
    for n, c in kids:
        for o in probe.outputs(c):
            if o is not None and o.shape[-1] == d_model and o.numel() == y.numel():
                cand.append((n, c, o.reshape(-1, d_model).double()))
                break
    if cand:
        a = torch.stack([o for _, _, o in cand], dim=-1)  # [N, d, m]
        t = y2.double()[:, :, None]
        sol = torch.linalg.lstsq(a, t, driver="gelsd").solution  # [N, m, 1]
        res = float((a @ sol - t).norm())
        scale = float(t.norm())
        if res <= tol * max(scale, 1e-30) * 10:
            contrib = [float((sol[:, k:k + 1] * a[:, :, k:k + 1].transpose(1, 2)).norm()) for k in range(len(cand))]
            used = [k for k in range(len(cand)) if contrib[k] > tol * max(scale, 1e-30)]
            if used:
                out: list[tuple[str, int]] = []
                for k in used:
                    n, c, _ = cand[k]
                    out.extend(_module_weights(c, _join(path, n), probe, d_model, tol, depth + 1))
                return out
    raise _Unprovable(
        f"the output of '{path}' ({type(mod).__name__}) is neither one sub-module's output nor a per-token weighted "
        "sum of sub-module outputs, so the weights writing it are unknown")


def _fused_expert_weights(mod: nn.Module, path: str, d_model: int) -> list[tuple[str, int]]:
    """Experts stored as 3-D parameters (transformers' ``use_experts_implementation`` layout)."""
    if not hasattr(mod, "is_transposed"):
        raise _Unprovable(f"'{path}' ({type(mod).__name__}) stores experts as 3-D parameters without transformers' "
                          "experts layout attributes (is_transposed, has_bias), so their output axis is unknown")
    if getattr(mod, "has_post_expert_norm", False):
        raise _Unprovable(f"'{path}' normalises each expert's output, so no weight edit removes a direction exactly")
    w = mod.down_proj
    assert isinstance(w, torch.Tensor)
    dim = 2 if mod.is_transposed else 1  # [E, in, d] (gpt-oss) or [E, d, in]
    if w.shape[dim] != d_model:
        raise _Unprovable(f"'{path}.down_proj' of shape {tuple(w.shape)} has no d_model={d_model} axis {dim}")
    out = [(_join(path, "down_proj"), dim)]
    bias = getattr(mod, "down_proj_bias", None)
    if isinstance(bias, nn.Parameter):
        if bias.shape[-1] != d_model:
            raise _Unprovable(f"'{path}.down_proj_bias' of shape {tuple(bias.shape)} has no d_model axis")
        out.append((_join(path, "down_proj_bias"), -1))
    elif getattr(mod, "has_bias", False):
        raise _Unprovable(f"'{path}' has expert biases but no down_proj_bias parameter")
    return out


def _check_writer_weights(spec: Mapping[str, int], blocks, writers: tuple[Writer, ...], d_model: int,
                          arch: str) -> tuple[tuple[str, int, str], ...]:
    if not isinstance(spec, Mapping) or not spec:
        raise TypeError("writer_weights must be a non-empty {block-relative parameter path: d_model axis} mapping")
    out = []
    for path, dim in spec.items():
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"writer_weights[{path!r}] must be an int axis, got {dim!r}")
        for i, b in enumerate(blocks):
            try:
                p = _get_path(b, path)
            except AttributeError:
                raise UnsupportedModelError(f"{arch}: writer_weights: block {i} has no parameter '{path}'") from None
            if not isinstance(p, torch.Tensor) or not -p.dim() <= dim < p.dim() or p.shape[dim] != d_model:
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise UnsupportedModelError(f"{arch}: writer_weights: '{path}' of shape {shape} has no d_model="
                                            f"{d_model} axis {dim}")
        owner = next((w.path for w in writers if path.startswith((w.sublayer or w.path) + ".")),
                     path.rsplit(".", 1)[0])
        out.append((path, dim, owner))
    return tuple(out)
