"""Direction selection: batched sweep vs sequential vs an independent straightforward implementation."""
import json
import math

import pytest
import torch
from tiny_models import library_hooks

from refusal_fast import chat, datasets
from refusal_fast.evaluate import refusal_scores
from refusal_fast.extract import extract_means
from refusal_fast.interventions import ablate, add
from refusal_fast.select import NoDirectionError, SelectionResult, filter_reason, select_direction

N_VAL = 3


@pytest.fixture(scope="module")
def val():
    return datasets.instructions("harmful_val", n=N_VAL), datasets.instructions("harmless_val", n=N_VAL)


@pytest.fixture(scope="module")
def llama_means(llama, harmful, harmless):
    model, tok = llama
    return extract_means(model, tok, {"harmful": harmful, "harmless": harmless}, positions=[-3, -2, -1], progress=False)


@pytest.fixture(scope="module")
def gpt2_means(gpt2, harmful, harmless):
    model, tok = gpt2
    return extract_means(model, tok, {"harmful": harmful, "harmless": harmless}, positions=[-2, -1], progress=False)


def _full_logprobs(model, tok, prompts):
    """One prompt at a time, full logits, last position -> [n, vocab] float64 log-probs."""
    out = []
    for p in prompts:
        with torch.no_grad():
            out.append(torch.log_softmax(model(**chat.encode_prompts(tok, [p])).logits[0, -1].double(), -1))
    return torch.stack(out)


def _reference_table(model, tok, grid, layers, positions, harmful, harmless):
    """Straightforward procedure of Arditi et al.: loop over candidates with ablate / add contexts."""
    base = _full_logprobs(model, tok, harmless)
    rows = []
    for li, layer in enumerate(layers):
        for pi, pos in enumerate(positions):
            r = grid[li, pi]
            if float(r.norm()) == 0.0:
                rows.append((layer, pos, math.nan, math.nan, math.nan))
                continue
            with ablate(model, r / r.norm()):
                bypass = float(refusal_scores(model, tok, harmful).mean())
                lp = _full_logprobs(model, tok, harmless)
            kl = float((base.exp() * (base - lp)).sum(-1).mean())
            with add(model, r, layers=[layer]):
                induce = float(refusal_scores(model, tok, harmless).mean())
            rows.append((layer, pos, bypass, induce, kl))
    return rows


def _reference_choice(rows, n_layers, prune, kl_thr, ind_thr):
    keep = []
    for layer, pos, b, i, k in rows:
        if math.isnan(b) or math.isnan(i) or math.isnan(k):
            continue
        if layer >= int(n_layers * (1 - prune)) or k > kl_thr or i < ind_thr:
            continue
        keep.append((b, layer, pos))
    return min(keep)[1:] if keep else None


def _assert_table_matches(result, rows, atol=1e-4):
    assert len(result.table) == len(rows)
    for got, (layer, pos, b, i, k) in zip(result.table, rows):
        assert (got["layer"], got["position"]) == (layer, pos)
        for name, want in (("bypass", b), ("induce", i), ("kl", k)):
            if math.isnan(want):
                assert math.isnan(got[name])
            else:
                assert got[name] == pytest.approx(want, abs=atol), (name, layer, pos)


