"""Model identity: which model an artifact was computed from, and the check that it is this one.

The configuration hash (:attr:`ModelAdapter.config_hash`) tells architectures and sizes apart but
not two checkpoints of one configuration (a base model and its fine-tune, the demo model and
``demo-base``). :func:`weights_fingerprint` adds the weights themselves, cheaply:

- for every parameter (``named_parameters()``, sorted by name; ``_orig_mod.`` prefixes of
  ``torch.compile`` removed) a fixed, seeded sample of ``SAMPLES_PER_TENSOR`` element positions
  (all elements of smaller tensors) is drawn with splitmix64 seeded by the parameter's name and
  shape, so the positions depend on nothing else (not on torch's RNG or version);
- the sampled elements are gathered **on the parameter's device** and cross to the host in one
  transfer per device (a few hundred bytes per tensor: milliseconds even for an 8B model), are
  converted to float32 and **rounded to bfloat16**, and are hashed with the names and shapes
  (sha256, first 32 hex digits).

dtype: because values are rounded to bfloat16 before hashing, a float32 model and its bfloat16
copy (``.to(torch.bfloat16)`` or ``from_pretrained(dtype=torch.bfloat16)``, both round to nearest
even) have the same fingerprint, and so does a float32 model upcast from bfloat16 weights. A
float16 copy of float32 weights generally does **not** match (rounding to float16 first and then
to bfloat16 moves some values to the other bfloat16 neighbour); the dtype is recorded separately
(``"dtype"`` in :func:`model_identity`) and named in mismatch errors. Identical on every device,
and across ``save_pretrained`` / ``from_pretrained``.

What it cannot see: a change confined to a few elements that the sample misses (e.g. one edited
row of a large matrix) leaves the fingerprint unchanged. Edits of whole tensors (fine-tuning,
orthogonalization, a refusal patch, LoRA merges) change it.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import check_weights_loaded, offloaded_parameters

__all__ = [
    "weights_fingerprint", "model_identity", "check_identity", "ModelMismatchError",
    "FINGERPRINT_METHOD", "SAMPLES_PER_TENSOR",
]

SAMPLES_PER_TENSOR = 256
FINGERPRINT_METHOD = f"sampled{SAMPLES_PER_TENSOR}-bf16-sha256-v1"

_STRUCTURAL = ("arch", "n_layers", "d_model")  # must always agree: the artifact cannot fit otherwise
_TRANSFERABLE = ("config_hash", "weights_fingerprint")  # may differ with allow_other_weights=True
_M64 = (1 << 64) - 1


class ModelMismatchError(ValueError):
    """An artifact was computed from another model than the one it is used with."""


def _splitmix64(seed: int, n: int) -> np.ndarray:
    """``n`` splitmix64 outputs (uint64) of the stream seeded with ``seed``."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _M64) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=8192)
def _sample_positions(name: str, shape: tuple[int, ...], numel: int, device: str) -> torch.Tensor:
    """Flat element positions sampled from a parameter ``[numel]`` (int64, on ``device``; cached)."""
    if numel <= SAMPLES_PER_TENSOR:
        return torch.arange(numel, dtype=torch.int64, device=device)
    seed = int.from_bytes(hashlib.sha256(f"{name}|{list(shape)}".encode()).digest()[:8], "little")
    pos = (_splitmix64(seed, SAMPLES_PER_TENSOR) % np.uint64(numel)).astype(np.int64)
    return torch.from_numpy(pos).to(device)


def _module(model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)  # a ModelAdapter
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a torch nn.Module (a transformers model), got {type(model).__name__}")


