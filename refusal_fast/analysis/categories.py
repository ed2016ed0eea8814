"""Per-category refusal directions: one extraction pass, cosine geometry, PCA, and ablations.

Thin layer over :func:`refusal_fast.extract.extract_means`, :func:`refusal_fast.interventions.ablate`,
:func:`refusal_fast.select.select_direction` and :mod:`refusal_fast.evaluate`.

Typical use::

    train, held = split_prompts(datasets.categories("harmbench_test"), holdout=0.3, seed=0)
    cd = category_directions(model, tok, train, harmless, layer=None)
    cos = cosine_similarity(cd)               # per layer + at the chosen layers
    pca = category_pca(cd)                    # spectrum, n components for 90%, angles
    xab = cross_ablation(model, tok, cd, held)
    sub = subspace_ablation(model, tok, cd, held, pca=pca)

Conventions: layer ``l`` is the residual stream at the input of block ``l``; a category
direction is ``mean(category) - mean(harmless)`` at one token ``position`` (negative offset);
directions are float64 on the CPU.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import load_tensors, save_tensors
from ..fingerprint import check_identity
from ._common import EvalConfig, JSONResult, as_prompt_dict, derive_seed, measure, nan_array, random_like, zero_noise

_KIND = "refusal_fast.category_directions"

__all__ = [
    "CategoryDirections", "CosineResult", "PCAResult", "CrossAblationResult", "SubspaceAblationResult",
    "split_prompts", "default_layer", "category_directions", "cosine_similarity", "category_pca",
    "cross_ablation", "subspace_ablation", "GLOBAL",
]

#: Label of the all-categories ("global") harmful-minus-harmless direction.
GLOBAL = "global"
#: ``layer=None`` uses the layer at this fraction of the depth (the refusal literature finds
#: usable directions around 40-60% depth); pass an int or ``"select"`` to choose otherwise.
DEFAULT_DEPTH = 0.6
_HARMLESS = "\x00harmless"


def default_layer(n_layers: int) -> int:
    """Layer used when ``layer=None``: ``round(DEFAULT_DEPTH * n_layers)`` clipped to ``[1, n_layers-1]``."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return int(min(max(round(DEFAULT_DEPTH * n_layers), 1), n_layers - 1))


