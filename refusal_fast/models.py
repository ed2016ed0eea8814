"""Model adapter: where the residual stream lives in a transformers causal LM.

Every other module reaches into a model only through :func:`get_adapter`, so supporting
a new architecture means adding one entry to ``_LAYOUTS``.

Hook points, named as in TransformerLens:

- ``resid_pre`` of layer ``i``: the input of decoder block ``i`` (``hidden_states[i]``
  of a forward with ``output_hidden_states=True``), shape ``[batch, seq, d_model]``.
- ``attn_out`` / ``mlp_out`` of layer ``i``: the tensor the block adds to the residual
  stream after attention / after the MLP.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .types import LayersLike

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

__all__ = ["ModelAdapter", "UnsupportedModelError", "get_adapter", "SUPPORTED_ARCHS"]


class UnsupportedModelError(ValueError):
    """The model's architecture is not supported, or a module it needs could not be found."""


@dataclass(frozen=True)
class _Layout:
    """Attribute paths for one architecture family (relative to the causal-LM wrapper)."""

    base: str  # base decoder model
    blocks: str  # relative to base
    embed: str  # relative to base
    final_norm: str  # relative to base
    attn_out: str  # relative to a block: module whose output is added to the residual
    mlp_out: str
    attn_out_proj: str  # relative to a block: weight that writes attention into the residual
    mlp_out_proj: str
    pos_embed: str | None = None  # relative to base
    post_sublayer_norms: bool = False


_LLAMA_LIKE = _Layout(
    base="model", blocks="layers", embed="embed_tokens", final_norm="norm",
    attn_out="self_attn", mlp_out="mlp", attn_out_proj="self_attn.o_proj", mlp_out_proj="mlp.down_proj",
)

_LAYOUTS: dict[str, _Layout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _Layout(
        base="model", blocks="layers", embed="embed_tokens", final_norm="norm",
        attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
        attn_out_proj="self_attn.o_proj", mlp_out_proj="mlp.down_proj", post_sublayer_norms=True,
    ),
    "gpt2": _Layout(
        base="transformer", blocks="h", embed="wte", final_norm="ln_f",
        attn_out="attn", mlp_out="mlp", attn_out_proj="attn.c_proj", mlp_out_proj="mlp.c_proj",
        pos_embed="wpe",
    ),
}
SUPPORTED_ARCHS = tuple(_LAYOUTS)