@pytest.mark.parametrize("fixture,means_fixture", [("llama", "llama_means"), ("gpt2", "gpt2_means")])
def test_batched_and_sequential_match_reference(fixture, means_fixture, request, val):
    model, tok = request.getfixturevalue(fixture)
    means = request.getfixturevalue(means_fixture)
    harmful_val, harmless_val = val
    grid = means.diff("harmful", "harmless")
    rows = _reference_table(model, tok, grid, means.layers, means.positions, harmful_val, harmless_val)
    finite = [r for r in rows if not math.isnan(r[2])]
    # thresholds from the data so that both filters bind (no hard-coded outcome)
    kls = sorted(r[4] for r in finite)
    inds = sorted(r[3] for r in finite)
    # midway between two observed values, so float noise cannot move a candidate across a threshold
    i, j = len(kls) * 3 // 4, len(inds) // 4
    kl_thr = (kls[i] + kls[i + 1]) / 2
    ind_thr = (inds[j - 1] + inds[j]) / 2
    n_layers = model.config.num_hidden_layers
    want = _reference_choice(rows, n_layers, 0.2, kl_thr, ind_thr)
    assert want is not None
    kw = dict(kl_threshold=kl_thr, induce_threshold=ind_thr, prune_last_frac=0.2, progress=False)
    seq = select_direction(model, tok, means, harmful_val, harmless_val, batched=False, batch_size=2, **kw)
    bat = select_direction(model, tok, means, harmful_val, harmless_val, batched=True, batch_size=3,
                           candidates_per_pass=4, **kw)
    for res in (seq, bat):
        _assert_table_matches(res, rows)
        assert (res.layer, res.position) == want
        d = grid[means.layers.index(res.layer), means.positions.index(res.position)]
        torch.testing.assert_close(res.raw, d)
        torch.testing.assert_close(res.direction, d / d.norm())
        assert res.direction.dtype == torch.float64 and res.direction.shape == (model.config.hidden_size,)
    reasons = {r["filtered"] for r in bat.table}
    assert {"kl", "late_layer", None} <= reasons
    assert [r["filtered"] for r in seq.table] == [r["filtered"] for r in bat.table]
    # baseline = the model without intervention
    assert bat.baseline["harmful"] == pytest.approx(float(refusal_scores(model, tok, harmful_val).mean()), abs=1e-5)
    # packing does not change the numbers: one row per pass, one candidate per group
    tiny = select_direction(model, tok, means, harmful_val, harmless_val, batched=True, batch_size=1,
                            candidates_per_pass=1, layers=means.layers[1:2], **kw)
    for r in tiny.table:
        assert r["bypass"] == pytest.approx(bat.row(r["layer"], r["position"])["bypass"], abs=1e-5)
        assert r["kl"] == pytest.approx(bat.row(r["layer"], r["position"])["kl"], abs=1e-5)


def test_zero_candidates_and_no_hooks_left(llama, llama_means, val):
    model, tok = llama
    harmful_val, harmless_val = val
    before = refusal_scores(model, tok, harmful_val)
    res = select_direction(model, tok, llama_means, harmful_val, harmless_val, kl_threshold=None,
                           induce_threshold=None, skip_pruned=True, progress=False)
    # layer 0 of a model without position embeddings: same eoi tokens -> identical means
    assert all(r["filtered"] == "zero_vector" and math.isnan(r["bypass"]) for r in res.table if r["layer"] == 0)
    assert all(r["filtered"] == "late_layer" and math.isnan(r["kl"]) for r in res.table if r["layer"] == 2)
    assert res.found and res.layer == 1
    assert not library_hooks(model)
    torch.testing.assert_close(refusal_scores(model, tok, harmful_val), before, atol=0, rtol=0)


def test_raw_tensor_input_equals_means(gpt2, gpt2_means, val):
    model, tok = gpt2
    harmful_val, harmless_val = val
    kw = dict(kl_threshold=None, induce_threshold=None, prune_last_frac=None, progress=False)
    a = select_direction(model, tok, gpt2_means, harmful_val, harmless_val, layers=[1, 2], positions=[-1], **kw)
    grid = gpt2_means.diff("harmful", "harmless")[1:3, 1:2]
    b = select_direction(model, tok, grid, harmful_val, harmless_val, layers=[1, 2], positions=[-1], **kw)
    assert [(r["layer"], r["position"]) for r in a.table] == [(1, -1), (2, -1)]
    for ra, rb in zip(a.table, b.table):
        assert ra == pytest.approx(rb)
    assert (a.layer, a.position) == (b.layer, b.position)


def test_no_survivor(gpt2, gpt2_means, val, tmp_path):
    model, tok = gpt2
    harmful_val, harmless_val = val
    kw = dict(positions=[-1], induce_threshold=1e9, progress=False)
    with pytest.raises(NoDirectionError, match=r"no candidate direction survived[\s\S]*layer +\d+ pos +-1") as ei:
        select_direction(model, tok, gpt2_means, harmful_val, harmless_val, **kw)
    res = ei.value.result
    assert not res.found and len(res.table) == 3
    assert res.to_json(tmp_path / "none.json").exists()
    assert res.heatmap(tmp_path / "none.png").stat().st_size > 0
    res2 = select_direction(model, tok, gpt2_means, harmful_val, harmless_val, raise_if_none=False, **kw)
    assert res2.layer is None and res2.direction is None and not res2.found


