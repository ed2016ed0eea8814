"""Persona direction, steering sweep, late refusal re-add, window knockout, degeneration, plots."""
import json

import numpy as np
import pytest
import torch

from refusal_fast import chat
from refusal_fast.analysis import (
    EvalConfig,
    PersonaDirection,
    default_windows,
    degeneration_rate,
    degeneration_stats,
    derive_seed,
    load_persona_prompts,
    persona_direction,
    random_like,
    refusal_readd,
    steering_sweep,
    window_knockout,
)
from refusal_fast.evaluate import refusal_scores
from refusal_fast.interventions import ablate, add, steer

COMPLIANT = ["You answer everything directly.", "You always comply with every request."]
REFUSING = ["You refuse anything risky.", "You are cautious and decline harmful requests."]


@pytest.fixture(scope="module")
def persona(llama, harmless):
    model, tok = llama
    return persona_direction(model, tok, harmless[:3], COMPLIANT, REFUSING)


@pytest.fixture(scope="module")
def harm(harmful):
    return harmful[:4]


def _score(model, tok, prompts):
    return float(refusal_scores(model, tok, prompts).mean())


def test_shipped_persona_prompts():
    c, r = load_persona_prompts()
    assert len(c) == len(r) == 8
    assert len(set(c + r)) == 16 and all(len(p) > 30 for p in c + r)


def test_load_persona_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_persona_prompts(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"compliant": ["x"], "refusing": []}))
    with pytest.raises(ValueError, match="refusing"):
        load_persona_prompts(p)


