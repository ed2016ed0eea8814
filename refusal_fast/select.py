"""Direction selection (Arditi et al. 2024, appendix C), exact and batched.

Each candidate is a difference-in-means vector ``r`` taken at (layer ``l``, position ``p``).
On validation prompts it gets three scores:

- **bypass**: mean refusal score on harmful prompts with ``r/|r|`` ablated at every layer
  (block inputs and attention/MLP outputs) — lower is better;
- **induce**: mean refusal score on harmless prompts with the raw ``r`` added to the input of
  block ``l`` at every position;
- **kl**: mean ``KL(P_unmodified || P_ablated)`` of the last-position next-token distribution on
  harmless prompts.

Candidates are discarded when a score is NaN, when ``l >= int(n_layers * (1 - prune_last_frac))``,
when ``kl > kl_threshold`` or when ``induce < induce_threshold`` (checked in that order, as the
reference ``filter_fn``); the survivor with the lowest bypass score wins.

Two implementations of the same procedure: ``batched=False`` runs the ``ablate`` / ``add`` context
managers once per candidate; ``batched=True`` packs (prompt, candidate, task) rows of many
candidates into each forward pass through :func:`refusal_fast.interventions.row_interventions`
(every row ablates or adds its own candidate).
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import chat
from .artifacts import ArtifactError, read_json, tensor_sha256, write_figure, write_json
from .evaluate import (
    check_batch_size,
    check_instructions,
    kl_from_logprobs,
    last_logits,
    progress_bar,
    refusal_mask,
    refusal_score_from_logits,
    tokenize_prompts,
)
from .fingerprint import check_identity, model_identity
from .interventions import ablate, add, row_interventions
from .means import Means
from .models import get_adapter
from .types import LayersLike, PositionsLike

__all__ = ["select_direction", "SelectionResult", "NoDirectionError", "filter_reason", "METRICS"]

METRICS = ("bypass", "induce", "kl")
_UNSET = object()  # "keep the current value" for SelectionResult.refilter
#: KL thresholds :meth:`SelectionResult.refilter_relaxing_kl` tries in turn by default (None = filter off).
KL_FALLBACK = (0.2, 0.5, 1.0, None)
_BYPASS, _INDUCE, _KL = 0, 1, 2


class NoDirectionError(RuntimeError):
    """No candidate survived the filters; ``.result`` holds the full :class:`SelectionResult`."""

    def __init__(self, message: str, result: SelectionResult):
        super().__init__(message)
        self.result = result


def filter_reason(bypass: float, induce: float, kl: float, layer: int, n_layers: int,
                  prune_last_frac: float | None = 0.2, kl_threshold: float | None = 0.1,
                  induce_threshold: float | None = 0.0) -> str | None:
    """Why a candidate is discarded (``"nan"``, ``"late_layer"``, ``"kl"``, ``"induce"``) or None.

    Same checks and order as the reference ``filter_fn``; a threshold of None disables its check.
    """
    if any(math.isnan(x) for x in (bypass, induce, kl)):
        return "nan"
    if prune_last_frac is not None and layer >= int(n_layers * (1.0 - prune_last_frac)):
        return "late_layer"
    if kl_threshold is not None and kl > kl_threshold:
        return "kl"
    if induce_threshold is not None and induce < induce_threshold:
        return "induce"
    return None


@dataclass
class SelectionResult:
    """Outcome of :func:`select_direction`.

    Attributes:
        layer, position: the chosen candidate (None when nothing survived the filters).
        direction: ``[d_model]`` float64 unit vector of the chosen candidate (None if none).
        raw: ``[d_model]`` float64 raw difference-in-means vector of the chosen candidate.
        table: one dict per candidate, in (layer, position) order: ``layer``, ``position``,
            ``bypass``, ``induce``, ``kl``, ``norm`` (of the raw vector), ``filtered`` (reason or None).
        layers, positions: the candidate grid axes; ``position_labels`` readable names of positions.
        n_layers: the model's layer count (for the pruning rule).
        baseline: mean refusal scores without intervention: ``{"harmful": .., "harmless": ..}``.
        params: thresholds and run settings; ``params["model_identity"]`` is the model the scores were
            measured on (:func:`refusal_fast.fingerprint.model_identity`), ``params["allow_other_weights"]``
            whether the candidates came from another model deliberately (then ``params["means_model"]``
            names it).
    """

    layer: int | None
    position: int | None
    direction: torch.Tensor | None
    raw: torch.Tensor | None
    table: list[dict]
    layers: list[int]
    positions: list[int]
    n_layers: int
    baseline: dict
    params: dict
    position_labels: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """True when a candidate survived the filters."""
        return self.layer is not None

    def row(self, layer: int, position: int) -> dict:
        """The table row of candidate (``layer``, ``position``)."""
        for r in self.table:
            if r["layer"] == layer and r["position"] == position:
                return r
        raise KeyError(f"no candidate at layer {layer}, position {position}")

    def grid(self, metric: str) -> torch.Tensor:
        """Scores ``[n_layers_sel, n_positions]`` float64 of ``metric`` (``bypass|induce|kl``)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        g = torch.full((len(self.layers), len(self.positions)), math.nan, dtype=torch.float64)
        for r in self.table:
            g[self.layers.index(r["layer"]), self.positions.index(r["position"])] = r[metric]
        return g

    def best_rows(self, k: int = 5, filtered: bool | None = None) -> list[dict]:
        """The ``k`` rows with the lowest bypass score (NaN last); ``filtered`` False/True restricts."""
        rows = [r for r in self.table if filtered is None or (r["filtered"] is not None) == filtered]
        return sorted(rows, key=lambda r: (math.isnan(r["bypass"]), r["bypass"]))[:k]

    def to_dict(self) -> dict:
        """JSON-serialisable dict (NaN scores as null); direction and raw vector as lists, with the
        sha256 of each vector's float64 bytes under ``"checksums"`` (verified by :meth:`from_json`)."""
        def clean(x):
            return None if isinstance(x, float) and math.isnan(x) else x

        def vec(v):
            return None if v is None else v.detach().to("cpu", torch.float64)

        direction, raw = vec(self.direction), vec(self.raw)
        return {
            "format": "refusal_fast.selection", "version": 2,
            "layer": self.layer, "position": self.position,
            "direction": None if direction is None else direction.tolist(),
            "raw": None if raw is None else raw.tolist(),
            "checksums": {"direction": None if direction is None else tensor_sha256(direction),
                          "raw": None if raw is None else tensor_sha256(raw)},
            "layers": self.layers, "positions": self.positions, "position_labels": self.position_labels,
            "n_layers": self.n_layers, "baseline": self.baseline, "params": self.params,
            "table": [{k: clean(v) for k, v in r.items()} for r in self.table],
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SelectionResult:
        """Read a result written by :meth:`to_json`; the direction vectors are verified against their checksums.

        Raises:
            FileNotFoundError / ArtifactError: missing, not JSON, not a selection result, or corrupt.
        """
        d = read_json(path, "selection result")
        if not isinstance(d, dict) or d.get("format") != "refusal_fast.selection":
            raise ArtifactError(f"{path} is not a refusal_fast selection result")
        if int(d.get("version", 0)) < 2 or not isinstance(d.get("checksums"), dict):
            raise ArtifactError(f"{path} has no checksums (written by an older refusal-fast); re-run the selection "
                                "with this version")

        def num(x):
            return math.nan if x is None else float(x)

        table = [{**r, **{m: num(r[m]) for m in METRICS}} for r in d["table"]]

        def vec(key):
            v = d.get(key)
            t = None if v is None else torch.tensor(v, dtype=torch.float64)
            digest = None if t is None else tensor_sha256(t)
            if digest != d["checksums"].get(key):
                raise ArtifactError(f"{path}: the {key!r} vector fails its sha256 checksum; the file is corrupt, "
                                    "re-run the selection (or restore the file)")
            return t

        return cls(d["layer"], d["position"], vec("direction"), vec("raw"), table, d["layers"],
                   d["positions"], d["n_layers"], d["baseline"], d["params"], d.get("position_labels") or [])

    def refilter(self, candidates: Means | torch.Tensor, *, kl_threshold: Any = _UNSET, induce_threshold: Any = _UNSET,
                 prune_last_frac: Any = _UNSET, groups: Sequence[str] = ("harmful", "harmless"),
                 raise_if_none: bool = True) -> SelectionResult:
        """The same scores under other filters, without re-scoring any candidate.

        Args:
            candidates: the Means (or ``[L, P, d_model]`` tensor) that :func:`select_direction` scored;
                needed for the chosen candidate's vector. Checked against the stored vector norms.
            kl_threshold, induce_threshold, prune_last_frac: new filter values (None disables one);
                omitted ones keep this result's values.
            raise_if_none: as in :func:`select_direction`.

        Returns:
            a new :class:`SelectionResult` (table ``filtered`` reasons recomputed, chosen candidate re-picked).
        """
        p = dict(self.params)
        for name, v in (("kl_threshold", kl_threshold), ("induce_threshold", induce_threshold),
                        ("prune_last_frac", prune_last_frac)):
            if v is not _UNSET:
                p[name] = v
        _check_filters(p["prune_last_frac"], p["kl_threshold"], p["induce_threshold"])
        p["layer_cutoff"] = (None if p["prune_last_frac"] is None
                             else int(self.n_layers * (1.0 - p["prune_last_frac"])))
        d_model = (candidates if isinstance(candidates, torch.Tensor) else candidates.diff(*groups)).shape[-1]
        raw, _, _, _, _ = _candidates(candidates, self.layers, self.positions, tuple(groups), self.n_layers, d_model)
        norms = torch.linalg.vector_norm(raw, dim=-1)
        stored = torch.tensor([r["norm"] for r in self.table], dtype=torch.float64)
        if norms.shape != stored.shape or not torch.allclose(norms, stored, rtol=1e-6, atol=1e-9):
            raise ValueError("candidates do not match this selection result (different means or layers/positions)")
        table = []
        for r in self.table:
            reason = filter_reason(r["bypass"], r["induce"], r["kl"], r["layer"], self.n_layers,
                                   p["prune_last_frac"], p["kl_threshold"], p["induce_threshold"])
            if r["filtered"] == "zero_vector" or (reason == "nan" and r["filtered"] == "late_layer"):
                reason = r["filtered"]  # never scored: keep why
            table.append(dict(r, filtered=reason))
        return _choose(table, raw, norms, self.layers, self.positions, self.n_layers, self.baseline, p,
                       self.position_labels, raise_if_none)

    def refilter_relaxing_kl(self, candidates: Means | torch.Tensor, thresholds: Sequence[float | None] = KL_FALLBACK,
                             groups: Sequence[str] = ("harmful", "harmless")) -> SelectionResult:
        """:meth:`refilter` with the KL filter relaxed step by step until some candidate passes.

        Tries the current ``kl_threshold``, then each of ``thresholds`` above it in turn (None = KL filter
        off), and returns the first result that picks a candidate; its ``params["kl_threshold"]`` is the
        threshold used. Nothing is re-scored. Raises :class:`NoDirectionError` if none picks one, even with
        the filter off.
        """
        cur = self.params.get("kl_threshold")
        if cur is None:
            return self.refilter(candidates, groups=groups)
        steps = [cur] + [t for t in thresholds if t is None or t > cur]
        if not steps or steps[-1] is not None:
            steps.append(None)
        for t in steps[:-1]:
            res = self.refilter(candidates, kl_threshold=t, groups=groups, raise_if_none=False)
            if res.found:
                return res
        return self.refilter(candidates, kl_threshold=None, groups=groups)

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """PNG with three panels (bypass, induce, KL) over layers x positions.

        Filtered candidates are hatched (pattern per reason), the chosen one is outlined in red.
        """
        return _heatmap(self, path, title)

    def __repr__(self) -> str:
        n_ok = sum(r["filtered"] is None for r in self.table)
        if not self.found:
            return f"SelectionResult(no candidate survived; {len(self.table)} candidates)"
        assert self.layer is not None and self.position is not None  # found: a candidate was chosen
        r = self.row(self.layer, self.position)
        return (f"SelectionResult(layer={self.layer}, position={self.position}, bypass={r['bypass']:.4g}, "
                f"induce={r['induce']:.4g}, kl={r['kl']:.4g}; {n_ok}/{len(self.table)} candidates passed the filters)")


# --------------------------------------------------------------------------------------------
# candidates


def _candidates(candidates: Any, layers: Any, positions: Any, groups: Sequence[str], n_layers: int, d_model: int):
    """-> raw ``[C, d]`` float64, layer and position of each candidate, grid layers, grid positions."""
    if hasattr(candidates, "diff") and hasattr(candidates, "layers") and hasattr(candidates, "positions"):
        if len(groups) != 2:
            raise ValueError(f"groups must name two groups (harmful, harmless), got {groups!r}")
        grid = candidates.diff(groups[0], groups[1])
        all_layers, all_pos = list(candidates.layers), list(candidates.positions)
        li = list(range(len(all_layers)))
        pi = list(range(len(all_pos)))
        if layers is not None:
            want = [int(x) for x in ([layers] if isinstance(layers, int) else layers)]
            missing = [x for x in want if x not in all_layers]
            if missing:
                raise ValueError(f"layers {missing} were not extracted; the means have layers {all_layers}")
            li = [all_layers.index(x) for x in want]
        if positions is not None:
            want = [int(x) for x in ([positions] if isinstance(positions, int) else positions)]
            missing = [x for x in want if x not in all_pos]
            if missing:
                raise ValueError(f"positions {missing} were not extracted; the means have positions {all_pos}")
            pi = [all_pos.index(x) for x in want]
        grid = grid[li][:, pi]
        layers = [all_layers[i] for i in li]
        positions = [all_pos[i] for i in pi]
    elif isinstance(candidates, torch.Tensor):
        grid = candidates.detach()
        if grid.dim() != 3:
            raise ValueError(f"candidates must be a Means or a [n_layers, n_positions, d_model] tensor, "
                             f"got shape {tuple(grid.shape)}")
        if grid.is_complex() or not grid.dtype.is_floating_point:
            raise TypeError(f"candidates must be a real floating tensor, got dtype {grid.dtype}")
        L, P, _ = grid.shape
        if layers is None:
            if L != n_layers:
                raise ValueError(f"candidates has {L} layers but the model has {n_layers}; pass layers= "
                                 "(the layer index of each candidate row)")
            layers = list(range(L))
        layers = [int(x) for x in ([layers] if isinstance(layers, int) else layers)]
        positions = list(range(-P, 0)) if positions is None else \
            [int(x) for x in ([positions] if isinstance(positions, int) else positions)]
        if len(layers) != L:
            raise ValueError(f"candidates has {L} layer rows but {len(layers)} layers were given")
        if len(positions) != P:
            raise ValueError(f"candidates has {P} position columns but {len(positions)} positions were given")
    else:
        raise TypeError(f"candidates must be a Means or a [n_layers, n_positions, d_model] tensor, "
                        f"got {type(candidates).__name__}")
    if grid.shape[0] == 0 or grid.shape[1] == 0:
        raise ValueError(f"no candidates (grid shape {tuple(grid.shape)})")
    if grid.shape[-1] != d_model:
        raise ValueError(f"candidate vectors have width {grid.shape[-1]} but the model's d_model is {d_model}")
    for x in layers:
        if not 0 <= x < n_layers:
            raise ValueError(f"candidate layer {x} out of range for a model with {n_layers} layers")
    if len(set(layers)) != len(layers) or len(set(positions)) != len(positions):
        raise ValueError(f"duplicate layers or positions: layers={layers}, positions={positions}")
    grid = grid.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(grid).all():
        raise ValueError("candidates contain NaN or inf")
    raw = grid.reshape(-1, d_model).contiguous()
    cl = [layers[i] for i in range(len(layers)) for _ in positions]
    cp = [p for _ in layers for p in positions]
    return raw, cl, cp, layers, positions


def _position_labels(tokenizer, positions: list[int], system_prompt: str | None) -> list[str]:
    try:
        eoi = chat.eoi_tokens(tokenizer, system_prompt)
    except Exception:  # noqa: BLE001 - labels are cosmetic
        eoi = []
    out = []
    for p in positions:
        if -len(eoi) <= p < 0:
            out.append(f"{p} {tokenizer.decode([eoi[p]])!r}")
        else:
            out.append(str(p))
    return out


# --------------------------------------------------------------------------------------------
# scoring passes


class _Scorer:
    """Tokenised validation prompts, reference log-probs and the per-row score computations."""

    def __init__(self, model, tokenizer, harmful, harmless, refusal_ids, batch_size, system_prompt):
        self.model = model
        self.ids = {
            "harmful": tokenize_prompts(tokenizer, harmful, system_prompt),
            "harmless": tokenize_prompts(tokenizer, harmless, system_prompt),
        }
        for which, texts in (("harmful", harmful), ("harmless", harmless)):
            chat.check_prompt_lengths(model, [len(r) for r in self.ids[which]], texts, f"{which}_val prompt")
        self.pad = chat.pad_token_id(tokenizer)
        self.device = get_adapter(model).device
        self.batch_size = batch_size
        self.refusal_ids = refusal_ids
        self.mask = None
        self.ref = None  # [n_harmless, vocab] float64 log-probs of the unmodified model

    def logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        logits = last_logits(self.model, chat.collate(rows, self.pad, self.device))
        if self.mask is None:
            self.mask = refusal_mask(self.refusal_ids, logits.shape[-1], logits.device)
        return torch.log_softmax(logits.to(torch.float64), dim=-1)

    def buckets(self, which: str) -> list[list[int]]:
        return chat.length_buckets([len(r) for r in self.ids[which]], self.batch_size)

    def baseline(self) -> dict:
        """Reference log-probs on harmless prompts and the unmodified mean refusal scores."""
        n = len(self.ids["harmless"])
        out: dict[str, float] = {}
        for which in ("harmful", "harmless"):
            scores = torch.empty(len(self.ids[which]), dtype=torch.float64)
            for idx in self.buckets(which):
                lp = self.logprobs([self.ids[which][i] for i in idx])
                if which == "harmless":
                    if self.ref is None:
                        self.ref = torch.empty((n, lp.shape[-1]), dtype=torch.float64, device=lp.device)
                    self.ref[torch.as_tensor(idx, device=lp.device)] = lp
                scores[idx] = refusal_score_from_logits(lp, self.mask).cpu()
            out[which] = float(scores.mean())
        return out

    def mean_score(self, which: str) -> float:
        total = 0.0
        for idx in self.buckets(which):
            lp = self.logprobs([self.ids[which][i] for i in idx])
            total += float(refusal_score_from_logits(lp, self.mask).sum())
        return total / len(self.ids[which])

    def mean_kl(self) -> float:
        total = 0.0
        for idx in self.buckets("harmless"):
            lp = self.logprobs([self.ids["harmless"][i] for i in idx])
            total += float(kl_from_logprobs(self.ref[torch.as_tensor(idx, device=self.ref.device)], lp).sum())
        return total / len(self.ids["harmless"])


def _sequential(scorer: _Scorer, model, raw, unit, cand_layers, todo, progress) -> dict[int, list[float]]:
    """One candidate at a time with the ``ablate`` / ``add`` context managers."""
    out = {}
    bar = progress_bar(len(todo), "select (sequential)", progress)
    try:
        for c in todo:
            with ablate(model, unit[c]):
                bypass = scorer.mean_score("harmful")
                kl = scorer.mean_kl()
            with add(model, raw[c], layers=cand_layers[c]):
                induce = scorer.mean_score("harmless")
            out[c] = [bypass, induce, kl]
            bar.update(1)
    finally:
        bar.close()
    return out


def _batched(scorer: _Scorer, model, raw, unit, cand_layers, todo, rows_per_pass, cands_per_pass, progress
             ) -> dict[int, list[float]]:
    """Many candidates per forward pass: row ``(prompt, candidate, task)`` ablates or adds its own candidate."""
    sums = {c: [0.0, 0.0, 0.0] for c in todo}
    n = {"harmful": len(scorer.ids["harmful"]), "harmless": len(scorer.ids["harmless"])}
    groups = [todo[i:i + cands_per_pass] for i in range(0, len(todo), cands_per_pass)]
    n_rows = sum(len(g) * (n["harmful"] + 2 * n["harmless"]) for g in groups)
    bar = progress_bar(n_rows, "select (batched)", progress)
    ref_dev = scorer.ref.device
    try:
        with row_interventions(model) as ri:
            for group in groups:
                jobs: list[tuple[int, str, int, int, int]] = []  # (length, set, prompt, task, candidate)
                for which, tasks in (("harmful", (_BYPASS,)), ("harmless", (_INDUCE, _KL))):
                    for p, ids in enumerate(scorer.ids[which]):
                        jobs.extend((len(ids), which, p, t, c) for t in tasks for c in group)
                jobs.sort(key=lambda j: (-j[0], j[1], j[2], j[3], j[4]))
                for s in range(0, len(jobs), rows_per_pass):
                    chunk = jobs[s:s + rows_per_pass]
                    local = sorted({j[4] for j in chunk})
                    pos = {c: i for i, c in enumerate(local)}
                    abl = [pos[j[4]] if j[3] != _INDUCE else -1 for j in chunk]
                    add_i = [pos[j[4]] if j[3] == _INDUCE else -1 for j in chunk]
                    add_l = [cand_layers[j[4]] if j[3] == _INDUCE else -1 for j in chunk]
                    ri.set(ablate_bases=unit[local].unsqueeze(1), ablate_index=torch.tensor(abl),
                           add_vectors=raw[local], add_index=torch.tensor(add_i), add_layers=torch.tensor(add_l),
                           normalize=False)
                    lp = scorer.logprobs([scorer.ids[j[1]][j[2]] for j in chunk])
                    ri.clear()
                    score = refusal_score_from_logits(lp, scorer.mask).cpu()
                    kl_rows = [r for r, j in enumerate(chunk) if j[3] == _KL]
                    kl = {}
                    if kl_rows:
                        prompts = torch.tensor([chunk[r][2] for r in kl_rows], device=ref_dev)
                        vals = kl_from_logprobs(scorer.ref[prompts], lp[torch.tensor(kl_rows, device=lp.device)])
                        kl = dict(zip(kl_rows, vals.cpu().tolist()))
                    for r, (_, _, _, t, c) in enumerate(chunk):
                        sums[c][t] += kl[r] if t == _KL else float(score[r])
                    bar.update(len(chunk))
    finally:
        bar.close()
    return {c: [v[_BYPASS] / n["harmful"], v[_INDUCE] / n["harmless"], v[_KL] / n["harmless"]]
            for c, v in sums.items()}


# --------------------------------------------------------------------------------------------
# public entry point


def select_direction(model, tokenizer, candidates: Means | torch.Tensor, harmful_val: Sequence[str],
                     harmless_val: Sequence[str], *, layers: LayersLike = None, positions: PositionsLike = None,
                     groups: Sequence[str] = ("harmful", "harmless"),
                     prune_last_frac: float | None = 0.2, kl_threshold: float | None = 0.1,
                     induce_threshold: float | None = 0.0, refusal_ids: Sequence[int] | None = None,
                     batch_size: int = 32, batched: bool = True, candidates_per_pass: int = 8,
                     skip_pruned: bool = False, system_prompt: str | None = None, progress: bool = True,
                     raise_if_none: bool = True, allow_other_weights: bool = False) -> SelectionResult:
    """Pick the refusal direction among difference-in-means candidates (Arditi et al. 2024).

    Args:
        candidates: a :class:`~refusal_fast.extract.Means` (candidates ``means.diff(*groups)``,
            ``[n_layers_sel, n_positions, d_model]``), or a raw ``[L, P, d_model]`` tensor with
            ``layers`` (length L, default ``range(n_layers)`` when L equals the model's layer count)
            and ``positions`` (length P, default ``[-P, ..., -1]``). For a Means, ``layers`` /
            ``positions`` select a subset.
        harmful_val, harmless_val: validation instructions (bypass on harmful; induce and KL on harmless).
        prune_last_frac: discard candidates from layers ``>= int(n_layers * (1 - prune_last_frac))``.
        kl_threshold: discard candidates with mean KL above it.
        induce_threshold: discard candidates whose induce score is below it (adding them does not
            make harmless prompts refused). Any threshold may be None to disable the check.
        refusal_ids: refusal token ids (default :func:`chat.refusal_token_ids`).
        batch_size: prompts per forward pass (sequential mode).
        batched: True: the batched sweep (``row_interventions``); False: one ``ablate``/``add``
            context per candidate. Both compute the same scores (up to float rounding).
        candidates_per_pass: batched mode: candidates evaluated together; a forward pass holds up
            to ``batch_size * candidates_per_pass`` (prompt, candidate, task) rows.
        skip_pruned: do not evaluate candidates that the layer rule discards anyway (their scores
            are NaN in the table); saves ~``prune_last_frac`` of the work.
        raise_if_none: if no candidate survives, raise :class:`NoDirectionError` (with the best
            rows in the message and the full result in ``.result``); False returns a result with
            ``layer=None`` (``result.found`` is False).
        allow_other_weights: a Means is checked against ``model`` as :meth:`Means.load` does
            (architecture, depth, width, configuration hash, weights fingerprint) and against
            ``tokenizer``'s chat template; True accepts means from another checkpoint of the same
            architecture and size (a deliberate transfer, recorded in ``params``).

    Returns:
        :class:`SelectionResult` (chosen layer/position, unit direction ``[d_model]`` float64,
        raw vector, the full score table; ``to_json`` / ``heatmap``).
    """
    harmful_val = check_instructions(harmful_val, "harmful_val")
    harmless_val = check_instructions(harmless_val, "harmless_val")
    batch_size = check_batch_size(batch_size)
    if isinstance(candidates_per_pass, bool) or not isinstance(candidates_per_pass, int) or candidates_per_pass < 1:
        raise ValueError(f"candidates_per_pass must be a positive int, got {candidates_per_pass!r}")
    _check_filters(prune_last_frac, kl_threshold, induce_threshold)
    ad = get_adapter(model)
    identity = model_identity(model)
    transfer = _check_means_model(candidates, tokenizer, identity, allow_other_weights)
    raw, cand_layers, cand_pos, grid_layers, grid_pos = _candidates(
        candidates, layers, positions, tuple(groups), ad.n_layers, ad.d_model)
    if refusal_ids is None:
        refusal_ids = chat.refusal_token_ids(tokenizer)
    refusal_ids = [int(t) for t in refusal_ids]
    norms = torch.linalg.vector_norm(raw, dim=-1)
    unit = raw / norms.clamp_min(1e-300).unsqueeze(-1)
    cut = None if prune_last_frac is None else int(ad.n_layers * (1.0 - prune_last_frac))
    todo = [c for c in range(raw.shape[0])
            if norms[c] > 0 and not (skip_pruned and cut is not None and cand_layers[c] >= cut)]

    scorer = _Scorer(model, tokenizer, harmful_val, harmless_val, refusal_ids, batch_size, system_prompt)
    with torch.inference_mode():
        baseline = scorer.baseline()
        if not todo:
            scores = {}
        elif batched:
            scores = _batched(scorer, model, raw, unit, cand_layers, todo, batch_size * candidates_per_pass,
                              candidates_per_pass, progress)
        else:
            scores = _sequential(scorer, model, raw, unit, cand_layers, todo, progress)

    table = []
    for c in range(raw.shape[0]):
        b, i, k = scores.get(c, [math.nan] * 3)
        reason = filter_reason(b, i, k, cand_layers[c], ad.n_layers, prune_last_frac, kl_threshold, induce_threshold)
        if norms[c] == 0:
            reason = "zero_vector"
        elif c not in scores and reason == "nan":
            reason = "late_layer"  # skipped by skip_pruned
        table.append({"layer": cand_layers[c], "position": cand_pos[c], "bypass": b, "induce": i, "kl": k,
                      "norm": float(norms[c]), "filtered": reason})
    params = {
        "prune_last_frac": prune_last_frac, "kl_threshold": kl_threshold, "induce_threshold": induce_threshold,
        "layer_cutoff": cut, "refusal_ids": refusal_ids, "n_harmful": len(harmful_val), "n_harmless": len(harmless_val),
        "batched": bool(batched), "batch_size": batch_size, "candidates_per_pass": candidates_per_pass,
        "system_prompt": system_prompt, "model": ad.name_or_path, "config_hash": ad.config_hash,
        "model_identity": identity, "allow_other_weights": transfer is not None,
    }
    if transfer is not None:
        params["means_model"] = transfer["source_model"]
    labels = _position_labels(tokenizer, grid_pos, system_prompt)
    return _choose(table, raw, norms, grid_layers, grid_pos, ad.n_layers, baseline, params, labels, raise_if_none)


def _check_means_model(candidates: Any, tokenizer, identity: dict, allow_other_weights: bool) -> dict | None:
    """For a Means: the checks of :meth:`Means.check_model` plus the chat template; returns the transfer record."""
    meta = getattr(candidates, "metadata", None)
    if isinstance(candidates, torch.Tensor) or not isinstance(meta, dict):
        return None  # a raw candidate tensor carries no provenance
    transfer = check_identity(meta.get("model"), identity, what="these means were extracted from",
                              allow_other_weights=allow_other_weights)
    want = (meta.get("template") or {}).get("sha256")
    if want is not None:
        have = chat.template_fingerprint(tokenizer, meta.get("system_prompt"))
        if have != want:
            raise ValueError(
                f"these means were extracted with another chat template (template sha256 {want}, this tokenizer's "
                f"is {have}), so their end-of-instruction positions are other tokens; extract the means with this "
                "tokenizer"
            )
    return transfer


def _check_filters(prune_last_frac, kl_threshold, induce_threshold) -> None:
    """Clear errors for bad selection filter values (each may be None to disable it)."""
    for name, v in (("prune_last_frac", prune_last_frac), ("kl_threshold", kl_threshold),
                    ("induce_threshold", induce_threshold)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v)):
            raise ValueError(f"{name} must be a number or None, got {v!r}")
    if prune_last_frac is not None and not 0.0 <= float(prune_last_frac) <= 1.0:
        raise ValueError(f"prune_last_frac must be in [0, 1] or None, got {prune_last_frac!r}")