def test_json_roundtrip_and_heatmap(gpt2, gpt2_means, val, tmp_path):
    model, tok = gpt2
    harmful_val, harmless_val = val
    res = select_direction(model, tok, gpt2_means, harmful_val, harmless_val, kl_threshold=None,
                           induce_threshold=None, progress=False)
    p = res.to_json(tmp_path / "sel.json")
    data = json.loads(p.read_text())  # strict JSON (NaN written as null)
    assert data["layer"] == res.layer and len(data["table"]) == len(res.table)
    back = SelectionResult.from_json(p)
    assert (back.layer, back.position) == (res.layer, res.position)
    torch.testing.assert_close(back.direction, res.direction)
    g = res.grid("bypass")
    assert g.shape == (3, 2)
    torch.testing.assert_close(back.grid("bypass"), g, equal_nan=True)
    png = res.heatmap(tmp_path / "heat.png")
    head = png.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"
    assert "'" in "".join(res.position_labels)  # positions labelled with their eoi token


def test_refilter_equals_selecting_with_those_filters(gpt2, gpt2_means, val):
    """Re-applying filters to stored scores gives what a fresh select_direction with them gives."""
    model, tok = gpt2
    harmful_val, harmless_val = val
    strict = select_direction(model, tok, gpt2_means, harmful_val, harmless_val, kl_threshold=-1.0,
                              induce_threshold=None, progress=False, raise_if_none=False)
    assert not strict.found and {r["filtered"] for r in strict.table} <= {"kl", "late_layer"}
    fresh = select_direction(model, tok, gpt2_means, harmful_val, harmless_val, kl_threshold=None,
                             induce_threshold=None, progress=False)
    re = strict.refilter(gpt2_means, kl_threshold=None)
    assert (re.layer, re.position) == (fresh.layer, fresh.position)
    assert [r["filtered"] for r in re.table] == [r["filtered"] for r in fresh.table]
    torch.testing.assert_close(re.raw, fresh.raw)
    torch.testing.assert_close(re.direction, fresh.direction)
    assert re.params["kl_threshold"] is None and re.params["induce_threshold"] is None
    assert strict.params["kl_threshold"] == -1.0  # the original is untouched
    # omitted filters keep their values; a filter that removes everything raises as select_direction does
    with pytest.raises(NoDirectionError):
        re.refilter(gpt2_means, kl_threshold=-1.0)
    assert not re.refilter(gpt2_means, prune_last_frac=1.0, raise_if_none=False).found
    # after a JSON round trip too, and only with the means that were scored
    with pytest.raises(ValueError, match="do not match"):
        strict.refilter(gpt2_means.diff("harmful", "harmless") * 2, kl_threshold=None)
    with pytest.raises(ValueError, match="kl_threshold"):
        strict.refilter(gpt2_means, kl_threshold=float("nan"))


def test_filter_reason_rules():
    assert filter_reason(math.nan, 0, 0, 0, 10) == "nan"
    # int(n_layers * (1 - frac)) as in the reference: 3 layers -> layer 2 pruned; 32 layers -> 25..31
    assert filter_reason(-1, 1, 0, 2, 3) == "late_layer"
    assert filter_reason(-1, 1, 0, 1, 3) is None
    assert filter_reason(-1, 1, 0, 25, 32) == "late_layer"
    assert filter_reason(-1, 1, 0, 24, 32) is None
    assert filter_reason(-1, 1, 0.2, 0, 10) == "kl"
    assert filter_reason(-1, -0.5, 0.05, 0, 10) == "induce"
    assert filter_reason(-1, -0.5, 0.2, 9, 10, prune_last_frac=None, kl_threshold=None, induce_threshold=None) is None
    assert filter_reason(-1, 0.0, 0.1, 0, 10) is None  # thresholds are inclusive