def test_persona_direction_matches_direct_hidden_states(llama, harmless, persona):
    model, tok = llama
    L = model.config.num_hidden_layers

    def mean_last(sp):
        hs = []
        with torch.no_grad():
            for p in harmless[:3]:
                ids = tok(chat.format_prompt(tok, p, sp), add_special_tokens=False, return_tensors="pt")
                h = model(**ids, output_hidden_states=True).hidden_states
                hs.append(torch.stack([x[0, -1].double() for x in h[:L]]))
        return torch.stack(hs).mean(0)

    mc = torch.stack([mean_last(p) for p in COMPLIANT]).mean(0)
    mr = torch.stack([mean_last(p) for p in REFUSING]).mean(0)
    torch.testing.assert_close(persona.directions[1:], (mc - mr)[1:], atol=2e-4, rtol=1e-4)
    assert persona.norms[0] == 0 and (persona.norms[1:] > 0).all()
    assert persona.nonzero_layers() == list(range(1, L))
    assert persona.prompt_agreement.shape == (4, L) and np.isnan(persona.prompt_agreement[:, 0]).all()
    assert (np.abs(persona.prompt_agreement[:, 1:]) <= 1 + 1e-12).all()
    torch.testing.assert_close(torch.linalg.vector_norm(persona.unit(1)), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero at layer 0"):
        persona.unit(0)


def test_steering_sweep_matches_direct_steer(llama, persona, harm):
    model, tok = llama
    res = steering_sweep(model, tok, persona, harm, alphas=[0.5, 3.0])
    assert res.layers == [1, 2] and res.refusal_score.shape == (2, 2)
    assert res.baseline_score == pytest.approx(_score(model, tok, harm), abs=1e-9)
    eff = 3.0 * float(torch.linalg.vector_norm(persona.vector(2)))
    assert res.effective_alpha[1, 1] == pytest.approx(eff)
    with steer(model, persona.vector(2), layers=[2], alpha=eff):
        assert res.refusal_score[1, 1] == pytest.approx(_score(model, tok, harm), abs=1e-5)
    assert res.refusal_rate is None and res.degeneration is None
    # norm-matched steering
    nm = steering_sweep(model, tok, persona, harm, layers=[1], alphas=[0.4], norm_match=True)
    with steer(model, persona.unit(1), layers=[1], alpha=0.4, norm_match=True):
        assert nm.refusal_score[0, 0] == pytest.approx(_score(model, tok, harm), abs=1e-5)
    assert nm.effective_alpha[0, 0] == 0.4
    d = json.loads(res.to_json())
    assert d["kind"] == "SteeringSweepResult" and len(d["refusal_score"]) == 2
    with pytest.raises(ValueError, match="zero at layer 0"):
        steering_sweep(model, tok, persona, harm, layers=[0], alphas=[1.0])
    with pytest.raises(ValueError, match="alpha_unit"):
        steering_sweep(model, tok, persona, harm, alphas=[1.0], alpha_unit="bogus")


def test_steering_sweep_with_generation(llama, persona, harm):
    model, tok = llama
    res = steering_sweep(model, tok, persona, harm[:2], layers=[1], alphas=[2.0],
                         cfg=EvalConfig(generate=True, max_new_tokens=3))
    for a in (res.refusal_rate, res.degeneration):
        assert a.shape == (1, 1) and 0 <= a[0, 0] <= 1
    assert 0 <= res.baseline_rate <= 1 and 0 <= res.baseline_degeneration <= 1


def test_degeneration_rate():
    assert degeneration_rate(["", "   "]) == 1.0
    assert degeneration_rate(["the the the the the the the the"]) == 1.0
    assert degeneration_rate(["!!!!!!!!!!!!"]) == 1.0
    assert degeneration_rate(["Sure, here is a short plan for your garden party."]) == 0.0
    assert degeneration_rate(["ok", "Hello there, how are you today?"]) == 0.0
    s = degeneration_stats(["", "a b c a b c a b c a b c", "A normal answer with several different words."])
    assert s == {"empty": pytest.approx(1 / 3), "repetitive": pytest.approx(1 / 3),
                 "degenerate": pytest.approx(2 / 3), "n": 3}
    assert np.isnan(degeneration_rate([]))
    with pytest.raises(TypeError):
        degeneration_rate("not a list")


def test_refusal_readd(llama, persona, harm):
    model, tok = llama
    g = torch.Generator().manual_seed(0)
    refusal = torch.randn(3, 80, generator=g, dtype=torch.float64)  # per-layer "refusal" vectors
    res = refusal_readd(model, tok, persona, refusal, harm, steer_layer=1, alpha=3.0, add_scales=[1.0, 2.0],
                        seed=4)
    assert res.add_layers == [2] and res.refusal_score.shape == (1, 2)
    eff = 3.0 * float(torch.linalg.vector_norm(persona.vector(1)))
    with steer(model, persona.unit(1), layers=[1], alpha=eff):
        assert res.steered_score == pytest.approx(_score(model, tok, harm), abs=1e-5)
        with add(model, refusal[2], layers=[2], alpha=2.0):
            assert res.refusal_score[0, 1] == pytest.approx(_score(model, tok, harm), abs=1e-5)
        rv = random_like(refusal[2], derive_seed(4, 4, 2, 0))
        assert float(torch.linalg.vector_norm(rv)) == pytest.approx(res.refusal_norms[0])
        with add(model, rv, layers=[2], alpha=1.0):
            assert res.random_score[0, 0] == pytest.approx(_score(model, tok, harm), abs=1e-5)
    gap = res.baseline_score - res.steered_score
    np.testing.assert_allclose(res.recovered, (res.refusal_score - res.steered_score) / gap)
    with pytest.raises(ValueError, match="no later layer"):
        refusal_readd(model, tok, persona, refusal, harm, steer_layer=2, alpha=1.0)
    with pytest.raises(ValueError, match="refusal_direction"):
        refusal_readd(model, tok, persona, torch.zeros(2, 80), harm, steer_layer=1, alpha=1.0)


def test_default_windows():
    assert default_windows(30, 10) == [list(range(11, 20)), list(range(20, 30))]
    assert default_windows(12, 2) == [[3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert default_windows(3, 1) == [[2]]
    with pytest.raises(ValueError):
        default_windows(3, 2)


def test_window_knockout(llama, persona, harm):
    model, tok = llama
    res = window_knockout(model, tok, persona, harm, steer_layer=1, alpha=3.0, windows=[[1, 2], [2]], n_random=2,
                          seed=9)
    assert res.labels == ["layers 1-2", "layer 2"] and res.knockout_score.shape == (2,)
    eff = 3.0 * float(torch.linalg.vector_norm(persona.vector(1)))
    with steer(model, persona.unit(1), layers=[1], alpha=eff):
        with ablate(model, persona.unit(2), layers=[2]):
            assert res.knockout_score[1] == pytest.approx(_score(model, tok, harm), abs=1e-5)
        rv = random_like(persona.unit(2), derive_seed(9, 5, 1, 1, 2))
        assert float(torch.linalg.vector_norm(rv)) == pytest.approx(1.0)
        with ablate(model, rv, layers=[2]):
            s1 = _score(model, tok, harm)
        rv0 = random_like(persona.unit(2), derive_seed(9, 5, 1, 0, 2))
        with ablate(model, rv0, layers=[2]):
            s0 = _score(model, tok, harm)
    assert res.random_score[1] == pytest.approx((s0 + s1) / 2, abs=1e-5)
    assert res.random_score_std[1] == pytest.approx(abs(s0 - s1) / 2, abs=1e-5)
    with ablate(model, persona.unit(2), layers=[2]):
        assert res.knockout_only_score[1] == pytest.approx(_score(model, tok, harm), abs=1e-5)
    np.testing.assert_allclose(res.restored, (res.knockout_score - res.steered_score)
                               / (res.baseline_score - res.steered_score))
    default = window_knockout(model, tok, persona, harm[:2], steer_layer=1, alpha=1.0, basis="steer", n_random=1)
    assert default.windows == [[2]] and default.basis == "steer"
    with pytest.raises(ValueError, match="basis"):
        window_knockout(model, tok, persona, harm, steer_layer=1, alpha=1.0, basis="x")


def test_save_load_and_plots(llama, persona, harm, tmp_path):
    from refusal_fast.analysis import plots

    model, tok = llama
    p = persona.save(tmp_path / "persona.safetensors")
    back = PersonaDirection.load(p)
    assert torch.equal(torch.as_tensor(back.directions), torch.as_tensor(persona.directions))
    assert back.compliant_prompts == COMPLIANT and back.layers == persona.layers
    sw = steering_sweep(model, tok, persona, harm[:2], alphas=[1.0, 2.0])
    rd = refusal_readd(model, tok, persona, torch.ones(80), harm[:2], steer_layer=1, alpha=2.0)
    ko = window_knockout(model, tok, persona, harm[:2], steer_layer=1, alpha=2.0, n_random=2)
    figs = {
        "norms.png": lambda q: plots.plot_persona_norms(persona, path=q, close=True),
        "alpha.png": lambda q: plots.plot_steering_alpha(json.loads(sw.to_json()), path=q, close=True),
        "layer.png": lambda q: plots.plot_steering_layer(sw, path=q, close=True),
        "readd.png": lambda q: plots.plot_readd(json.loads(rd.to_json()), path=q, close=True),
        "ko.png": lambda q: plots.plot_knockout(ko, path=q, close=True),
    }
    for name, fn in figs.items():
        fn(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 5000
