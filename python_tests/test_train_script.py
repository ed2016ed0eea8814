"""Pure helpers of scripts/train_refusal_patch.py (the demo model's training/evaluation script)."""
import importlib.util
import math
from pathlib import Path

import pytest

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
    assert s["mean"] == pytest.approx(ref.mean().item(), abs=1e-4) and s["max"] == pytest.approx(ref.max().item(), abs=1e-4)
    assert s["median"] <= s["p90"] <= s["max"]
    same = mod.summary(p, p)
    assert same["mean"] == 0 and same["top1_agreement"] == 1.0