@torch.no_grad()
def weights_fingerprint(model: Any) -> str:
    """A short, stable hash of a model's weights (32 hex digits); see the module docstring.

    Args:
        model: an ``nn.Module`` (or a :class:`~refusal_fast.models.ModelAdapter`) whose weights are loaded.

    Raises:
        ValueError: a parameter is on the meta device (the weights were never loaded).
    """
    module = _module(model)
    params = sorted(((n.replace("_orig_mod.", ""), p) for n, p in module.named_parameters()), key=lambda x: x[0])
    samples: list[torch.Tensor] = []
    by_device: dict[torch.device, list[int]] = {}
    offloaded = offloaded_parameters(module) if any(p.is_meta for _, p in params) else {}
    for name, param in params:
        p: torch.Tensor = param
        if p.is_meta:
            load = offloaded.get(name)
            if load is None:
                check_weights_loaded(module)  # raises, naming the parameter
                raise AssertionError(name)  # unreachable: check_weights_loaded raised
            p = load()  # accelerate-offloaded weight (device_map with cpu/disk offload)
        flat = p.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        idx = _sample_positions(name, tuple(p.shape), flat.numel(), str(flat.device))
        by_device.setdefault(flat.device, []).append(len(samples))
        samples.append(flat.index_select(0, idx).to(torch.float32))  # gathered where the weights live
    host: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    for ids in by_device.values():  # one transfer per device
        parts = torch.cat([samples[i] for i in ids]).to("cpu").split([samples[i].numel() for i in ids])
        for i, part in zip(ids, parts):
            host[i] = part
    vals = torch.cat(host).to(torch.bfloat16) if host else torch.empty(0, dtype=torch.bfloat16)
    vals = torch.where(torch.isnan(vals), torch.full_like(vals, float("nan")), vals)  # one NaN bit pattern
    h = hashlib.sha256(FINGERPRINT_METHOD.encode())
    h.update(json.dumps([[name, list(p.shape)] for name, p in params]).encode())
    h.update(vals.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def model_identity(model: Any) -> dict[str, Any]:
    """What artifacts record about the model they come from.

    Returns:
        ``{"name_or_path", "arch", "config_hash", "weights_fingerprint", "fingerprint_method",
        "n_layers", "d_model", "dtype"}``.
    """
    from .models import get_adapter

    ad = get_adapter(model)
    return {
        "name_or_path": ad.name_or_path, "arch": ad.arch, "config_hash": ad.config_hash,
        "weights_fingerprint": weights_fingerprint(ad.model), "fingerprint_method": FINGERPRINT_METHOD,
        "n_layers": ad.n_layers, "d_model": ad.d_model, "dtype": str(ad.dtype).replace("torch.", ""),
    }


def check_identity(recorded: Mapping[str, Any] | None, model: Any, *, what: str = "this artifact was computed from",
                   allow_other_weights: bool = False, hint: str | None = None) -> dict[str, Any] | None:
    """Raise :class:`ModelMismatchError` unless ``model`` is the model ``recorded`` describes.

    Fields absent from ``recorded`` are not checked. ``arch``, ``n_layers`` and ``d_model`` must
    always agree. ``config_hash`` and ``weights_fingerprint`` must agree unless
    ``allow_other_weights=True`` (a deliberate transfer, e.g. a base model's direction applied to
    its fine-tune).

    Args:
        recorded: the artifact's model record (:func:`model_identity` at the time it was written).
        model: the model (or an identity dict from :func:`model_identity`).
        what: start of the error message, e.g. ``"these means were extracted from"``.
        hint: what the user should do, ending the message (default: use the matching model, or
            ``allow_other_weights=True``).

    Returns:
        None when the models agree; with ``allow_other_weights`` and a difference, the transfer
        record ``{"allow_other_weights": True, "differs": [...], "source_model": ..., "target_model": ...}``
        for the caller to store in its metadata.
    """
    have = dict(model) if isinstance(model, Mapping) else model_identity(model)
    rec = dict(recorded or {})
    differs = []
    for key in _STRUCTURAL + _TRANSFERABLE:
        if rec.get(key) is None or have.get(key) is None:
            continue
        if key == "weights_fingerprint" and rec.get("fingerprint_method", FINGERPRINT_METHOD) != have.get(
                "fingerprint_method", FINGERPRINT_METHOD):
            continue  # fingerprints of different methods are not comparable
        if rec[key] != have[key]:
            differs.append(key)
    if not differs:
        return None
    structural = [k for k in differs if k in _STRUCTURAL]
    if allow_other_weights and not structural:
        return {"allow_other_weights": True, "differs": differs, "source_model": rec, "target_model": have}
    detail = ", ".join(f"{k} ({rec[k]!r} vs {have[k]!r})" for k in differs)
    msg = (f"{what} model {rec.get('name_or_path', '?')!r}, but the given model {have.get('name_or_path', '?')!r} "
           f"differs in {detail}")
    if structural:
        msg += "; it cannot be used with this model"
    else:
        if differs == ["weights_fingerprint"]:
            msg += " (same configuration, different weights: another checkpoint, a fine-tune or edited weights"
            dtypes = {str(rec.get("dtype")), str(have.get("dtype"))}
            if "float16" in dtypes and len(dtypes) > 1:
                msg += "; note that a float16 copy fingerprints differently from float32 / bfloat16 weights"
            msg += ")"
    if hint is not None:
        msg += f"; {hint}"
    elif not structural:
        msg += ("; use the model it came from, or pass allow_other_weights=True (CLI: --allow-other-weights) "
                "to use it deliberately with another model of the same architecture and size")
    raise ModelMismatchError(msg)
