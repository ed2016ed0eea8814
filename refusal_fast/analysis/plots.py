"""Matplotlib (Agg) figures for the analysis results.

Every function takes a result dataclass (or its ``to_dict()`` / JSON form), returns a
``matplotlib.figure.Figure`` and, with ``path``, also saves it as a PNG (the figure stays open;
call ``plt.close(fig)`` or use ``path`` with ``close=True``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..artifacts import write_figure  # noqa: E402

__all__ = [
    "plot_cosine", "plot_cosine_by_layer", "plot_pca", "plot_cross_ablation", "plot_subspace_ablation",
    "plot_persona_norms", "plot_steering_alpha", "plot_steering_layer", "plot_readd", "plot_knockout",
    "save_figure",
]

_DPI = 130


def _get(r: Any, key: str, default=None):
    if isinstance(r, dict):
        return r.get(key, default)
    return getattr(r, key, default)


def _arr(x) -> np.ndarray:
    """Nested lists / tensors with None -> float ndarray with NaN."""
    if x is None:
        return np.array([])
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(float)

    def conv(v):
        if isinstance(v, (list, tuple)):
            return [conv(u) for u in v]
        return np.nan if v is None else float(v)

    return np.asarray(conv(x), dtype=float)


def _short(label: str, n: int = 18) -> str:
    label = str(label).replace("_", " ")
    return label if len(label) <= n else label[: n - 1] + "…"


def save_figure(fig, path: str | Path | None, close: bool = False):
    """Save ``fig`` as PNG at ``path`` (atomically, parents created) if given; optionally close it. Returns ``fig``."""
    if path is not None:
        write_figure(fig, path, dpi=_DPI, bbox_inches="tight")
    if close:
        plt.close(fig)
    return fig


def _heatmap(ax, m: np.ndarray, rows, cols, *, cmap="RdBu_r", vmin=None, vmax=None, fmt="{:.2f}",
             cbar_label: str | None = None, fig=None):
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([_short(c) for c in cols], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r) for r in rows], fontsize=8)
    if m.size and m.size <= 150:
        lo, hi = im.get_clim()
        mid = (lo + hi) / 2
        span = (hi - lo) or 1.0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                v = m[i, j]
                txt = "n/a" if not np.isfinite(v) else fmt.format(v)
                dark = np.isfinite(v) and (abs(v - mid) > 0.3 * span if cmap == "RdBu_r" else v < mid)
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    if fig is not None:
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if cbar_label:
            cb.set_label(cbar_label, fontsize=8)
    return im


# --------------------------------------------------------------------------------------------
# categories


def plot_cosine(cos, layer: int | None = None, path=None, close: bool = False):
    """Cosine-similarity heatmap of the category directions (+ global): at the chosen layers
    (default) or at ``layer``."""
    labels = list(_get(cos, "labels"))
    if layer is None:
        m = _arr(_get(cos, "matrix"))
        layers = _get(cos, "chosen_layers") or []
        where = (f"layer {layers[0]}" if layers and len(set(layers)) == 1
                 else "each direction at its chosen layer")
    else:
        lay = list(_get(cos, "layers"))
        m = _arr(_get(cos, "by_layer"))[lay.index(layer)]
        where = f"layer {layer}"
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n + 1.5, 0.75 * n + 1.6))
    _heatmap(ax, m, labels, labels, vmin=-1, vmax=1, cbar_label="cosine similarity", fig=fig)
    ax.set_title(f"Cosine similarity of refusal directions\n({where})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, close)


def plot_cosine_by_layer(cos, path=None, close: bool = False):
    """Per layer: each category's cosine with the global direction, and the mean pairwise cosine."""
    labels = list(_get(cos, "labels"))
    layers = list(_get(cos, "layers"))
    bl = _arr(_get(cos, "by_layer"))
    n = len(labels) - 1
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("tab10")
    for i in range(n):
        ax.plot(layers, bl[:, i, n], marker="o", ms=3, lw=1.2, color=cmap(i % 10), label=_short(labels[i], 24))
    ax.plot(layers, _arr(_get(cos, "mean_offdiag_by_layer")), color="black", lw=2.2, ls="--",
            label="mean pairwise (categories)")
    ax.set_xlabel("layer (residual stream at block input)")
    ax.set_ylabel("cosine similarity")
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_title("Category direction vs global direction, by layer", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, close)