def split_prompts(category_prompts: Mapping[str, Sequence[str]], holdout: float = 0.3, seed: int = 0,
                  min_heldout: int = 1) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split each category's prompts into (train, held-out), shuffled with ``seed``.

    Every category keeps at least one train prompt and ``min_heldout`` held-out prompts;
    categories with too few prompts for that raise ValueError.
    """
    cats = as_prompt_dict(category_prompts, "category_prompts")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    train, held = {}, {}
    for i, (c, ps) in enumerate(sorted(cats.items())):
        ps = list(ps)
        random.Random(derive_seed(seed, i)).shuffle(ps)
        n_held = max(min_heldout, int(round(holdout * len(ps))))
        if len(ps) - n_held < 1:
            raise ValueError(f"category {c!r} has {len(ps)} prompts: too few to hold out {n_held}")
        held[c], train[c] = ps[:n_held], ps[n_held:]
    return train, held


# --------------------------------------------------------------------------------------------
# directions


@dataclasses.dataclass
class CategoryDirections(JSONResult):
    """Per-category difference-in-means directions at every layer.

    Attributes:
        categories: category names (order of the category axis).
        layers: extracted layers (order of the layer axis; all layers of the model).
        position: token position (negative offset from the prompt end) of the directions.
        directions: ``[n_layers, n_categories, d_model]`` float64, ``mean(category) - mean(harmless)``.
        global_direction: ``[n_layers, d_model]`` float64, mean over all categories' prompts minus harmless.
        chosen_layer: ``{category: layer}`` used by :meth:`chosen`, cross / subspace ablation.
        global_layer: layer of the global direction.
        layer_mode: ``"given"``, ``"default"`` (``layer=None``) or ``"select"``.
        counts: prompts per category (and ``"harmless"``) in the extraction.
        selection: per-category selection summaries when ``layer_mode == "select"``.
        model: identity of the model the directions come from
            (:func:`refusal_fast.fingerprint.model_identity`, with its weights fingerprint).
    """

    categories: list[str]
    layers: list[int]
    position: int
    directions: torch.Tensor
    global_direction: torch.Tensor
    chosen_layer: dict[str, int]
    global_layer: int
    layer_mode: str
    counts: dict[str, int]
    selection: dict | None = None
    model: dict | None = None

    _json_exclude = ("directions", "global_direction")

    def _li(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not extracted; layers are {self.layers}")
        return self.layers.index(layer)

    def direction(self, category: str, layer: int | None = None) -> torch.Tensor:
        """``[d_model]`` direction of ``category`` (or :data:`GLOBAL`) at ``layer`` (default its chosen layer)."""
        if category == GLOBAL:
            return self.global_direction[self._li(self.global_layer if layer is None else layer)].clone()
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; categories are {self.categories}")
        layer = self.chosen_layer[category] if layer is None else layer
        return self.directions[self._li(layer), self.categories.index(category)].clone()

    def chosen(self) -> torch.Tensor:
        """``[n_categories, d_model]``: each category's direction at its chosen layer."""
        return torch.stack([self.direction(c) for c in self.categories])

    def at_layer(self, layer: int) -> torch.Tensor:
        """``[n_categories, d_model]``: all category directions at ``layer``."""
        return self.directions[self._li(layer)].clone()

    def norms(self) -> torch.Tensor:
        """``[n_layers, n_categories]`` direction norms."""
        return torch.linalg.vector_norm(self.directions, dim=-1)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["norms"] = self.norms().tolist()
        d["global_norms"] = torch.linalg.vector_norm(self.global_direction, dim=-1).tolist()
        return d

    def save(self, path: str | Path) -> Path:
        """Write the tensors to ``path`` (safetensors, checksummed) and the rest as JSON in the header and beside it."""
        tensors = {"directions": torch.as_tensor(self.directions),
                   "global_direction": torch.as_tensor(self.global_direction)}
        return save_tensors(path, tensors, self.to_dict(), kind=_KIND, version=1)

    @classmethod
    def load(cls, path: str | Path, model=None, allow_other_weights: bool = False) -> CategoryDirections:
        """Read and verify what :meth:`save` wrote; with ``model``, check it is the model they came from
        (see :func:`refusal_fast.fingerprint.check_identity`)."""
        tensors, meta = load_tensors(path, kind=_KIND, max_version=1, what="category directions")
        obj = cls.from_dict(meta)
        obj.directions, obj.global_direction = tensors["directions"], tensors["global_direction"]
        obj.chosen_layer = {k: int(v) for k, v in obj.chosen_layer.items()}
        if model is not None:
            check_identity(obj.model, model, what="these category directions were computed from",
                           allow_other_weights=allow_other_weights)
        return obj


def _select_layer(model, tokenizer, candidates: torch.Tensor, layers: list[int], position: int, val: list[str],
                  harmless_val: list[str], select_kwargs: Mapping[str, Any]) -> tuple[int, dict]:
    """Best layer among ``candidates`` ``[n_layers, d]`` by :func:`refusal_fast.select.select_direction`.

    If no candidate passes the selection filters, the candidate with the lowest bypass score
    (outside the pruned last layers when possible) is used and the summary says so (``"found": False``).
    """
    from ..select import select_direction

    norms = torch.linalg.vector_norm(candidates, dim=-1)
    keep = [i for i in range(len(layers)) if norms[i] > 0]
    if not keep:
        raise ValueError("all candidate directions are zero; nothing to select")
    kw = {"progress": False, **dict(select_kwargs), "raise_if_none": False}
    res = select_direction(model, tokenizer, candidates[keep].unsqueeze(1), val, harmless_val,
                           layers=[layers[i] for i in keep], positions=[position], **kw)
    if res.layer is not None:  # res.found
        layer = int(res.layer)
    else:  # lowest bypass score among candidates not pruned as too late (else among all)
        rows = [r for r in res.table if r["filtered"] not in ("late_layer", "nan")] or \
               [r for r in res.table if r["filtered"] != "nan"] or res.table
        layer = int(min(rows, key=lambda r: (r["bypass"] != r["bypass"], r["bypass"]))["layer"])
    row = res.row(layer, position)
    summary: dict[str, Any] = {"layer": layer, "found": bool(res.found)}
    for key in ("bypass", "induce", "kl"):
        v = row.get(key)
        summary[key] = None if v is None or v != v else float(v)
    summary["baseline"] = dict(res.baseline)
    return layer, summary