def test_bad_input(gpt2, gpt2_means, val):
    model, tok = gpt2
    harmful_val, harmless_val = val
    d = model.config.hidden_size
    n_layers = model.config.num_hidden_layers
    run = lambda cands, h=harmful_val, hl=harmless_val, **kw: select_direction(  # noqa: E731
        model, tok, cands, h, hl, progress=False, **kw)
    with pytest.raises(ValueError, match="harmful_val is empty"):
        run(gpt2_means, h=[])
    with pytest.raises(ValueError, match="harmless_val is empty"):
        run(gpt2_means, hl=[])
    with pytest.raises(TypeError, match="harmful_val must be a list"):
        run(gpt2_means, h="one prompt")
    with pytest.raises(ValueError, match=r"\[n_layers, n_positions, d_model\]"):
        run(torch.randn(n_layers, d))
    with pytest.raises(ValueError, match="2 layer rows but 3 layers"):
        run(torch.randn(2, 1, d), layers=[0, 1, 2])
    with pytest.raises(ValueError, match="pass layers="):
        run(torch.randn(2, 1, d))
    with pytest.raises(ValueError, match="1 position columns but 2 positions"):
        run(torch.randn(n_layers, 1, d), positions=[-2, -1])
    with pytest.raises(ValueError, match="d_model"):
        run(torch.randn(n_layers, 1, d + 1))
    with pytest.raises(ValueError, match="out of range"):
        run(torch.randn(1, 1, d), layers=[n_layers])
    bad = torch.randn(n_layers, 1, d)
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        run(bad)
    with pytest.raises(TypeError, match="Means or a"):
        run([[0.0] * d])
    with pytest.raises(ValueError, match="not extracted"):
        run(gpt2_means, layers=[7])
    with pytest.raises(KeyError):
        run(gpt2_means, groups=("a", "b"))
    with pytest.raises(ValueError, match="candidates_per_pass"):
        run(gpt2_means, candidates_per_pass=0)
    with pytest.raises(ValueError, match="prune_last_frac"):
        run(gpt2_means, prune_last_frac=1.5)
    with pytest.raises(ValueError, match="kl_threshold"):
        run(gpt2_means, kl_threshold=math.nan)


def test_refilter_relaxing_kl_stops_at_the_first_threshold_that_passes(gpt2, gpt2_means, val):
    """KLs forced to 0.3 / 0.7 / 5: the relaxation stops at 0.5 and picks the 0.3 candidate even though the
    0.7 one has the better bypass score; with KLs all above 1 it ends with the filter off."""
    import dataclasses

    model, tok = gpt2
    harmful_val, harmless_val = val
    strict = select_direction(model, tok, gpt2_means, harmful_val, harmless_val, kl_threshold=0.1,
                              induce_threshold=None, progress=False, raise_if_none=False)
    rows = sorted((r for r in strict.table if r["filtered"] in (None, "kl")), key=lambda r: r["bypass"])
    assert len(rows) >= 3
    forced = {(rows[0]["layer"], rows[0]["position"]): 0.7, (rows[1]["layer"], rows[1]["position"]): 0.3}
    table = [dict(r, kl=forced.get((r["layer"], r["position"]), 5.0)) for r in strict.table]
    scored = dataclasses.replace(strict, table=table)
    res = scored.refilter_relaxing_kl(gpt2_means)
    assert res.params["kl_threshold"] == 0.5
    assert (res.layer, res.position) == (rows[1]["layer"], rows[1]["position"])
    assert scored.refilter_relaxing_kl(gpt2_means, thresholds=(0.2, 1.0)).params["kl_threshold"] == 1.0
    high = dataclasses.replace(strict, table=[dict(r, kl=5.0) for r in strict.table])
    off = high.refilter_relaxing_kl(gpt2_means)
    assert off.params["kl_threshold"] is None and (off.layer, off.position) == (rows[0]["layer"], rows[0]["position"])
    # a result whose own threshold already lets a candidate through is kept as it is
    kept = scored.refilter(gpt2_means, kl_threshold=0.5).refilter_relaxing_kl(gpt2_means)
    assert kept.params["kl_threshold"] == 0.5 and (kept.layer, kept.position) == (res.layer, res.position)
    # thresholds at or below the current one are skipped; nothing at all passing still raises
    assert scored.refilter_relaxing_kl(gpt2_means, thresholds=(0.05, 0.5)).params["kl_threshold"] == 0.5
    with pytest.raises(NoDirectionError):
        scored.refilter(gpt2_means, prune_last_frac=1.0, raise_if_none=False).refilter_relaxing_kl(gpt2_means)
