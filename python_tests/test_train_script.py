"""Pure helpers of scripts/train_refusal_patch.py (the demo model's training/evaluation script)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_refusal_patch.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_refusal_patch", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _behaviour_run():
    return {"sizes": {"unseen_harmful": 198}, "patched": {"unseen_harmful": 0.904, "indist_harmful": 0.99},
            "base": {"unseen_harmful": 0.01}, "examples": {"x": ["a"]}, "eval_wall_s": 322.7}


def _direction_run():
    return {"sizes": {"unseen_harmful": 198}, "patched": {"unseen_harmful": 0.9},
            "directions": {"selected": {"layer": 20, "pos": -1}}, "eval_wall_s": 1171.0}


def test_directions_only_run_keeps_behaviour_metrics(script):
    old = dict(_behaviour_run(), directions={"selected": {"layer": 22, "pos": -3}}, direction_selection_note="old")
    merged = script.merge_metrics(old, _direction_run(), directions_only=True)
    assert merged["patched"] == {"unseen_harmful": 0.904, "indist_harmful": 0.99}  # not the partial re-run
    assert merged["base"] == {"unseen_harmful": 0.01}
    assert merged["directions"] == {"selected": {"layer": 20, "pos": -1}}
    assert "direction_selection_note" not in merged  # described the replaced pick
    assert merged["eval_wall_s"] == {"behaviour": 322.7, "directions": 1171.0}
    # a second directions-only run keeps the behaviour wall time from the dict form
    again = script.merge_metrics(merged, _direction_run(), directions_only=True)
    assert again["eval_wall_s"] == {"behaviour": 322.7, "directions": 1171.0}


def test_full_run_replaces_metrics(script):
    new = dict(_behaviour_run(), directions={"selected": {"layer": 5, "pos": -2}})
    assert script.merge_metrics(dict(_behaviour_run(), extra=1), new, directions_only=False) == new


@pytest.mark.parametrize("old", [None, {}, {"directions": {}}])
def test_directions_only_without_earlier_behaviour_keeps_new(script, old):
    new = _direction_run()
    assert script.merge_metrics(old, new, directions_only=True) == new


@pytest.mark.parametrize("bad", ["0", "-1", "nan"])
def test_kl_threshold_rejected_at_parse_time(script, bad):
    with pytest.raises(SystemExit):
        script.main(["--kl-threshold", bad, "--no-eval", "--eval-only"])


@pytest.mark.parametrize("first, ladder", [(0.1, [0.1, 0.2, 0.5, 1.0, math.inf]), (0.3, [0.3, 0.5, 1.0, math.inf]),
                                           (2.0, [2.0, math.inf]), (math.inf, [math.inf])])
def test_kl_ladder(script, first, ladder):
    assert script.kl_ladder(first) == ladder


def test_harmless_kl_context_statistics():
    """scripts/harmless_kl_context.py: per-row KL(p || q) equals torch's kl_div; identical rows give 0."""
    import torch

    spec = importlib.util.spec_from_file_location("harmless_kl_context", SCRIPT.parent / "harmless_kl_context.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    q = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    ref = torch.nn.functional.kl_div(q.double(), p.double(), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(mod.kl_rows(p, q), ref)
    s = mod.summary(p, q)
    assert s["mean"] == pytest.approx(ref.mean().item(), abs=1e-4)
    assert s["max"] == pytest.approx(ref.max().item(), abs=1e-4)
    assert s["median"] <= s["p90"] <= s["max"]
    same = mod.summary(p, p)
    assert same["mean"] == 0 and same["top1_agreement"] == 1.0


def _tiny_training_run(script, tokenizer, distill: bool, lr: float, reverse_kl: float = 0.0):
    """Two steps of train() on a fresh tiny Llama: returns (stats, model, MLP weights before)."""
    import random
    from types import SimpleNamespace

    import torch
    from tiny_models import make_model

    torch.manual_seed(0)
    model = make_model("llama", tokenizer)
    rng = random.Random(0)
    samples = [([rng.randrange(5, 200) for _ in range(rng.randrange(3, 9))],
                [rng.randrange(5, 200) for _ in range(rng.randrange(2, 6))], k % 2) for k in range(8)]
    args = SimpleNamespace(rank=0, steps=2, batch=4, lr=lr, preserve=0.0, harmless_distill=distill,
                           reverse_kl=reverse_kl, seed=0)
    before = {k: v.clone() for k, v in model.model.layers[1].mlp.state_dict().items()}
    stats = script.train(args, model, tokenizer, samples, layer=1)
    return stats, model, before


def test_harmless_distill_loss_is_kl_to_the_base_model(script, tokenizer):
    """--harmless-distill: the harmless loss is KL(base || patched), 0 while the MLP is still the base one
    (lr 0), where cross-entropy on the reply is not; with lr > 0 the MLP moves and nothing is left trainable."""
    s_kl, _, _ = _tiny_training_run(script, tokenizer, distill=True, lr=0.0)
    s_ce, _, _ = _tiny_training_run(script, tokenizer, distill=False, lr=0.0)
    assert abs(s_kl["final_harmless_loss"]) < 1e-5
    assert s_ce["final_harmless_loss"] > 1.0  # random tiny model: CE on random reply tokens is large
    assert s_kl["final_harmful_loss"] == pytest.approx(s_ce["final_harmful_loss"], rel=1e-5)  # harmful: CE both
    s, model, before = _tiny_training_run(script, tokenizer, distill=True, lr=1e-2)
    after = model.model.layers[1].mlp.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert s["final_harmless_loss"] > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_reverse_kl_adds_the_mode_seeking_term(script, tokenizer):
    """--reverse-kl w adds w * KL(patched || base) to the harmless loss. The losses reported for the second of two
    steps are computed on the weights after the first, whose update comes from the harmful CE alone (every KL has
    zero gradient while patched == base): same weights, same harmful loss, a larger harmless one."""
    s_f, _, _ = _tiny_training_run(script, tokenizer, distill=True, lr=1e-2)
    s_j, _, _ = _tiny_training_run(script, tokenizer, distill=True, lr=1e-2, reverse_kl=1.0)
    assert s_j["final_harmless_loss"] > s_f["final_harmless_loss"] > 0
    assert s_j["final_harmful_loss"] == pytest.approx(s_f["final_harmful_loss"], rel=1e-5)


@pytest.mark.parametrize("argv", [["--no-harmless-distill", "--reverse-kl", "1"], ["--reverse-kl", "-1"]])
def test_reverse_kl_needs_distill_and_a_nonnegative_weight(script, argv):
    with pytest.raises(SystemExit):
        script.main(argv + ["--no-eval", "--out", "/nonexistent/x.safetensors"])


def test_kl_relaxation_stops_where_a_candidate_induces_refusal(script):
    """Patch 5's case: the KL-passing candidates at 0.1 all have actadd score < 0; the 0.126 one is a refusal direction,
    so selection stops at 0.2 (not at 0.1 with a non-refusal direction, and not further out)."""
    table = [{"layer": 22, "pos": -5, "ablation_score": -0.48, "kl_harmless": 0.099, "steer": -2.8},
             {"layer": 16, "pos": -4, "ablation_score": 0.73, "kl_harmless": 0.058, "steer": -3.9},
             {"layer": 17, "pos": -1, "ablation_score": -3.90, "kl_harmless": 0.126, "steer": 2.1},
             {"layer": 21, "pos": -1, "ablation_score": -4.52, "kl_harmless": 0.316, "steer": 1.5}]
    calls = []

    def verify(t):
        calls.append((t["layer"], t["pos"]))
        return dict(t, actadd_score=t["steer"])

    thr, verified = script.relax_kl_until_actadd(table, script.kl_ladder(0.1), verify)
    assert thr == 0.2 and [(v["layer"], v["pos"]) for v in verified] == [(17, -1)]
    assert calls[:2] == [(22, -5), (16, -4)]  # lowest ablation score first among those passing 0.1
    thr, verified = script.relax_kl_until_actadd(table, script.kl_ladder(0.5), verify)
    assert thr == 0.5 and [v["layer"] for v in verified] == [21, 17]
    none = [dict(t, steer=-1.0) for t in table]
    assert script.relax_kl_until_actadd(none, script.kl_ladder(0.1), verify) == (0.1, [])