def plot_pca(pca, path=None, close: bool = False):
    """Left: explained-variance ratio per component with the cumulative curve and threshold;
    right: angle between each category direction and the top-k subspace."""
    ratios = _arr(_get(pca, "explained_variance_ratio"))
    cum = _arr(_get(pca, "cumulative"))
    thr = float(_get(pca, "threshold", 0.9))
    n90 = _get(pca, "n_components_90")
    labels = list(_get(pca, "labels"))
    ang = _arr(_get(pca, "angles_deg"))
    k = np.arange(1, len(ratios) + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(k, ratios, color="tab:blue", label="explained variance ratio")
    a1.plot(k, cum, "o-", color="tab:orange", label="cumulative")
    a1.axhline(thr, color="grey", ls="--", lw=1, label=f"{thr:.0%} threshold")
    if n90 is not None:
        a1.axvline(n90, color="tab:red", ls=":", lw=1.2, label=f"{n90} component(s) reach {thr:.0%}")
    a1.set_xticks(k)
    a1.set_xlabel("principal component")
    a1.set_ylabel("fraction of variance")
    a1.set_ylim(0, 1.05)
    centered = "centred" if _get(pca, "center") else "uncentred"
    a1.set_title(f"PCA spectrum of category directions ({centered})", fontsize=10)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3, axis="y")
    cmap = plt.get_cmap("tab10")
    for i, lab in enumerate(labels):
        if ang.size:
            a2.plot(k, ang[i], "o-", ms=3, color=cmap(i % 10), label=_short(lab, 24))
    a2.set_xticks(k)
    a2.set_xlabel("k (top-k principal components)")
    a2.set_ylabel("angle to top-k subspace (degrees)")
    a2.set_ylim(0, 92)
    a2.set_title("Angle between each category direction and the PCA subspace", fontsize=10)
    a2.legend(fontsize=7, loc="upper right", frameon=False)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, close)


def _score_panels(score: np.ndarray, rnd: np.ndarray, base: np.ndarray, rows, cols, title: str, what: str):
    """Two heatmaps (direction / random null) sharing one colour scale; baseline as the first row."""
    rows = ["(no ablation)"] + list(rows)
    m1 = np.vstack([base[None, :], score])
    m2 = np.vstack([base[None, :], rnd])
    finite = np.concatenate([m1[np.isfinite(m1)], m2[np.isfinite(m2)]])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    w = 1.0 + 0.8 * len(cols)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(2 * w + 3.5, 0.55 * len(rows) + 2.2))
    _heatmap(a1, m1, rows, cols, cmap="viridis", vmin=vmin, vmax=vmax, fig=None)
    im = _heatmap(a2, m2, rows, cols, cmap="viridis", vmin=vmin, vmax=vmax, fig=None)
    for a in (a1, a2):
        a.axhline(0.5, color="white", lw=2)
        a.set_xlabel("evaluated prompts")
    a1.set_ylabel("ablated direction")
    a2.set_yticklabels([])
    a1.set_title("ablating the direction", fontsize=9)
    a2.set_title("ablating a random direction (same norm, seeded)", fontsize=9)
    cb = fig.colorbar(im, ax=[a1, a2], fraction=0.03, pad=0.02)
    cb.set_label(what, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_cross_ablation(xab, path=None, close: bool = False, metric: str = "score"):
    """Cross-category ablation matrix (rows: ablated direction, columns: evaluated category), beside
    the random-direction null; ``metric="rate"`` plots the classifier refusal rate instead."""
    key = {"score": ("refusal_score", "random_score", "baseline_score", "mean refusal score (log-odds)"),
           "rate": ("refusal_rate", "random_rate", "baseline_rate", "refusal rate (classifier)")}[metric]
    if _get(xab, key[0]) is None:
        raise ValueError(f"the result has no {key[0]} (run with generation for metric='rate')")
    fig = _score_panels(_arr(_get(xab, key[0])), _arr(_get(xab, key[1])), _arr(_get(xab, key[2])),
                        _get(xab, "ablated"), _get(xab, "evaluated"),
                        "Cross-category ablation: refusal on held-out prompts", key[3])
    return save_figure(fig, path, close)


def plot_subspace_ablation(sub, path=None, close: bool = False):
    """Refusal score per evaluated category vs ablated subspace (top-k PCs, all categories), solid,
    beside the same-rank random subspace, dashed; baseline at the left."""
    conds = ["none"] + list(_get(sub, "conditions"))
    ev = list(_get(sub, "evaluated"))
    base = _arr(_get(sub, "baseline_score"))
    s = np.vstack([base[None, :], _arr(_get(sub, "refusal_score"))])
    r = np.vstack([base[None, :], _arr(_get(sub, "random_score"))])
    x = np.arange(len(conds))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(conds) + 3), 4.2))
    cmap = plt.get_cmap("tab10")
    for j, c in enumerate(ev):
        ax.plot(x, s[:, j], "o-", color=cmap(j % 10), label=_short(c, 24))
        ax.plot(x, r[:, j], "x--", color=cmap(j % 10), alpha=0.55)
    ax.plot([], [], "k-", label="subspace ablated")
    ax.plot([], [], "k--", alpha=0.55, label="random subspace (same rank)")
    ax.set_xticks(x)
    ax.set_xticklabels(conds, rotation=20)
    ax.set_xlabel("ablated subspace")
    ax.set_ylabel("mean refusal score (log-odds)")
    ax.set_title("Rank-k subspace ablation: refusal per category", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, close)


