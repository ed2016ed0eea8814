"""``Means``: per-group residual-stream sums and counts, with save / load / merge.

The state is exact sums, not averages: ``sums`` ``[n_layers, n_groups, n_positions, d_model]``
float64 plus integer ``counts`` ``[n_groups]`` (and optionally second-moment sums
``[n_groups, n_positions, d_model, d_model]`` per chosen layer). Means are derived on demand,
so merging two partial extractions is exact bookkeeping: sums add, counts add.

Artifacts are safetensors files written by :func:`refusal_fast.artifacts.save_tensors`: the header
holds the metadata (the model's identity with its weights fingerprint, template, system prompt,
positions, layers, counts, prompt-set hashes, library version) and a sha256 of every tensor,
verified on load; a human-readable ``.json`` copy is written beside it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .artifacts import ArtifactError, library_version, load_tensors, save_tensors
from .fingerprint import check_identity

__all__ = ["Means", "UnknownKeyError", "prompt_set_hash", "library_version"]

FORMAT = "refusal_fast.means"
#: 2: tensors checksummed in the header (refusal_fast.artifacts); 1 (no checksums) is no longer read.
FORMAT_VERSION = 2
_MOD = 1 << 256

# Metadata fields two states must agree on to be merged (dotted paths into the metadata); the
# model itself is compared by refusal_fast.fingerprint.check_identity.
_COMPAT_FIELDS = ("template.sha256", "system_prompt", "positions", "layers", "second_moment_layers")


def prompt_set_hash(prompts: Iterable[str]) -> str:
    """Order-independent multiset hash of prompts: sum of their sha256 digests mod 2**256 (hex).

    Additive, so the hash of two merged prompt sets is :func:`combine_hashes` of theirs and a
    merged or resumed or sharded extraction carries the same hash as a single run.
    """
    total = 0
    for p in prompts:
        total = (total + int.from_bytes(hashlib.sha256(p.encode("utf-8")).digest(), "big")) % _MOD
    return f"{total:064x}"


def combine_hashes(a: str, b: str) -> str:
    """Multiset hash of the union (with multiplicity) of two prompt sets."""
    return f"{(int(a, 16) + int(b, 16)) % _MOD:064x}"


class UnknownKeyError(KeyError, ValueError):
    """A group or layer that is not in a :class:`Means` (both a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _get(meta: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = meta
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


class Means:
    """Per-group mean residual activations at chosen layers and (negative) token positions.

    Args:
        sums: ``[n_layers, n_groups, n_positions, d_model]`` float64 sums over each group's prompts.
        counts: ``[n_groups]`` number of prompts per group.
        groups: group names, in the order of the ``sums`` group axis.
        layers: layer indices (residual at the input of block ``l``), order of the layer axis.
        positions: negative token offsets from the end of the prompt, order of the position axis.
        metadata: JSON-serialisable provenance (see :meth:`save`).
        second_moments: optional ``{layer: [n_groups, n_positions, d_model, d_model]}`` float64
            sums of outer products ``x xᵀ``.
    """

    def __init__(
        self,
        sums: torch.Tensor,
        counts: Sequence[int] | torch.Tensor,
        groups: Sequence[str],
        layers: Sequence[int],
        positions: Sequence[int],
        metadata: Mapping[str, Any] | None = None,
        second_moments: Mapping[int, torch.Tensor] | None = None,
    ):
        groups = [str(g) for g in groups]
        if len(set(groups)) != len(groups):
            raise ValueError(f"duplicate group names: {groups}")
        counts = [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
        layers = [int(x) for x in layers]
        positions = [int(p) for p in positions]
        if sums.dim() != 4:
            raise ValueError(f"sums must be [n_layers, n_groups, n_positions, d_model], got shape {tuple(sums.shape)}")
        expect = (len(layers), len(groups), len(positions))
        if tuple(sums.shape[:3]) != expect:
            raise ValueError(f"sums shape {tuple(sums.shape)} does not match (layers, groups, positions) = {expect}")
        if len(counts) != len(groups):
            raise ValueError(f"{len(counts)} counts for {len(groups)} groups")
        if any(c < 0 for c in counts):
            raise ValueError(f"negative counts: {counts}")
        self._sums = sums.detach().to("cpu", torch.float64).contiguous()
        self._counts = counts
        self._groups = groups
        self._layers = layers
        self._positions = positions
        d = self._sums.shape[-1]
        self._second: dict[int, torch.Tensor] = {}
        for layer, t in (second_moments or {}).items():
            layer = int(layer)
            if layer not in layers:
                raise ValueError(f"second moments given for layer {layer}, which is not among layers {layers}")
            shape = (len(groups), len(positions), d, d)
            if tuple(t.shape) != shape:
                raise ValueError(f"second moments of layer {layer}: shape {tuple(t.shape)}, expected {shape}")
            self._second[layer] = t.detach().to("cpu", torch.float64).contiguous()
        self.metadata: dict[str, Any] = json.loads(json.dumps(dict(metadata or {})))
        self.metadata.update(self._derived_metadata())
        #: Run statistics of the extraction that produced this object (not saved).
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ accessors
    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    @property
    def positions(self) -> list[int]:
        return list(self._positions)

    @property
    def d_model(self) -> int:
        return int(self._sums.shape[-1])

    @property
    def second_moment_layers(self) -> list[int]:
        return sorted(self._second)

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the sums and second moments (independent of the number of prompts)."""
        return self._sums.nbytes + sum(t.nbytes for t in self._second.values())

    def _gi(self, group: str) -> int:
        if not isinstance(group, str):
            raise TypeError(f"group must be a str, got {type(group).__name__}")
        try:
            return self._groups.index(group)
        except ValueError:
            raise UnknownKeyError(f"unknown group {group!r}; groups are {self._groups}") from None

    def _li(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if layer not in self._layers:
            raise UnknownKeyError(f"layer {layer} was not extracted; layers are {self._layers}")
        return self._layers.index(layer)

    def count(self, group: str) -> int:
        """Number of prompts summed for ``group``."""
        return self._counts[self._gi(group)]

    def sum(self, group: str) -> torch.Tensor:
        """Raw float64 sums ``[n_layers, n_positions, d_model]`` of ``group``."""
        return self._sums[:, self._gi(group)].clone()

    def mean(self, group: str) -> torch.Tensor:
        """Mean activation of ``group``: ``[n_layers, n_positions, d_model]`` float64."""
        gi = self._gi(group)
        n = self._counts[gi]
        if n == 0:
            raise ValueError(f"group {group!r} has no prompts; its mean is undefined")
        return self._sums[:, gi] / n

    def diff(self, a: str, b: str) -> torch.Tensor:
        """Difference in means ``mean(a) - mean(b)``: ``[n_layers, n_positions, d_model]`` float64."""
        return self.mean(a) - self.mean(b)

    def second_moment(self, group: str, layer: int) -> torch.Tensor:
        """Uncentered second moment ``E[x xᵀ]`` of ``group`` at ``layer``: ``[n_positions, d_model, d_model]``."""
        gi = self._gi(group)
        if layer not in self._second:
            raise UnknownKeyError(
                f"no second moments for layer {layer}; extracted for {self.second_moment_layers} "
                "(pass second_moment_layers= to extract_means)"
            )
        n = self._counts[gi]
        if n == 0:
            raise ValueError(f"group {group!r} has no prompts")
        return self._second[layer][gi] / n

    def covariance(self, group: str, layer: int, unbiased: bool = False) -> torch.Tensor:
        """Covariance of ``group``'s activations at ``layer``: ``[n_positions, d_model, d_model]`` float64.

        ``unbiased=True`` divides by ``n - 1`` instead of ``n``.
        """
        m2 = self.second_moment(group, layer)
        mu = self.mean(group)[self._li(layer)]  # [P, d]
        cov = m2 - mu[:, :, None] * mu[:, None, :]
        n = self.count(group)
        if unbiased:
            if n < 2:
                raise ValueError(f"group {group!r} has {n} prompt(s); the unbiased covariance needs at least 2")
            cov = cov * (n / (n - 1))
        return cov

    def __repr__(self) -> str:
        counts = ", ".join(f"{g}={c}" for g, c in zip(self._groups, self._counts))
        return (f"Means(groups: {counts}; layers={self._layers}; positions={self._positions}; "
                f"d_model={self.d_model})")

    # ------------------------------------------------------------------ metadata
    def _derived_metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "groups": list(self._groups),
            "counts": dict(zip(self._groups, self._counts)),
            "layers": list(self._layers),
            "positions": list(self._positions),
            "second_moment_layers": sorted(self._second),
            "d_model": self.d_model,
        }

    def _check_compatible(self, other: Means, allow_other_weights: bool) -> dict | None:
        if self.d_model != other.d_model:
            raise ValueError(f"cannot merge: d_model {self.d_model} vs {other.d_model}")
        transfer = check_identity(self.metadata.get("model"), other.metadata.get("model") or {},
                                  what="cannot merge Means: the first was extracted from",
                                  allow_other_weights=allow_other_weights)
        for field in _COMPAT_FIELDS:
            a, b = _get(self.metadata, field), _get(other.metadata, field)
            if a != b:
                raise ValueError(f"cannot merge Means with different {field}: {a!r} vs {b!r}")
        return transfer

    def merge(self, other: Means, allow_other_weights: bool = False) -> Means:
        """Exact union of two extractions of the same model/template/layers/positions.

        Groups present in both are combined (sums and counts add); groups present in one are
        copied. Returns a new :class:`Means`; neither input is modified. Means of two models with
        the same architecture and size but other weights (weights fingerprint or config hash) are
        refused unless ``allow_other_weights=True`` (then recorded as ``metadata["merged_other_model"]``).
        """
        if not isinstance(other, Means):
            raise TypeError(f"can only merge with another Means, got {type(other).__name__}")
        transfer = self._check_compatible(other, allow_other_weights)
        groups = self.groups + [g for g in other.groups if g not in self._groups]
        L, P, d = len(self._layers), len(self._positions), self.d_model
        sums = torch.zeros(L, len(groups), P, d, dtype=torch.float64)
        counts = [0] * len(groups)
        second = {layer: torch.zeros(len(groups), P, d, d, dtype=torch.float64) for layer in self._second}
        hashes: dict[str, str] = {}
        for src in (self, other):
            src_hashes = src.metadata.get("prompt_sets", {})
            for gi_src, g in enumerate(src._groups):
                gi = groups.index(g)
                sums[:, gi] += src._sums[:, gi_src]
                counts[gi] += src._counts[gi_src]
                for layer in second:
                    second[layer][gi] += src._second[layer][gi_src]
                h = src_hashes.get(g)
                if g in hashes and h is not None:
                    hashes[g] = combine_hashes(hashes[g], h)
                elif h is not None:
                    hashes[g] = h
        meta = dict(self.metadata)
        meta["prompt_sets"] = hashes
        meta["deterministic"] = bool(self.metadata.get("deterministic")) and bool(other.metadata.get("deterministic"))
        if transfer is not None:
            meta["merged_other_model"] = transfer["target_model"]
        return Means(sums, counts, groups, self._layers, self._positions, meta, second)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save: ``sums``, ``counts`` (int64) and ``second_moment.<layer>``."""
        out = {"sums": self._sums, "counts": torch.tensor(self._counts, dtype=torch.int64)}
        for layer, t in self._second.items():
            out[f"second_moment.{layer}"] = t
        return out

    def second_moment_sums(self, layer: int) -> torch.Tensor:
        """Raw float64 sums of ``x xᵀ`` at ``layer``: ``[n_groups, n_positions, d_model, d_model]`` (a copy)."""
        if layer not in self._second:
            raise UnknownKeyError(f"no second moments for layer {layer}; extracted for {self.second_moment_layers}")
        return self._second[layer].clone()

    def save(self, path: str | os.PathLike, sidecar: bool = True) -> Path:
        """Write a safetensors file (metadata and tensor checksums in its header) and, if ``sidecar``, a ``.json`` copy.

        Written atomically by :func:`refusal_fast.artifacts.save_tensors`: a crash or a concurrent
        writer never leaves half a file, and a sidecar on disk always matches its tensor file.
        """
        return save_tensors(path, self.state_dict(), self.metadata, kind=FORMAT, version=FORMAT_VERSION,
                            sidecar=sidecar)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, *, allow_other_weights: bool = False,
             allow_partial: bool = False) -> Means:
        """Load and verify a file written by :meth:`save`.

        Every tensor's sha256 is checked, the sums must be finite, the layers within the recorded
        model's depth and the counts equal to the metadata's (else :class:`~refusal_fast.artifacts.ArtifactError`,
        a ``ValueError``, naming the file).

        Args:
            model: if given, it must be the model the means were extracted from (see :meth:`check_model`).
            allow_other_weights: accept a model of the same architecture and size with other weights
                (a deliberate transfer; recorded as ``metadata["transfer"]``).
            allow_partial: accept an unfinished extraction checkpoint (``extract_means(checkpoint=...)``);
                by default a partial checkpoint is refused, so it is never taken for a finished result.
        """
        tensors, meta = load_tensors(path, kind=FORMAT, max_version=FORMAT_VERSION, what="means")
        for key in ("sums", "counts"):
            if key not in tensors:
                raise ArtifactError(f"{path}: missing tensor '{key}'")
        for key in ("groups", "layers", "positions"):
            if not isinstance(meta.get(key), list):
                raise ArtifactError(f"{path}: metadata has no '{key}' list; the file is not a valid means file")
        _check_finite(path, tensors)
        _check_layers(path, meta)
        if not allow_partial:
            _check_finished(path, meta)
        second = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("second_moment.")}
        try:
            out = cls(tensors["sums"], tensors["counts"], meta["groups"], meta["layers"], meta["positions"], meta,
                      second)
        except ValueError as exc:
            raise ArtifactError(f"{path}: {exc}") from None
        if out.metadata["counts"] != meta.get("counts"):
            raise ArtifactError(f"{path}: counts tensor {out.metadata['counts']} "
                                f"disagrees with metadata {meta.get('counts')}")
        if model is not None:
            out.check_model(model, allow_other_weights=allow_other_weights)
        return out

    def check_model(self, model, allow_other_weights: bool = False) -> dict | None:
        """Raise ``ValueError`` unless ``model`` is the model these means were extracted from.

        Architecture, depth and width must match; so must the configuration hash and the weights
        fingerprint (:func:`refusal_fast.fingerprint.weights_fingerprint`) unless
        ``allow_other_weights=True``, which records the transfer as ``metadata["transfer"]`` and
        returns it.
        """
        from .models import get_adapter

        transfer = check_identity(self.metadata.get("model"), model, what="these means were extracted from",
                                  allow_other_weights=allow_other_weights)
        ad = get_adapter(model)
        if self.d_model != ad.d_model:
            raise ValueError(f"these means have width {self.d_model} but the given model's d_model is {ad.d_model}")
        beyond = [layer for layer in self._layers if layer >= ad.n_layers]
        if beyond:
            raise ValueError(f"these means have layers {beyond} beyond the given model's depth ({ad.n_layers} layers)")
        if transfer is not None:
            self.metadata["transfer"] = transfer
        return transfer


def _check_finite(path, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{path}: tensor {name!r} contains NaN or inf (the extraction overflowed, e.g. a "
                                "float16 model; extract again in bfloat16 or float32)")


def _check_layers(path, meta: Mapping[str, Any]) -> None:
    depth = (meta.get("model") or {}).get("n_layers")
    layers = meta.get("layers") or []
    bad = [x for x in layers if not isinstance(x, int) or x < 0 or (isinstance(depth, int) and x >= depth)]
    if bad:
        raise ArtifactError(f"{path}: layers {bad} lie outside the recorded model's depth ({depth} layers); "
                            "the file is corrupt or was edited")


def _check_finished(path, meta: Mapping[str, Any]) -> None:
    info = meta.get("checkpoint")
    if not isinstance(info, Mapping):
        return
    done, total, world = info.get("batches_done"), info.get("n_batches"), int(info.get("world", 1) or 1)
    if done != total or world > 1:
        shard = f", rank {info.get('rank')} of {world}" if world > 1 else ""
        raise ArtifactError(
            f"{path} is an extraction checkpoint ({done} of {total} batches{shard}), not a finished result; "
            f"resume it by calling extract_means(..., checkpoint={str(path)!r}) with the same arguments, or pass "
            "allow_partial=True to load the partial sums"
        )
