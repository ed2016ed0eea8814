"""report.write_report on hand-written artifacts (no model needed)."""
import base64
import json
import re

import pytest

from refusal_fast.report import eval_summary_rows, format_summary_table, write_report

# A valid 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)

EVAL = {
    "format": "refusal_fast.eval", "version": 1, "model": "m", "classifier": "substring", "max_new_tokens": 8,
    "direction": {"layer": 4, "position": -1, "norm": 2.5, "actadd_layer": 4, "actadd_alpha": 1.0},
    "datasets": {"harmful": {"source": "harmful_val", "n": 4}, "harmless": {"source": "harmless_val", "n": 2}},
    "conditions": {
        "baseline": {"harmful": {"n": 4, "refusal_rate": 0.75, "mean_refusal_score": 1.25,
                                 "per_category": {"illegal": {"n": 4, "refusal_rate": 0.75}}},
                     "harmless": {"n": 2, "refusal_rate": 0.0, "mean_refusal_score": -3.5}},
        "ablate": {"harmful": {"n": 4, "refusal_rate": 0.25, "mean_refusal_score": -2.0},
                   "harmless": {"n": 2, "refusal_rate": 0.0, "mean_refusal_score": -3.75}},
        "actadd": {"harmless": {"n": 2, "refusal_rate": 0.5, "mean_refusal_score": 0.5}},
    },
    "kl_harmless": {"ablate": 0.0123, "actadd": 1.5},
    "examples": {"harmful": [{"instruction": "do <b>x</b>", "completions": {"baseline": "I can't", "ablate": "Sure"}}]},
}


def test_empty_directory_says_not_run_everywhere(tmp_path):
    html = write_report(tmp_path).read_text()
    for anchor in ("meta", "selection", "eval", "categories", "persona"):
        assert f"id='{anchor}'" in html
    assert html.count("not run") >= 4
    for cmd in ("refusal-fast select", "refusal-fast eval", "refusal-fast categories", "refusal-fast persona"):
        assert cmd in html


def test_eval_table_rows_and_formatting():
    rows = eval_summary_rows(EVAL)
    assert [r[0] for r in rows] == ["baseline (no intervention)", "directional ablation", "activation addition"]
    assert rows[0][1:] == ["75.0%", "0.0%", "1.250", "-3.500", "–"]
    assert rows[1][1:] == ["25.0%", "0.0%", "-2.000", "-3.750", "0.012"]
    assert rows[2][1:] == ["–", "50.0%", "–", "0.500", "1.500"]
    text = format_summary_table(rows)
    assert text.splitlines()[0].startswith("condition") and "75.0%" in text


def test_eval_section_and_escaping(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    html = write_report(tmp_path, title="T").read_text()
    for row in eval_summary_rows(EVAL):
        for cell in row:
            assert cell in html
    assert "do &lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html  # instructions are escaped
    assert "illegal" in html  # per-category table


def test_figures_are_embedded_and_page_is_self_contained(tmp_path):
    for name in ("selection_heatmap.png", "categories_cosine.png", "persona_knockout.png"):
        (tmp_path / name).write_bytes(PNG)
    (tmp_path / "selection.json").write_text(json.dumps({
        "format": "refusal_fast.selection", "layer": 2, "position": -1, "n_layers": 4, "positions": [-1],
        "position_labels": ["-1 '\\n'"], "baseline": {"harmful": 1.0, "harmless": -2.0},
        "params": {"prune_last_frac": 0.2, "kl_threshold": None, "induce_threshold": 0.0, "n_harmful": 3,
                   "n_harmless": 3},
        "table": [{"layer": 2, "position": -1, "bypass": -1.5, "induce": 0.5, "kl": 0.01, "norm": 3.0,
                   "filtered": None}],
    }))
    (tmp_path / "categories.json").write_text(json.dumps({"directions": {"categories": ["a", "b"], "counts": {}},
                                                          "cross_ablation": None}))
    (tmp_path / "persona.json").write_text(json.dumps({"sweep": {}, "readd": None}))
    html = write_report(tmp_path, tmp_path / "sub" / "r.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 3 and all(base64.b64decode(i) == PNG for i in imgs)
    assert not re.search(r'(src|href)="(https?:|file:|/)', html)  # nothing fetched from elsewhere
    assert "figure not available" in html  # categories_pca.png etc. are missing
    assert "Cross-category ablation: not run" in html and "re-add: not run" in html
    assert "layer <b>2</b>" in html and "KL &le; off" in html


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        write_report(tmp_path / "nope")


def test_corrupt_artifact_is_reported_not_raised(tmp_path):
    (tmp_path / "eval.json").write_text("{broken")
    html = write_report(tmp_path).read_text()
    assert "unreadable" in html
