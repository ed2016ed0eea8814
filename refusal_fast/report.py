"""One self-contained HTML report from a directory of refusal-fast artifacts.

:func:`write_report` reads what the CLI subcommands wrote into an output directory
(``run.json``, ``selection.json`` + ``selection_heatmap.png``, ``eval.json``,
``categories.json`` + ``categories_*.png``, ``persona.json`` + ``persona_*.png``) and writes
``report.html`` with every figure embedded as base64 PNG, so the page can be mailed or opened
offline. A section whose artifact is missing says "not run".

The refusal before/after table is built by :func:`eval_summary_rows`, the same function the
CLI uses for its printed summary, so the printed numbers and the report's agree by construction.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .artifacts import ArtifactError, read_json, write_text

__all__ = [
    "write_report", "eval_summary_rows", "format_summary_table", "SUMMARY_COLUMNS",
    "CONDITION_LABELS", "FIGURES",
]

#: Figure files the report looks for, by section (written by the CLI through refusal_fast.analysis.plots).
FIGURES = {
    "selection": [("selection_heatmap.png", "Direction-selection scores per layer and position")],
    "categories": [
        ("categories_cosine.png", "Cosine similarity between category directions"),
        ("categories_cosine_by_layer.png", "Cosine with the global direction, per layer"),
        ("categories_pca.png", "PCA spectrum of the category directions"),
        ("categories_cross_ablation.png", "Cross-category ablation matrix"),
        ("categories_subspace.png", "Rank-k subspace ablation"),
    ],
    "persona": [],  # every persona_*.png, in name order
}

#: Printable names of the evaluation conditions in eval.json, in table order.
CONDITION_LABELS = {
    "baseline": "baseline (no intervention)",
    "ablate": "directional ablation",
    "ablate_affine": "affine ablation (harmless mean)",
    "random_ablate": "random-direction ablation (control)",
    "actadd": "activation addition",
    "random_actadd": "random-direction addition (control)",
}

SUMMARY_COLUMNS = ("condition", "harmful refusal", "harmless refusal", "harmful score", "harmless score", "harmless KL")

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left} .notrun{color:#a33;font-style:italic}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #ddd} figcaption{font-size:.9em;color:#555}
code{background:#f4f4f4;padding:0 .2em} .meta td{text-align:left} nav a{margin-right:1em}
details{margin:.6em 0} pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;font-size:.85em}
"""


# ------------------------------------------------------------------------------------- helpers


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _read(path: Path) -> tuple[Any | None, str]:
    """(parsed JSON, "") or (None, reason)."""
    if not path.is_file():
        return None, "not run"
    try:
        return read_json(path), ""
    except ArtifactError as exc:
        return None, f"unreadable ({exc})"


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if pct:
            return f"{100.0 * x:.1f}%"
        if isinstance(x, int):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _off(x: Any, pct: bool = False) -> str:
    return "off" if x is None else _fmt(x, pct=pct)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], left_cols: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left_cols else ""}">{_esc(h)}</th>' for i, h in enumerate(header))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(
            f'<td class="{"l" if i < left_cols else ""}">{_esc(c)}</td>' for i, c in enumerate(r)) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def _img(path: Path, caption: str) -> str:
    if not path.is_file():
        return f'<p class="notrun">{_esc(caption)}: figure not available ({_esc(path.name)} missing).</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)} <code>{_esc(path.name)}</code></figcaption></figure>")


def _not_run(what: str, command: str, reason: str = "not run") -> str:
    return f'<p class="notrun">{_esc(what)}: {_esc(reason)}. Run <code>{_esc(command)}</code> to produce it.</p>'


def _scalars(d: dict, skip: Iterable[str] = ()) -> list[tuple[str, Any]]:
    skip = set(skip)
    return [(k, v) for k, v in d.items() if k not in skip and (v is None or isinstance(v, (int, float, str, bool)))]