def _choose(table, raw, norms, grid_layers, grid_pos, n_layers, baseline, params, labels,
            raise_if_none) -> SelectionResult:
    """The lowest-bypass unfiltered row of ``table`` as a :class:`SelectionResult` (raw ``[C, d]``, norms ``[C]``)."""
    survivors = [c for c, r in enumerate(table) if r["filtered"] is None]
    if not survivors:
        result = SelectionResult(None, None, None, None, table, grid_layers, grid_pos, n_layers, baseline,
                                 params, labels)
        if raise_if_none:
            raise NoDirectionError(_none_message(result), result)
        return result
    best = min(survivors, key=lambda c: table[c]["bypass"])  # ties: first in (layer, position) order
    return SelectionResult(table[best]["layer"], table[best]["position"], raw[best] / norms[best], raw[best].clone(),
                           table, grid_layers, grid_pos, n_layers, baseline, params, labels)


def _none_message(result: SelectionResult) -> str:
    p = result.params
    counts: dict[str, int] = {}
    for r in result.table:
        counts[r["filtered"]] = counts.get(r["filtered"], 0) + 1
    lines = [
        f"no candidate direction survived the filters (prune_last_frac={p['prune_last_frac']}, "
        f"kl_threshold={p['kl_threshold']}, induce_threshold={p['induce_threshold']}); "
        f"discarded: {counts}. Baseline refusal scores: {result.baseline}. Lowest bypass scores:",
    ]
    for r in result.best_rows(5):
        lines.append(f"  layer {r['layer']:>3} pos {r['position']:>3}: bypass={r['bypass']:.4g} "
                     f"induce={r['induce']:.4g} kl={r['kl']:.4g} -> {r['filtered']}")
    lines.append("Relax a threshold (None disables it) or pass raise_if_none=False to inspect the table.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# heatmap

_HATCH = {"late_layer": "..", "kl": "///", "induce": "\\\\\\", "nan": "xx", "zero_vector": "xx"}
_PANELS = (
    ("bypass", "Bypass: refusal score on harmful, direction ablated (lower = better)", "viridis"),
    ("induce", "Induce: refusal score on harmless, vector added at its layer", "viridis"),
    ("kl", "KL(unmodified || ablated) on harmless", "magma"),
)


def _heatmap(result: SelectionResult, path: str | os.PathLike, title: str | None) -> Path:
    import matplotlib

    with matplotlib.rc_context({"hatch.linewidth": 0.6}):
        return _draw_heatmap(result, path, title)


def _draw_heatmap(result: SelectionResult, path: str | os.PathLike, title: str | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    L, P = len(result.layers), len(result.positions)
    width = min(max(7.0, 0.32 * L + 3.0), 30.0)
    panel_h = 0.38 * P + 1.3
    fig = Figure(figsize=(width, 3 * panel_h + 1.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1)
    reasons = {(r["layer"], r["position"]): r["filtered"] for r in result.table}
    ylabels = result.position_labels or [str(p) for p in result.positions]
    annotate = L * P <= 160
    for ax, (metric, name, cmap) in zip(axes, _PANELS):
        g = result.grid(metric).T.numpy()  # [P, L]
        finite = g[~(g != g)]
        norm = None
        if metric == "kl" and finite.size and (finite > 0).any():
            pos = finite[finite > 0]
            lo, hi = max(float(pos.min()), 1e-8), float(pos.max())
            if hi / lo > 100:
                norm = LogNorm(vmin=lo, vmax=hi)
                g = g.clip(min=lo)
        im = ax.imshow(g, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xticks(range(L))
        ax.set_xticklabels([str(x) for x in result.layers], fontsize=7)
        ax.set_yticks(range(P))
        ax.set_yticklabels(ylabels, fontsize=7)
        ax.set_ylabel("position", fontsize=8)
        for li, layer in enumerate(result.layers):
            for pi, p in enumerate(result.positions):
                reason = reasons.get((layer, p))
                v = g[pi, li]
                if v == v:
                    rgb = im.cmap(im.norm(v))[:3]
                    dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
                else:  # not evaluated / NaN: light grey
                    ax.add_patch(Rectangle((li - 0.5, pi - 0.5), 1, 1, facecolor="0.85", edgecolor="none"))
                    dark = False
                if reason is not None:
                    ax.add_patch(Rectangle((li - 0.5, pi - 0.5), 1, 1, fill=False, hatch=_HATCH.get(reason, "xx"),
                                           edgecolor="white" if dark else "black", linewidth=0.0, alpha=0.6))
                if annotate and v == v:
                    ax.text(li, pi, f"{g[pi, li]:.2g}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
        if result.found:
            assert result.layer is not None and result.position is not None  # found: a candidate was chosen
            li, pi = result.layers.index(result.layer), result.positions.index(result.position)
            ax.add_patch(Rectangle((li - 0.5, pi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.0))
    axes[-1].set_xlabel("layer (residual at block input)", fontsize=8)
    present = sorted({r["filtered"] for r in result.table if r["filtered"] is not None})
    handles = [Patch(facecolor="white", edgecolor="black", hatch=_HATCH.get(r, "xx"), label=f"filtered: {r}")
               for r in present]
    handles.append(Patch(facecolor="none", edgecolor="red", linewidth=2.0, label="chosen"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    params = result.params
    head = title or "Direction selection"
    chosen = (f"chosen: layer {result.layer}, position {result.position}" if result.found
              else "no candidate survived the filters")
    kl = params.get("kl_threshold")
    kl_text = "KL filter off" if kl is None else f"kl <= {kl}"
    fig.suptitle(f"{head} — {chosen}\n({kl_text}, induce >= {params.get('induce_threshold')}, "
                 f"layers < {params.get('layer_cutoff')}; "
                 f"baseline harmful {result.baseline.get('harmful', float('nan')):.3g}, "
                 f"harmless {result.baseline.get('harmless', float('nan')):.3g})", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return write_figure(fig, path)