# --------------------------------------------------------------------------------------------
# persona


def plot_persona_norms(pd, path=None, close: bool = False):
    """Persona-direction norm per layer and the agreement of the individual persona prompts."""
    layers = list(_get(pd, "layers"))
    norms = _arr(_get(pd, "norms"))
    agree = _arr(_get(pd, "prompt_agreement"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    a1.plot(layers, norms, "o-")
    a1.set_xlabel("layer")
    a1.set_ylabel("|compliant − refusing|")
    a1.set_title("Persona direction norm by layer", fontsize=10)
    a1.grid(alpha=0.3)
    if agree.size:
        nc = len(_get(pd, "compliant_prompts") or [])
        rows = [f"compliant {i + 1}" for i in range(nc)] + [f"refusing {i + 1}" for i in range(agree.shape[0] - nc)]
        _heatmap(a2, agree, rows, [str(l) for l in layers], vmin=-1, vmax=1, fig=fig, fmt="{:.1f}",
                 cbar_label="cosine with persona direction")
        a2.set_xlabel("layer")
        a2.set_title("Agreement of each persona prompt", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, close)


def _unit_label(sw) -> str:
    if _get(sw, "norm_match"):
        return "α (fraction of residual norm)"
    if _get(sw, "alpha_unit") == "raw":
        return "α (absolute)"
    return "α (× persona-direction norm)"


def plot_steering_alpha(sw, path=None, close: bool = False):
    """Refusal (score; rate and degeneration when generated) vs α, one line per steering layer."""
    layers, alphas = list(_get(sw, "layers")), _arr(_get(sw, "alphas"))
    panels = [("refusal_score", "baseline_score", "mean refusal score (log-odds)")]
    if _get(sw, "refusal_rate") is not None:
        panels += [("refusal_rate", "baseline_rate", "refusal rate (classifier)"),
                   ("degeneration", "baseline_degeneration", "degenerate output rate")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.8, 4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (key, bkey, lab) in zip(axes[0], panels):
        m = _arr(_get(sw, key))
        for i, l in enumerate(layers):
            ax.plot(alphas, m[i], "o-", ms=3, color=cmap(0.85 * i / max(1, len(layers) - 1)), label=f"layer {l}")
        b = _get(sw, bkey)
        if b is not None:
            ax.axhline(float(b), color="red", ls="--", lw=1.2, label="no steering")
        ax.set_xlabel(_unit_label(sw))
        ax.set_ylabel(lab)
        if "rate" in key or key == "degeneration":
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_title("Persona steering: refusal on harmful prompts vs α", fontsize=10)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False,
                       ncol=1 if len(layers) <= 16 else 2)
    fig.tight_layout()
    return save_figure(fig, path, close)


def plot_steering_layer(sw, path=None, close: bool = False):
    """Refusal score vs steering layer, one line per α (plus the unsteered baseline)."""
    layers, alphas = list(_get(sw, "layers")), list(_arr(_get(sw, "alphas")))
    m = _arr(_get(sw, "refusal_score"))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    cmap = plt.get_cmap("plasma")
    for j, a in enumerate(alphas):
        ax.plot(layers, m[:, j], "o-", ms=3, color=cmap(j / max(1, len(alphas) - 1) * 0.85), label=f"α = {a:g}")
    ax.axhline(float(_get(sw, "baseline_score")), color="red", ls="--", lw=1.2, label="no steering")
    ax.set_xlabel("steering layer")
    ax.set_ylabel("mean refusal score (log-odds)")
    ax.set_title(f"Persona steering: refusal vs layer ({_unit_label(sw)})", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, close)


def plot_readd(rd, path=None, close: bool = False):
    """Refusal score with the refusal direction re-added at later layers while steering, beside
    random vectors of the same norm; baseline and steered-only levels as lines."""
    layers = list(_get(rd, "add_layers"))
    scales = list(_arr(_get(rd, "add_scales")))
    s, r, rs = _arr(_get(rd, "refusal_score")), _arr(_get(rd, "random_score")), _arr(_get(rd, "random_score_std"))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    cmap = plt.get_cmap("tab10")
    for j, sc in enumerate(scales):
        ax.plot(layers, s[:, j], "o-", color=cmap(j % 10), label=f"refusal direction ×{sc:g}")
        ax.errorbar(layers, r[:, j], yerr=rs[:, j], fmt="x--", color=cmap(j % 10), alpha=0.55, capsize=3,
                    label=f"random (same norm) ×{sc:g}")
    ax.axhline(float(_get(rd, "baseline_score")), color="red", ls="--", lw=1.2, label="no intervention")
    ax.axhline(float(_get(rd, "steered_score")), color="grey", ls=":", lw=1.5,
               label=f"steered only (layer {_get(rd, 'steer_layer')}, α={_get(rd, 'alpha'):g})")
    ax.set_xticks(layers)
    ax.set_xlabel("layer where the refusal direction is re-added")
    ax.set_ylabel("mean refusal score (log-odds)")
    ax.set_title("Late refusal re-add while persona-steering", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, close)


def plot_knockout(ko, path=None, close: bool = False):
    """Bars per window: steering + persona-direction knockout vs steering + random-direction
    knockout (mean ± std over seeds); baseline and steered-only levels as lines."""
    labels = list(_get(ko, "labels"))
    k = _arr(_get(ko, "knockout_score"))
    r, rs = _arr(_get(ko, "random_score")), _arr(_get(ko, "random_score_std"))
    x = np.arange(len(labels))
    base, steered = float(_get(ko, "baseline_score")), float(_get(ko, "steered_score"))
    allv = np.concatenate([k, r - rs, r + rs, [base, steered]])
    lo, hi = float(np.nanmin(allv)), float(np.nanmax(allv))
    bottom = lo - 0.15 * ((hi - lo) or 1.0)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) + 3), 4))
    w = 0.38
    ax.bar(x - w / 2, k - bottom, w, bottom=bottom, color="tab:purple", label="knock out persona direction")
    ax.bar(x + w / 2, r - bottom, w, bottom=bottom, yerr=rs, capsize=4, color="tab:gray",
           label=f"knock out random direction (n={_get(ko, 'n_random')})")
    ax.axhline(base, color="red", ls="--", lw=1.2, label="no intervention")
    ax.axhline(steered, color="black", ls=":", lw=1.5,
               label=f"steered only (layer {_get(ko, 'steer_layer')}, α={_get(ko, 'alpha'):g})")
    ax.set_ylim(bottom, hi + 0.1 * ((hi - lo) or 1.0))
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_xlabel("knockout window")
    ax.set_ylabel("mean refusal score (log-odds)")
    ax.set_title("Window knockout of the persona direction while steering", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path, close)