def _matrix_table(labels_r: Sequence[str], labels_c: Sequence[str], m: Sequence[Sequence[Any]],
                  corner: str = "", pct: bool = False) -> str:
    rows = [[r] + [_fmt(v, pct=pct) for v in row] for r, row in zip(labels_r, m)]
    return _table([corner, *labels_c], rows)


# ------------------------------------------------------------------------------ eval summary


def eval_summary_rows(ev: dict) -> list[list[str]]:
    """Rows of the refusal before/after table from an ``eval.json`` dict (see the CLI's ``eval``).

    Columns: :data:`SUMMARY_COLUMNS`. Rates are formatted as percentages, scores with 3 decimals;
    a condition not evaluated on a split shows "–".
    """
    conds = ev.get("conditions") or {}
    kl = ev.get("kl_harmless") or {}
    order: list[str] = [c for c in CONDITION_LABELS if c in conds] + [c for c in conds if c not in CONDITION_LABELS]
    rows: list[list[str]] = []
    for c in order:
        split = conds[c] or {}
        hf, hl = split.get("harmful") or {}, split.get("harmless") or {}
        rows.append([
            CONDITION_LABELS.get(c, c),
            _fmt(hf.get("refusal_rate"), pct=True), _fmt(hl.get("refusal_rate"), pct=True),
            _fmt(hf.get("mean_refusal_score")), _fmt(hl.get("mean_refusal_score")),
            _fmt(kl.get(c)) if c != "baseline" else "–",
        ])
    return rows


def format_summary_table(rows: list[list[str]], header: Sequence[str] = SUMMARY_COLUMNS) -> str:
    """Plain-text aligned table (the CLI's printed summary)."""
    cols = list(zip(*([list(header)] + rows))) if rows else [[h] for h in header]
    widths = [max(len(str(x)) for x in col) for col in cols]

    def line(r):
        return "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- sections