def category_directions(model, tokenizer, category_prompts: Mapping[str, Sequence[str]], harmless: Sequence[str],
                        layer: int | str | None = None, position: int = -1, *,
                        val_prompts: Mapping[str, Sequence[str]] | None = None,
                        harmless_val: Sequence[str] | None = None, batch_size: int = 32,
                        system_prompt: str | None = None, progress: bool = False,
                        select_kwargs: Mapping[str, Any] | None = None) -> CategoryDirections:
    """Per-category refusal directions from one extraction pass (one group per category + harmless).

    Args:
        model, tokenizer: a supported chat model and its tokenizer.
        category_prompts: ``{category: [instruction, ...]}`` (e.g. :func:`refusal_fast.datasets.categories`).
        harmless: harmless instructions shared by all categories.
        layer: None (every category at :func:`default_layer`), an int (that layer for all), or
            ``"select"`` (each category's layer by :func:`refusal_fast.select.select_direction`
            on ``val_prompts[category]`` vs ``harmless_val``; the global direction on all of them).
        position: negative token offset at which activations are read (-1 = last prompt token).
        val_prompts, harmless_val: held-out prompts for ``layer="select"``.
        batch_size, system_prompt, progress: passed to :func:`refusal_fast.extract.extract_means`.
        select_kwargs: extra keyword arguments for ``select_direction``.

    Returns:
        :class:`CategoryDirections` with ``directions`` ``[n_layers, n_categories, d_model]``.
    """
    from ..extract import extract_means
    from ..models import get_adapter

    cats = as_prompt_dict(category_prompts, "category_prompts")
    if isinstance(harmless, Mapping):
        raise TypeError("harmless must be a list of instructions, not a dict")
    harmless = as_prompt_dict(harmless, "harmless")["harmless"]
    if isinstance(position, bool) or not isinstance(position, int) or position >= 0:
        raise ValueError(f"position must be a negative int (offset from the prompt end), got {position!r}")
    ad = get_adapter(model)
    names = list(cats)
    groups = {f"cat{i}": cats[c] for i, c in enumerate(names)}
    groups[_HARMLESS] = harmless
    means = extract_means(model, tokenizer, groups, positions=[position], layers=None, batch_size=batch_size,
                          system_prompt=system_prompt, progress=progress)
    layers = list(means.layers)
    harm_mean = means.mean(_HARMLESS)[:, 0]                                  # [L, d]
    dirs = torch.stack([means.mean(f"cat{i}")[:, 0] - harm_mean for i in range(len(names))], dim=1)
    total = sum(means.count(f"cat{i}") for i in range(len(names)))
    glob = sum(means.sum(f"cat{i}")[:, 0] for i in range(len(names))) / total - harm_mean
    dirs, glob = zero_noise(dirs, harm_mean), zero_noise(glob, harm_mean)

    selection = None
    if layer is None or (isinstance(layer, int) and not isinstance(layer, bool)):
        mode = "default" if layer is None else "given"
        chosen = default_layer(ad.n_layers) if layer is None else ad.check_layers(layer)[0]
        chosen_layer = {c: chosen for c in names}
        global_layer = chosen
    elif layer == "select":
        if val_prompts is None or harmless_val is None:
            raise ValueError('layer="select" needs val_prompts (per category) and harmless_val')
        val = as_prompt_dict(val_prompts, "val_prompts")
        missing = [c for c in names if c not in val]
        if missing:
            raise ValueError(f"val_prompts has no prompts for categories {missing}")
        hv = list(harmless_val)
        mode, chosen_layer, selection = "select", {}, {}
        for i, c in enumerate(names):
            chosen_layer[c], selection[c] = _select_layer(model, tokenizer, dirs[:, i], layers, position, val[c], hv,
                                                          select_kwargs or {})
        all_val = [p for c in names for p in val[c]]
        global_layer, selection[GLOBAL] = _select_layer(model, tokenizer, glob, layers, position, all_val, hv,
                                                        select_kwargs or {})
    else:
        raise ValueError(f'layer must be None, an int or "select", got {layer!r}')

    li = {l: i for i, l in enumerate(layers)}
    zero = [c for i, c in enumerate(names) if not dirs[li[chosen_layer[c]], i].any()]
    if zero or not glob[li[global_layer]].any():
        raise ValueError(f"category directions {zero or [GLOBAL]} are zero at their chosen layer "
                         f"{sorted({chosen_layer[c] for c in zero} or {global_layer})} (layer 0 at a template token "
                         f"is the same embedding for every prompt); choose a later layer")
    counts = {c: means.count(f"cat{i}") for i, c in enumerate(names)}
    counts["harmless"] = means.count(_HARMLESS)
    return CategoryDirections(categories=names, layers=layers, position=position, directions=dirs,
                              global_direction=glob, chosen_layer=chosen_layer, global_layer=int(global_layer),
                              layer_mode=mode, counts=counts, selection=selection, model=means.metadata.get("model"))