def _get_path(root: nn.Module, path: str, what: str, arch: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModelError(
                f"{type(root).__name__} ({arch}): could not find the {what} at '{path}' "
                f"(missing attribute '{part}'); the model does not match refusal-fast's {arch} layout"
            )
        obj = getattr(obj, part)
    return obj


@dataclass
class ModelAdapter:
    """Uniform view of a decoder-only causal LM's residual stream.

    Attributes:
        model: the causal LM (``...ForCausalLM``).
        arch: architecture key, e.g. ``"llama"`` or ``"gpt2"``.
        base_model: the decoder without the LM head (``model.model`` / ``model.transformer``).
        blocks: the decoder blocks; block ``i``'s input is residual layer ``i``.
        embed: token embedding; ``pos_embed`` the learned position embedding (GPT-2) or None.
        final_norm: norm before the LM head; ``lm_head`` the unembedding.
        tied: whether ``lm_head.weight`` is the embedding matrix itself.
        embed_scale: factor the model multiplies token embeddings by (``sqrt(d)`` for Gemma2).
        has_post_sublayer_norms: True when a norm sits between a sub-layer and the residual
            add (Gemma2); weight orthogonalization is then not exact.
        n_layers, d_model: number of blocks and residual width.
    """

    model: nn.Module
    arch: str
    base_model: nn.Module
    blocks: nn.ModuleList
    embed: nn.Embedding
    pos_embed: nn.Embedding | None
    final_norm: nn.Module
    lm_head: nn.Module
    tied: bool
    embed_scale: float
    has_post_sublayer_norms: bool
    n_layers: int
    d_model: int
    _layout: _Layout

    def _block_attr(self, i: int, path: str, what: str) -> nn.Module:
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(f"layer {i} out of range for a model with {self.n_layers} layers")
        return _get_path(self.blocks[i], path, what, self.arch)

    def attn_out(self, i: int) -> nn.Module:
        """Module whose output (or ``output[0]``) is the attention write to the residual, ``[batch, seq, d_model]``."""
        return self._block_attr(i, self._layout.attn_out, "attention output")

    def mlp_out(self, i: int) -> nn.Module:
        """Module whose output is the MLP write to the residual, ``[batch, seq, d_model]``."""
        return self._block_attr(i, self._layout.mlp_out, "MLP output")

    def attn_out_proj(self, i: int) -> nn.Module:
        """Linear layer (``nn.Linear`` ``[d_model, in]`` or GPT-2 ``Conv1D`` ``[in, d_model]``) writing
        attention out."""
        return self._block_attr(i, self._layout.attn_out_proj, "attention output projection")

    def mlp_out_proj(self, i: int) -> nn.Module:
        """Linear layer writing the MLP output into the residual (see :meth:`attn_out_proj`)."""
        return self._block_attr(i, self._layout.mlp_out_proj, "MLP output projection")

    def hook_points(self, i: int) -> dict[str, nn.Module]:
        """``{"resid_pre": block, "attn_out": module, "mlp_out": module}`` for layer ``i``."""
        return {"resid_pre": self.blocks[i], "attn_out": self.attn_out(i), "mlp_out": self.mlp_out(i)}

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
        return self.embed.weight.device

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


# Config fields that do not change what the weights compute.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "torch_dtype", "dtype", "use_cache", "output_hidden_states",
    "output_attentions", "return_dict", "quantization_config", "attn_implementation",
    "pad_token_id", "architectures", "name_or_path",
}


def _arch_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no transformers config with a model_type; "
            "refusal-fast needs a transformers causal LM"
        )
    if model_type not in _LAYOUTS:
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}' ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    return model_type


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Find blocks, residual hook points, norms, embeddings and LM head of ``model``.

    Args:
        model: a transformers causal LM of a supported architecture
            (llama, mistral, qwen2, qwen3, phi3, gemma2, gpt2).

    Raises:
        UnsupportedModelError: unknown architecture, or a module the layout needs is missing.
    """
    if isinstance(model, ModelAdapter):
        return model
    arch = _arch_of(model)
    layout = _LAYOUTS[arch]
    base = _get_path(model, layout.base, "base decoder model", arch)
    blocks = _get_path(base, layout.blocks, "decoder blocks", arch)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(f"{arch}: decoder blocks at '{layout.blocks}' are not a non-empty ModuleList")
    embed = _get_path(base, layout.embed, "token embedding", arch)
    pos_embed = _get_path(base, layout.pos_embed, "position embedding", arch) if layout.pos_embed else None
    final_norm = _get_path(base, layout.final_norm, "final norm", arch)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        raise UnsupportedModelError(f"{arch}: could not find the LM head at 'lm_head'")
    d_model = int(embed.weight.shape[1])
    embed_scale = float(getattr(embed, "scalar_embed_scale", 1.0))
    adapter = ModelAdapter(
        model=model, arch=arch, base_model=base, blocks=blocks, embed=embed, pos_embed=pos_embed,
        final_norm=final_norm, lm_head=lm_head, tied=lm_head.weight is embed.weight,
        embed_scale=embed_scale, has_post_sublayer_norms=layout.post_sublayer_norms,
        n_layers=len(blocks), d_model=d_model, _layout=layout,
    )
    for i in (0, len(blocks) - 1):  # fail now, not inside a hook
        adapter.attn_out(i), adapter.mlp_out(i), adapter.attn_out_proj(i), adapter.mlp_out_proj(i)
    return adapter


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual tensor ``[batch, seq, d_model]`` passed to a decoder block's forward."""
    if args:
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