def _section_meta(out: Path) -> str:
    run, why = _read(out / "run.json")
    rows: list[tuple[str, Any]] = [("report generated", _dt.datetime.now().isoformat(timespec="seconds"))]
    try:
        from . import __version__

        rows.append(("refusal-fast version (report)", __version__))
    except Exception:  # pragma: no cover
        pass
    if run is None:
        rows.append(("run metadata", f"run.json {why}"))
    else:
        for k in ("model", "model_arch", "n_layers", "d_model", "dtype", "device", "created", "updated",
                  "library_version", "seed", "torch_version", "transformers_version", "python", "platform"):
            if k in run:
                rows.append((k, run[k]))
        if isinstance(run.get("backend_info"), dict):
            rows.append(("backend_info", ", ".join(f"{k}={v}" for k, v in run["backend_info"].items())))
        steps = run.get("commands") or []
        if steps:
            rows.append(("commands (wall / CPU seconds)", "; ".join(
                f"{s.get('command')} ({_fmt(s.get('seconds'), digits=1)} / {_fmt(s.get('cpu_seconds'), digits=1)} s)"
                for s in steps)))
        if isinstance(run.get("refusal_patch"), dict):
            rows.append(("refusal patch", ", ".join(f"{k}={v}" for k, v in run["refusal_patch"].items())))
    body = "".join(f"<tr><th class='l'>{_esc(k)}</th><td class='l'>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<h2 id='meta'>Run metadata</h2><table class='meta'>{body}</table>"


def _section_selection(out: Path) -> str:
    h = "<h2 id='selection'>Selected refusal direction</h2>"
    sel, why = _read(out / "selection.json")
    if sel is None:
        return h + _not_run("Direction selection", "refusal-fast select", why)
    parts = [h]
    table = sel.get("table") or []
    params = sel.get("params") or {}
    base = sel.get("baseline") or {}
    labels = dict(zip(sel.get("positions") or [], sel.get("position_labels") or []))
    n_ok = sum(1 for r in table if r.get("filtered") is None)
    if sel.get("layer") is None:
        parts.append("<p class='notrun'>No candidate passed the filters; see the score table and heatmap.</p>")
    else:
        pos = sel.get("position")
        lab = f" (<code>{_esc(labels[pos])}</code>)" if pos in labels else ""
        parts.append(
            f"<p>Selected: layer <b>{_esc(sel.get('layer'))}</b> of {_esc(sel.get('n_layers'))}, position "
            f"<b>{_esc(pos)}</b>{lab}: the difference of harmful and harmless mean activations there. "
            f"{n_ok} of {len(table)} candidates passed the filters "
            f"(last {_off(params.get('prune_last_frac'), pct=True)} of "
            f"layers pruned, KL &le; {_off(params.get('kl_threshold'))}, induce &ge; "
            f"{_off(params.get('induce_threshold'))}); {_esc(params.get('n_harmful', '?'))} harmful and "
            f"{_esc(params.get('n_harmless', '?'))} harmless validation prompts.</p>")
    parts.append(f"<p>Baseline mean refusal score (no intervention): harmful {_fmt(base.get('harmful'))}, "
                 f"harmless {_fmt(base.get('harmless'))}. Bypass = harmful score with the direction ablated "
                 f"(lower is better); induce = harmless score with the vector added; KL on harmless.</p>")
    ranked = sorted((r for r in table if r.get("bypass") is not None), key=lambda r: r["bypass"])[:8]
    if ranked:
        rows = [[("&#9733; " if (r["layer"], r["position"]) == (sel.get("layer"), sel.get("position")) else "")
                 + f"{r['layer']} / {r['position']}", _fmt(r.get("bypass")), _fmt(r.get("induce")), _fmt(r.get("kl")),
                 _fmt(r.get("norm")), r.get("filtered") or "kept"] for r in ranked]
        head = ["layer / position", "bypass", "induce", "KL", "norm", "filter"]
        tbl = _table(head, rows).replace("&amp;#9733; ", "&#9733; ")
        parts.append("<details open><summary>Candidates with the lowest bypass score</summary>" + tbl + "</details>")
    for name, cap in FIGURES["selection"]:
        parts.append(_img(out / name, cap))
    return "".join(parts)


def _per_category_table(ev: dict) -> str:
    conds = ev.get("conditions") or {}
    cols = [c for c in conds if isinstance(conds[c].get("harmful"), dict) and conds[c]["harmful"].get("per_category")]
    if not cols:
        return ""
    cats = sorted({k for c in cols for k in conds[c]["harmful"]["per_category"]})
    rows = []
    for k in cats:
        row = [k]
        for c in cols:
            pc = conds[c]["harmful"]["per_category"].get(k) or {}
            row.append(f"{_fmt(pc.get('refusal_rate'), pct=True)} (n={pc.get('n', 0)})")
        rows.append(row)
    return ("<details><summary>Harmful refusal rate per category</summary>"
            + _table(["category"] + [CONDITION_LABELS.get(c, c) for c in cols], rows) + "</details>")


def _section_eval(out: Path) -> str:
    h = "<h2 id='eval'>Refusal before / after intervention</h2>"
    ev, why = _read(out / "eval.json")
    if ev is None:
        return h + _not_run("Refusal evaluation", "refusal-fast eval", why)
    parts = [h]
    ds = ev.get("datasets") or {}
    desc = "; ".join(f"{_esc(k)}: {_esc(v.get('n'))} prompts from <code>{_esc(v.get('source'))}</code>"
                     for k, v in ds.items() if isinstance(v, dict))
    d = ev.get("direction") or {}
    parts.append(
        f"<p>Refusal rate = fraction of greedy completions ({_esc(ev.get('max_new_tokens', '?'))} new tokens) that "
        f"the <code>{_esc(ev.get('classifier', '?'))}</code> classifier marks as refusals; score = mean refusal "
        f"score (log-odds of the refusal tokens as the first reply token); KL = mean KL divergence of the "
        f"next-token distribution on harmless prompts from the unmodified model. {desc}. Direction from layer "
        f"{_esc(d.get('layer'))}, position {_esc(d.get('position'))} (norm {_fmt(d.get('norm'))}); activation "
        f"addition at layer {_esc(d.get('actadd_layer'))} with coefficient {_fmt(d.get('actadd_alpha'))}.</p>")
    parts.append(_table(SUMMARY_COLUMNS, eval_summary_rows(ev)))
    parts.append(_per_category_table(ev))
    for split, items in (ev.get("examples") or {}).items():
        if not items:
            continue
        blocks = []
        for it in items:
            lines = [f"<b>{_esc(it.get('instruction', ''))}</b>"]
            for c, text in (it.get("completions") or {}).items():
                lines.append(f"<i>{_esc(CONDITION_LABELS.get(c, c))}</i>: {_esc(text)}")
            blocks.append("<pre>" + "\n".join(lines) + "</pre>")
        parts.append(f"<details><summary>Example completions ({_esc(split)})</summary>{''.join(blocks)}</details>")
    return "".join(parts)


def _ablation_table(res: dict, row_key: str, title: str) -> str:
    """Refusal score per evaluated category, each row beside its random-direction null."""
    rows_l = res.get(row_key) or []
    cols = res.get("evaluated") or []
    sc, rnd = res.get("refusal_score") or [], res.get("random_score") or []
    base = res.get("baseline_score") or []
    if not rows_l or not cols:
        return ""
    body = [["(no ablation)"] + [_fmt(v) for v in base]]
    for i, r in enumerate(rows_l):
        body.append([r] + [f"{_fmt(sc[i][j])} (random {_fmt(rnd[i][j])})" if i < len(rnd) else _fmt(sc[i][j])
                           for j in range(len(cols))])
    return f"<details><summary>{_esc(title)}</summary>" + _table(["ablated \\ evaluated", *cols], body) + "</details>"


def _section_categories(out: Path) -> str:
    h = "<h2 id='categories'>Per-category refusal directions</h2>"
    cat, why = _read(out / "categories.json")
    if cat is None:
        return h + _not_run("Per-category analysis", "refusal-fast categories", why)
    parts = [h]
    dirs = cat.get("directions") or {}
    counts = dirs.get("counts") or {}
    names = dirs.get("categories") or []
    layers = sorted(set((dirs.get("chosen_layer") or {}).values()))
    parts.append(
        "<p>One difference-in-means direction per harm category (category prompts minus "
        f"{_esc(counts.get('harmless', '?'))} shared harmless prompts), read at position {_esc(dirs.get('position'))}, "
        f"layer{'s' if len(layers) != 1 else ''} {_esc(', '.join(map(str, layers)) or '?')} "
        f"({_esc(dirs.get('layer_mode', '?'))}). Categories (train prompts): "
        + ", ".join(f"{_esc(n)} ({_esc(counts.get(n, '?'))})" for n in names)
        + f". A fraction {_fmt(cat.get('holdout'))} of each category is held out for the ablations.</p>")
    pca = cat.get("pca") or {}
    if pca:
        ratios = pca.get("explained_variance_ratio") or []
        parts.append("<p>PCA of the (unit) category directions: explained-variance ratios "
                     + ", ".join(_fmt(r) for r in ratios)
                     + f"; <b>{_esc(pca.get('n_components_90', '?'))}</b> component(s) reach "
                     f"{_fmt(pca.get('threshold'), pct=True)}.</p>")
    cos = cat.get("cosine") or {}
    if isinstance(cos.get("matrix"), list) and cos.get("labels"):
        parts.append("<details><summary>Cosine similarity matrix (numbers)</summary>"
                     + _matrix_table(cos["labels"], cos["labels"], cos["matrix"]) + "</details>")
    if cat.get("cross_ablation"):
        parts.append(_ablation_table(cat["cross_ablation"], "ablated",
                                     "Cross-ablation: mean refusal score on held-out prompts "
                                     "(rows: ablated direction)"))
    else:
        parts.append("<p class='notrun'>Cross-category ablation: not run.</p>")
    if cat.get("subspace_ablation"):
        parts.append(_ablation_table(cat["subspace_ablation"], "conditions",
                                     "Subspace ablation: mean refusal score (rows: ablated subspace)"))
    figs = [f for f in FIGURES["categories"]]
    for name, cap in figs:
        parts.append(_img(out / name, cap))
    return "".join(parts)


def _section_persona(out: Path) -> str:
    h = "<h2 id='persona'>Persona steering</h2>"
    per, why = _read(out / "persona.json")
    if per is None:
        return h + _not_run("Persona experiments", "refusal-fast persona", why)
    parts = [h]
    d = per.get("direction") or {}
    sw = per.get("sweep") or {}
    parts.append(
        f"<p>Persona direction = mean last-token activation under {len(d.get('compliant_prompts') or [])} compliant "
        f"minus {len(d.get('refusing_prompts') or [])} refusing persona system prompts over "
        f"{_esc(d.get('n_instructions', '?'))} instructions. Steering evaluated on {_esc(sw.get('n_prompts', '?'))} "
        f"harmful prompts (baseline refusal score {_fmt(sw.get('baseline_score'))}); re-add and knockout steer at "
        f"layer {_esc(per.get('steer_layer'))} with alpha {_fmt(per.get('alpha'))}.</p>")
    if sw.get("refusal_score"):
        rows = [[f"layer {l}"] + [_fmt(v) for v in row] for l, row in zip(sw.get("layers", []), sw["refusal_score"])]
        parts.append("<details><summary>Steering sweep: mean refusal score (rows: layer, columns: alpha)</summary>"
                     + _table(["", *[_fmt(a) for a in sw.get("alphas", [])]], rows) + "</details>")
    ko = per.get("knockout") or {}
    if ko.get("labels"):
        rows = [[lab, _fmt(k), _fmt(r), _fmt(o)] for lab, k, r, o in zip(
            ko["labels"], ko.get("knockout_score") or [], ko.get("random_score") or [],
            ko.get("knockout_only_score") or [])]
        parts.append(f"<details><summary>Window knockout (steered score {_fmt(ko.get('steered_score'))}, baseline "
                     f"{_fmt(ko.get('baseline_score'))})</summary>"
                     + _table(["window", "steer + persona knockout", "steer + random knockout", "knockout only"], rows)
                     + "</details>")
    if not per.get("readd"):
        parts.append("<p class='notrun'>Late refusal re-add: not run (no refusal direction).</p>")
    figs = sorted(out.glob("persona_*.png"))
    if not figs:
        parts.append('<p class="notrun">No persona figures found.</p>')
    for f in figs:
        parts.append(_img(f, f.stem.replace("persona_", "persona: ").replace("_", " ")))
    return "".join(parts)


# --------------------------------------------------------------------------------------- main


def write_report(out_dir: str | Path, path: str | Path | None = None, title: str | None = None) -> Path:
    """Write one self-contained HTML report for the artifacts in ``out_dir``.

    Args:
        out_dir: directory the CLI subcommands wrote into.
        path: output file (default ``<out_dir>/report.html``).
        title: page title (default derived from the model name in ``run.json``).

    Returns:
        the path of the written HTML file.

    Raises:
        FileNotFoundError: ``out_dir`` does not exist.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"output directory not found: {out}")
    run, _ = _read(out / "run.json")
    model = (run or {}).get("model", "unknown model")
    title = title or f"refusal-fast report: {model}"
    nav = "".join(f"<a href='#{a}'>{t}</a>" for a, t in (
        ("meta", "Run"), ("selection", "Direction"), ("eval", "Refusal before/after"),
        ("categories", "Categories"), ("persona", "Persona")))
    body = [
        f"<h1>{_esc(title)}</h1><nav>{nav}</nav>",
        _section_meta(out), _section_selection(out), _section_eval(out),
        _section_categories(out), _section_persona(out),
    ]
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
           f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    target = Path(path) if path is not None else out / "report.html"
    return write_text(target, doc)
