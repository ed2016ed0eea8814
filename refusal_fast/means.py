"""``Means``: per-group residual-stream sums and counts, with save / load / merge.

The state is exact sums, not averages: ``sums`` ``[n_layers, n_groups, n_positions, d_model]``
float64 plus integer ``counts`` ``[n_groups]`` (and optionally second-moment sums
``[n_groups, n_positions, d_model, d_model]`` per chosen layer). Means are derived on demand,
so merging two partial extractions is exact bookkeeping: sums add, counts add.

Artifacts are safetensors files whose header metadata holds one JSON document under the key
``"refusal_fast"`` (model config hash, template, system prompt, positions, layers, counts,
prompt-set hashes, library version); a human-readable ``.json`` copy is written beside it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["Means", "UnknownKeyError", "prompt_set_hash", "library_version"]

FORMAT = "refusal_fast.means"
FORMAT_VERSION = 1
_META_KEY = "refusal_fast"
_MOD = 1 << 256

# Metadata fields two states must agree on to be merged (dotted paths into the metadata).
_COMPAT_FIELDS = (
    "model.config_hash", "model.d_model", "model.n_layers", "template.sha256",
    "system_prompt", "positions", "layers", "second_moment_layers",
)


def library_version() -> str:
    """refusal-fast version: ``refusal_fast.__version__``, the one source the package metadata reads."""
    from . import __version__

    return __version__


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

    def _check_compatible(self, other: Means) -> None:
        if self.d_model != other.d_model:
            raise ValueError(f"cannot merge: d_model {self.d_model} vs {other.d_model}")
        for field in _COMPAT_FIELDS:
            a, b = _get(self.metadata, field), _get(other.metadata, field)
            if a != b:
                raise ValueError(f"cannot merge Means with different {field}: {a!r} vs {b!r}")

    def merge(self, other: Means) -> Means:
        """Exact union of two extractions of the same model/template/layers/positions.

        Groups present in both are combined (sums and counts add); groups present in one are
        copied. Returns a new :class:`Means`; neither input is modified.
        """
        if not isinstance(other, Means):
            raise TypeError(f"can only merge with another Means, got {type(other).__name__}")
        self._check_compatible(other)
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
        return Means(sums, counts, groups, self._layers, self._positions, meta, second)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save: ``sums``, ``counts`` (int64) and ``second_moment.<layer>``."""
        out = {"sums": self._sums, "counts": torch.tensor(self._counts, dtype=torch.int64)}
        for layer, t in self._second.items():
            out[f"second_moment.{layer}"] = t
        return out

    def save(self, path: str | os.PathLike, sidecar: bool = True) -> Path:
        """Write a safetensors file (metadata JSON in its header) and, if ``sidecar``, a ``.json`` copy.

        The file is written to a temporary name and renamed, so a crash never leaves half a file.
        """
        from safetensors.torch import save_file

        path = Path(path)
        meta = json.dumps(self.metadata, sort_keys=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.state_dict(), str(tmp), metadata={_META_KEY: meta})
        os.replace(tmp, path)
        if sidecar:
            side = path.with_suffix(".json") if path.suffix else path.with_name(path.name + ".json")
            side.write_text(json.dumps(self.metadata, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> Means:
        """Load a file written by :meth:`save`.

        If ``model`` is given, its config hash, depth and width must match the metadata
        (a clear ``ValueError`` otherwise), so means are never applied to the wrong model.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such means file: {path}")
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        if _META_KEY not in header:
            raise ValueError(f"{path} is not a refusal-fast means file (no '{_META_KEY}' header metadata)")
        meta = json.loads(header[_META_KEY])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unexpected format {meta.get('format')!r}, expected {FORMAT!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path}: format version {meta.get('format_version')} is newer than this library's "
                             f"{FORMAT_VERSION}; upgrade refusal-fast")
        for key in ("sums", "counts"):
            if key not in tensors:
                raise ValueError(f"{path}: missing tensor '{key}'")
        second = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("second_moment.")}
        out = cls(tensors["sums"], tensors["counts"], meta["groups"], meta["layers"], meta["positions"], meta, second)
        if out.metadata["counts"] != meta.get("counts"):
            raise ValueError(f"{path}: counts tensor {out.metadata['counts']} "
                             f"disagrees with metadata {meta.get('counts')}")
        if model is not None:
            out.check_model(model)
        return out

    def check_model(self, model) -> None:
        """Raise ``ValueError`` unless ``model`` is the model these means were extracted from."""
        from .models import get_adapter

        adapter = get_adapter(model)
        want = self.metadata.get("model", {})
        have = {"config_hash": adapter.config_hash, "n_layers": adapter.n_layers, "d_model": adapter.d_model}
        for key, value in have.items():
            if key in want and want[key] != value:
                raise ValueError(
                    f"these means were extracted from model {want.get('name_or_path', '?')!r} "
                    f"({key}={want[key]!r}), but the given model {adapter.name_or_path!r} has {key}={value!r}"
                )