# --------------------------------------------------------------------------------------------
# cosine similarity


def _cosine(x: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` -> ``[n, n]`` cosine matrix; rows of zero norm give NaN."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    u = x / n.where(n > 0, torch.full_like(n, float("nan")))
    return (u @ u.T).clamp(-1.0, 1.0)


@dataclasses.dataclass
class CosineResult(JSONResult):
    """Cosine similarity between category directions (and the global direction).

    Attributes:
        labels: categories followed by :data:`GLOBAL`.
        layers: layers of ``by_layer``.
        by_layer: ``[n_layers, n+1, n+1]`` cosine matrices, all directions at the same layer
            (NaN where a direction is zero, e.g. layer 0 at the last token, which every prompt shares).
        matrix: ``[n+1, n+1]`` at the chosen layers (category ``i`` at ``chosen_layer[i]``, global at its layer).
        chosen_layers: the layer of each label in ``matrix``.
        mean_offdiag_by_layer: ``[n_layers]`` mean cosine between distinct categories (global excluded).
    """

    labels: list[str]
    layers: list[int]
    by_layer: Any
    matrix: Any
    chosen_layers: list[int]
    mean_offdiag_by_layer: Any


def cosine_similarity(cd: CategoryDirections) -> CosineResult:
    """Cosine matrices between the category directions and the global direction, per layer and
    at the chosen layers. Pure computation on ``cd`` (no model calls)."""
    n = len(cd.categories)
    all_dirs = torch.cat([cd.directions, cd.global_direction.unsqueeze(1)], dim=1)  # [L, n+1, d]
    by_layer = torch.stack([_cosine(all_dirs[i]) for i in range(len(cd.layers))])
    chosen = torch.cat([cd.chosen(), cd.direction(GLOBAL).unsqueeze(0)])
    off = ~torch.eye(n, dtype=torch.bool)
    mean_off = [float(by_layer[i, :n, :n][off].mean()) if n > 1 else float("nan") for i in range(len(cd.layers))]
    return CosineResult(labels=list(cd.categories) + [GLOBAL], layers=list(cd.layers), by_layer=by_layer.numpy(),
                        matrix=_cosine(chosen).numpy(),
                        chosen_layers=[cd.chosen_layer[c] for c in cd.categories] + [cd.global_layer],
                        mean_offdiag_by_layer=np.asarray(mean_off))


# --------------------------------------------------------------------------------------------
# PCA


@dataclasses.dataclass
class PCAResult(JSONResult):
    """PCA of the category directions (rows = categories).

    Attributes:
        labels: categories (rows of the PCA input).
        layer: layer of the directions, or None for each category's chosen layer.
        center: whether the directions were mean-centred (sklearn's default PCA). Uncentred
            (default) keeps the component the categories share: one dominant component means
            "one refusal direction"; centred PCA describes only how categories differ.
        normalize: whether each direction was scaled to unit norm first.
        explained_variance_ratio: ``[n_components]``.
        cumulative: ``[n_components]`` cumulative ratios.
        threshold: the ratio ``n_components_threshold`` reaches (default 0.9).
        n_components_90: smallest number of components with cumulative ratio >= threshold.
        singular_values: ``[n_components]``.
        angles_deg: ``[n_categories, n_components]``; entry ``[i, k-1]`` is the angle (degrees)
            between category ``i``'s direction and the span of the top ``k`` components.
        components: ``[n_components, d_model]`` float64 orthonormal rows (not in the JSON).
    """

    labels: list[str]
    layer: int | None
    center: bool
    normalize: bool
    explained_variance_ratio: Any
    cumulative: Any
    threshold: float
    n_components_90: int
    singular_values: Any
    angles_deg: Any
    components: Any = None

    _json_exclude = ("components",)


def category_pca(cd: CategoryDirections, layer: int | None = None, center: bool = False, normalize: bool = True,
                 threshold: float = 0.9) -> PCAResult:
    """scikit-learn PCA of the category directions ``[n_categories, d_model]``.

    Args:
        cd: from :func:`category_directions`.
        layer: directions at this layer; None = each category's chosen layer.
        center: subtract the mean direction first (plain ``sklearn.decomposition.PCA``). With
            ``center=False`` sklearn's PCA runs on the rows ``[X; -X]`` whose mean is zero, so its
            components are the right singular vectors of ``X`` and the ratios are ``s_i^2 / sum s^2``.
        normalize: unit-normalise each direction first (compare shapes, not magnitudes).
        threshold: cumulative explained variance for ``n_components_90``.
    """
    from sklearn.decomposition import PCA

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    x = cd.chosen() if layer is None else cd.at_layer(layer)
    norms = torch.linalg.vector_norm(x, dim=-1)
    if (norms == 0).any():
        zero = [c for c, n in zip(cd.categories, norms) if n == 0]
        raise ValueError(f"category directions {zero} are zero at layer {layer}; PCA is undefined there")
    if normalize:
        x = x / norms[:, None]
    X = x.numpy()
    n, d = X.shape
    n_comp = min(n, d)
    data = X if center else np.vstack([X, -X])
    pca = PCA(n_components=n_comp, svd_solver="full").fit(data)
    ratios = pca.explained_variance_ratio_
    cum = np.cumsum(ratios)
    n90 = int(np.searchsorted(cum, threshold - 1e-12) + 1)
    comps = torch.from_numpy(np.ascontiguousarray(pca.components_)).to(torch.float64)
    u = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    proj = (u @ comps.T) ** 2                                           # [n, n_comp]
    cos_k = torch.sqrt(torch.cumsum(proj, dim=1).clamp(0.0, 1.0))
    angles = torch.rad2deg(torch.arccos(cos_k)).numpy()
    sv = pca.singular_values_ if center else pca.singular_values_ / np.sqrt(2.0)
    return PCAResult(labels=list(cd.categories), layer=layer, center=center, normalize=normalize,
                     explained_variance_ratio=ratios, cumulative=cum, threshold=threshold,
                     n_components_90=min(n90, n_comp), singular_values=sv, angles_deg=angles, components=comps)


# --------------------------------------------------------------------------------------------
# ablations


def _orthonormal_rows(x: torch.Tensor, rtol: float = 1e-8) -> torch.Tensor:
    """Orthonormal basis ``[r, d]`` of the row space of ``x`` ``[k, d]`` (rank-revealing SVD)."""
    _, s, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    r = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if r == 0:
        raise ValueError("cannot ablate: the directions are all zero")
    return vh[:r]


def _run_ablation(model, tokenizer, basis: torch.Tensor, evals: dict[str, list[str]], cfg: EvalConfig,
                  layers) -> dict[str, dict]:
    from ..interventions import ablate

    with ablate(model, basis, layers=layers):
        return measure(model, tokenizer, evals, cfg)


def _fill(res: dict[str, dict], names: list[str], key: str) -> list[float]:
    return [np.nan if res[n][key] is None else res[n][key] for n in names]


@dataclasses.dataclass
class CrossAblationResult(JSONResult):
    """Refusal on each evaluated category with each category's direction ablated.

    Attributes:
        ablated: labels of the ablated directions (rows): categories, then :data:`GLOBAL` if included.
        evaluated: evaluated prompt groups (columns).
        baseline_score: ``[n_eval]`` mean refusal score with no intervention.
        refusal_score: ``[n_ablated, n_eval]`` mean refusal score with row's direction ablated.
        random_score: ``[n_ablated, n_eval]`` mean over ``n_random`` seeded random directions with the
            norm of the row's direction; ``random_score_std`` their standard deviation (0 for one).
        baseline_rate / refusal_rate / random_rate: classifier refusal rates (generation), or None.
        direction_layers: layer each ablated direction was taken from.
        direction_norms / random_norms: ``[n_ablated]`` / ``[n_ablated, n_random]`` norms (equal by construction).
        ablation_layers: layers where the projection is applied (None = all).
        n_prompts: prompts per evaluated group.
    """

    ablated: list[str]
    evaluated: list[str]
    baseline_score: Any
    refusal_score: Any
    random_score: Any
    random_score_std: Any
    baseline_rate: Any
    refusal_rate: Any
    random_rate: Any
    direction_layers: list[int]
    direction_norms: Any
    random_norms: Any
    ablation_layers: list[int] | None
    n_random: int
    seed: int
    n_prompts: dict[str, int]
    eval_config: dict


def _check_random(n_random: int, seed: int) -> None:
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be an int >= 1, got {n_random!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def cross_ablation(model, tokenizer, cd: CategoryDirections, eval_prompts: Mapping[str, Sequence[str]], *,
                   cfg: EvalConfig | None = None, include_global: bool = True, layers=None, n_random: int = 1,
                   seed: int = 0) -> CrossAblationResult:
    """Cross-category ablation matrix: ablate category ``i``'s direction (at its chosen layer) at
    ``layers`` (default all), measure refusal on every group of ``eval_prompts`` (held-out prompts,
    e.g. from :func:`split_prompts`). Each row also gets a random-direction null: ``n_random``
    Gaussian directions with the same norm, seeded by ``(seed, row, r)``.

    Cost: ``(1 + n_rows * (1 + n_random))`` evaluations of all ``eval_prompts``.
    """
    cfg = cfg or EvalConfig()
    _check_random(n_random, seed)
    evals = as_prompt_dict(eval_prompts, "eval_prompts")
    ev = list(evals)
    rows = list(cd.categories) + ([GLOBAL] if include_global else [])
    dirs = torch.stack([cd.direction(r) for r in rows])
    base = measure(model, tokenizer, evals, cfg)
    shape = (len(rows), len(ev))
    score, rate = nan_array(*shape), nan_array(*shape)
    rnd = nan_array(len(rows), n_random, len(ev))
    rnd_rate = nan_array(len(rows), n_random, len(ev))
    rnd_norms = nan_array(len(rows), n_random)
    for i, _r in enumerate(rows):
        res = _run_ablation(model, tokenizer, dirs[i], evals, cfg, layers)
        score[i], rate[i] = _fill(res, ev, "score"), _fill(res, ev, "rate")
        for k in range(n_random):
            rv = random_like(dirs[i], derive_seed(seed, 1, i, k))
            rnd_norms[i, k] = float(torch.linalg.vector_norm(rv))
            res = _run_ablation(model, tokenizer, rv, evals, cfg, layers)
            rnd[i, k], rnd_rate[i, k] = _fill(res, ev, "score"), _fill(res, ev, "rate")
    gen = cfg.generate
    from ..models import get_adapter

    return CrossAblationResult(
        ablated=rows, evaluated=ev, baseline_score=np.asarray(_fill(base, ev, "score")), refusal_score=score,
        random_score=rnd.mean(1), random_score_std=rnd.std(1),
        baseline_rate=np.asarray(_fill(base, ev, "rate")) if gen else None, refusal_rate=rate if gen else None,
        random_rate=rnd_rate.mean(1) if gen else None,
        direction_layers=[cd.global_layer if r == GLOBAL else cd.chosen_layer[r] for r in rows],
        direction_norms=torch.linalg.vector_norm(dirs, dim=-1).numpy(), random_norms=rnd_norms,
        ablation_layers=None if layers is None else get_adapter(model).check_layers(layers),
        n_random=n_random, seed=seed, n_prompts={g: len(evals[g]) for g in ev}, eval_config=cfg.summary())


@dataclasses.dataclass
class SubspaceAblationResult(JSONResult):
    """Refusal per category with a rank-``k`` subspace ablated.

    Attributes:
        conditions: labels, e.g. ``"PC1-3"`` (top 3 principal components) and ``"all categories"``.
        ranks: rank of each condition's subspace.
        evaluated: evaluated groups (columns).
        baseline_score: ``[n_eval]``; refusal_score / random_score / random_score_std: ``[n_cond, n_eval]``
            (random: seeded Gaussian bases of the same rank and row norms).
        *_rate: classifier rates (generation) or None.
        pca_center / pca_normalize / pca_layer: settings of the PCA the components came from.
    """

    conditions: list[str]
    ranks: list[int]
    evaluated: list[str]
    baseline_score: Any
    refusal_score: Any
    random_score: Any
    random_score_std: Any
    baseline_rate: Any
    refusal_rate: Any
    random_rate: Any
    pca_center: bool
    pca_normalize: bool
    pca_layer: int | None
    ablation_layers: list[int] | None
    n_random: int
    seed: int
    n_prompts: dict[str, int]
    eval_config: dict


def subspace_ablation(model, tokenizer, cd: CategoryDirections, eval_prompts: Mapping[str, Sequence[str]], *,
                      ks: Sequence[int] = (1, 2, 3, 4, 5), include_all: bool = True, pca: PCAResult | None = None,
                      cfg: EvalConfig | None = None, layers=None, n_random: int = 1,
                      seed: int = 0) -> SubspaceAblationResult:
    """Rank-``k`` subspace ablation: ablate the top ``k`` principal components of the category
    directions (``k`` in ``ks``, those beyond the number of components skipped) and, with
    ``include_all``, the span of all category directions at their chosen layers; refusal per
    evaluated group, each beside a seeded random subspace of the same rank.

    Args:
        pca: a :class:`PCAResult` (default ``category_pca(cd)``).
    """
    cfg = cfg or EvalConfig()
    _check_random(n_random, seed)
    evals = as_prompt_dict(eval_prompts, "eval_prompts")
    ev = list(evals)
    pca = pca if pca is not None else category_pca(cd)
    if pca.components is None:
        raise ValueError("pca has no components (loaded from JSON?); recompute it with category_pca")
    comps = torch.as_tensor(pca.components, dtype=torch.float64)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive ints, got {ks}")
    conds: list[tuple[str, torch.Tensor]] = []
    for k in ks:
        if k <= comps.shape[0]:
            conds.append(("PC1" if k == 1 else f"PC1-{k}", comps[:k]))
    if include_all:
        conds.append(("all categories", _orthonormal_rows(cd.chosen())))
    if not conds:
        raise ValueError(f"no condition to run: ks={ks} exceed the {comps.shape[0]} components and include_all=False")
    base = measure(model, tokenizer, evals, cfg)
    shape = (len(conds), len(ev))
    score, rate = nan_array(*shape), nan_array(*shape)
    rnd, rnd_rate = nan_array(len(conds), n_random, len(ev)), nan_array(len(conds), n_random, len(ev))
    for i, (_, basis) in enumerate(conds):
        res = _run_ablation(model, tokenizer, basis, evals, cfg, layers)
        score[i], rate[i] = _fill(res, ev, "score"), _fill(res, ev, "rate")
        for r in range(n_random):
            rb = random_like(basis, derive_seed(seed, 2, basis.shape[0], i, r))
            res = _run_ablation(model, tokenizer, rb, evals, cfg, layers)
            rnd[i, r], rnd_rate[i, r] = _fill(res, ev, "score"), _fill(res, ev, "rate")
    gen = cfg.generate
    from ..models import get_adapter

    return SubspaceAblationResult(
        conditions=[c for c, _ in conds], ranks=[int(b.shape[0]) for _, b in conds], evaluated=ev,
        baseline_score=np.asarray(_fill(base, ev, "score")), refusal_score=score, random_score=rnd.mean(1),
        random_score_std=rnd.std(1), baseline_rate=np.asarray(_fill(base, ev, "rate")) if gen else None,
        refusal_rate=rate if gen else None, random_rate=rnd_rate.mean(1) if gen else None,
        pca_center=pca.center, pca_normalize=pca.normalize, pca_layer=pca.layer,
        ablation_layers=None if layers is None else get_adapter(model).check_layers(layers),
        n_random=n_random, seed=seed, n_prompts={g: len(evals[g]) for g in ev}, eval_config=cfg.summary())
