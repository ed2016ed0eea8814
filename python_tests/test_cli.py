"""The ``refusal-fast`` command line on a tiny model saved with save_pretrained.

Every subcommand runs in-process through ``main([...])`` (one ``--help`` runs as a subprocess).
The pipeline is run once per module (extract -> select -> eval -> ablate -> categories -> persona
-> export -> report) and its artifacts are checked against direct library computations.
"""
import json
import re
import subprocess
import sys

import pytest
import torch
from tiny_models import make_model, make_tokenizer

from refusal_fast import cli, datasets
from refusal_fast.evaluate import refusal_scores
from refusal_fast.extract import Means
from refusal_fast.io import load_dataset

SUBCOMMANDS = ["extract", "select", "eval", "ablate", "categories", "persona", "export", "report", "demo"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny llama (+ tokenizer) and small dataset JSONs in a temp dir."""
    root = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer("chatml")
    model = make_model("llama", tok, n_layers=3, d_model=64)
    (root / "tiny").mkdir()
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    by_cat = {}
    for r in datasets.load("harmbench_test"):
        by_cat.setdefault(r["category"], []).append(r)
    harmful = [r for c in sorted(by_cat)[:3] for r in by_cat[c][:4]]  # 3 categories x 4 prompts
    (root / "harmful.json").write_text(json.dumps(harmful))
    (root / "harmless.json").write_text(json.dumps(datasets.instructions("harmless_val", n=10)))
    return root


def _run(argv, capsys=None):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


def _common(env, out="run"):
    return ["--model", env / "tiny", "--out", env / out, "--batch-size", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def pipeline(env):
    """Run every subcommand once on the tiny model; returns {command: (exit code, stdout)}."""
    c = _common(env)
    h, l = env / "harmful.json", env / "harmless.json"
    steps = {
        "extract": ["extract", *c, "--harmful", h, "--harmless", l, "--n-train", "8"],
        "select": ["select", *c, "--harmful-val", h, "--harmless-val", l, "--n-val", "4",
                   "--kl-threshold", "none", "--induce-threshold", "none", "--prune-last-frac", "none",
                   "--layers", "1:3"],
        "ablate": ["ablate", *c, "--harmful", h, "--harmless", l, "--n-harmful", "5", "--n-harmless", "4",
                   "--max-new-tokens", "4", "--out", env / "run_ablate"],
        "eval": ["eval", *c, "--harmful", h, "--harmless", l, "--n-harmful", "6", "--n-harmless", "5",
                 "--max-new-tokens", "5", "--conditions", "baseline,ablate,ablate_affine,random_ablate,actadd"],
        "categories": ["categories", *c, "--data", h, "--harmless", l, "--ks", "1,2", "--layer", "2"],
        "persona": ["persona", *c, "--instructions", h, "--n-instructions", "3", "--harmful", h, "--n-harmful", "3",
                    "--alphas", "1,4", "--n-random", "1"],
        "export": ["export", *c],
        "report": ["report", "--out", env / "run"],
    }
    results = {}
    import contextlib
    import io

    for name, argv in steps.items():
        if name == "ablate":  # ablate reads the direction from run/ but writes to its own dir
            argv = argv + ["--direction", env / "run" / "selection.json"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli.main([str(a) for a in argv])
        results[name] = (code, buf.getvalue())
    return results


# ------------------------------------------------------------------------------------- help


def test_help_subprocess_lists_every_subcommand():
    r = subprocess.run([sys.executable, "-m", "refusal_fast.cli", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in SUBCOMMANDS:
        assert re.search(rf"^\s+{cmd}\b", r.stdout, re.M), cmd


def test_python_dash_m_package_runs_the_cli(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["refusal_fast", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("refusal_fast", run_name="__main__")
    assert e.value.code == 0
    assert "refusal-fast" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_every_subcommand_explains_every_option(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = cli.build_parser()._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        assert action.help, f"{cmd}: option {action.option_strings} has no help"
        for opt in action.option_strings:
            assert opt in text


# ---------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("cmd", ["extract", "select", "eval", "ablate", "categories", "persona", "export", "report"])
def test_subcommand_succeeds(pipeline, cmd):
    assert pipeline[cmd][0] == 0


def test_extract_counts_and_subset(env, pipeline):
    means = Means.load(env / "run" / "means.safetensors")
    assert means.groups == ["harmful", "harmless"]
    assert means.count("harmful") == 8 and means.count("harmless") == 8
    assert means.layers == [0, 1, 2]
    run = json.loads((env / "run" / "run.json").read_text())
    assert run["n_layers"] == 3 and run["d_model"] == 64 and "backend_info" in run
    assert {c["command"] for c in run["commands"]} >= {"extract", "select", "eval", "categories", "persona", "export"}


def test_selected_direction_is_the_difference_of_means(env, pipeline):
    sel = json.loads((env / "run" / "selection.json").read_text())
    means = Means.load(env / "run" / "means.safetensors")
    assert sel["layer"] in (1, 2)  # --layers 1:3
    li, pi = means.layers.index(sel["layer"]), means.positions.index(sel["position"])
    want = (means.mean("harmful") - means.mean("harmless"))[li, pi]
    from safetensors.torch import load_file

    got = load_file(str(env / "run" / "direction.safetensors"))["direction"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (env / "run" / "selection_heatmap.png").stat().st_size > 1000


def test_eval_numbers_match_direct_computation(env, pipeline):
    ev = json.loads((env / "run" / "eval.json").read_text())
    assert list(ev["conditions"]) == ["baseline", "ablate", "ablate_affine", "random_ablate", "actadd"]
    assert set(ev["conditions"]["actadd"]) == {"harmless"} and set(ev["conditions"]["random_ablate"]) == {"harmful"}
    assert set(ev["kl_harmless"]) == {"ablate", "ablate_affine", "actadd"}
    assert ev["kl_harmless"]["ablate"] >= 0
    # the same seeded subset, scored directly, gives the baseline mean refusal score
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(env / "tiny").eval()
    tok = transformers.AutoTokenizer.from_pretrained(env / "tiny")
    rows = load_dataset(str(env / "harmful.json"), 6, 0)
    direct = refusal_scores(model, tok, [r["instruction"] for r in rows]).mean().item()
    assert ev["conditions"]["baseline"]["harmful"]["mean_refusal_score"] == pytest.approx(direct, rel=1e-6, abs=1e-8)
    # rates agree with the saved completions' verdicts
    recs = json.loads((env / "run" / "eval_completions.json").read_text())["records"]
    for cond, splits in ev["conditions"].items():
        for split, res in splits.items():
            r = recs[cond][split]
            assert res["refusal_rate"] == pytest.approx(sum(x["refused"] for x in r) / len(r))


def test_ablate_is_eval_with_baseline_and_ablate(env, pipeline):
    ev = json.loads((env / "run_ablate" / "eval.json").read_text())
    assert list(ev["conditions"]) == ["baseline", "ablate"]
    assert ev["datasets"]["harmful"]["n"] == 5 and ev["datasets"]["harmless"]["n"] == 4


def test_printed_summary_matches_eval_json(env, pipeline):
    from refusal_fast.report import eval_summary_rows, format_summary_table

    ev = json.loads((env / "run" / "eval.json").read_text())
    assert format_summary_table(eval_summary_rows(ev)) in pipeline["eval"][1]


def test_categories_artifacts(env, pipeline):
    cat = json.loads((env / "run" / "categories.json").read_text())
    assert cat["directions"]["categories"] == sorted(cat["directions"]["categories"])
    assert len(cat["directions"]["categories"]) == 3
    assert set(cat["directions"]["chosen_layer"].values()) == {2}
    assert cat["cross_ablation"]["ablated"][-1] == "global"
    assert cat["subspace_ablation"]["conditions"][:2] == ["PC1", "PC1-2"]
    for name in ("categories_cosine.png", "categories_pca.png", "categories_cross_ablation.png",
                 "categories_subspace.png"):
        assert (env / "run" / name).stat().st_size > 1000, name


def test_persona_artifacts(env, pipeline):
    per = json.loads((env / "run" / "persona.json").read_text())
    assert per["sweep"]["alphas"] == [1.0, 4.0]
    assert per["readd"] is not None and per["knockout"] is not None  # selection.json exists -> re-add runs
    assert sorted(p.name for p in (env / "run").glob("persona_*.png"))


def test_export_removes_the_direction(env, pipeline):
    import transformers

    sel = json.loads((env / "run" / "selection.json").read_text())
    q = torch.tensor(sel["direction"], dtype=torch.float32)
    exported = transformers.AutoModelForCausalLM.from_pretrained(env / "run" / "orthogonalized")
    original = transformers.AutoModelForCausalLM.from_pretrained(env / "tiny")
    emb_new, emb_old = exported.model.embed_tokens.weight, original.model.embed_tokens.weight
    assert (emb_new @ q).abs().max() < 1e-4 < (emb_old @ q).abs().max()
    down = exported.model.layers[1].mlp.down_proj.weight  # [d_model, d_ff] writes into the residual
    assert (q @ down).abs().max() < 1e-4
    meta = json.loads((env / "run" / "orthogonalized" / "refusal_fast_export.json").read_text())
    assert meta["layer"] == sel["layer"]


def test_report_has_every_section_and_embedded_figures(env, pipeline):
    html = (env / "run" / "report.html").read_text()
    assert pipeline["report"][1].strip().endswith("report.html")
    for anchor in ("meta", "selection", "eval", "categories", "persona"):
        assert f"id='{anchor}'" in html
    assert "not run" not in html
    n_png = len(list((env / "run").glob("*.png")))
    assert html.count("data:image/png;base64,") == n_png >= 10
    assert "backend_info" in html and "tiny" in html


# ------------------------------------------------------------------------------ the demo


def test_demo_quick_on_tiny_model(env, capsys):
    code = cli.main(["demo", "--quick", "--model", str(env / "tiny"), "--out", str(env / "demo"), "--no-progress",
                     "--batch-size", "8", "--kl-threshold", "none", "--induce-threshold", "none"])
    out = capsys.readouterr().out
    assert code == 0
    from refusal_fast.report import eval_summary_rows, format_summary_table

    ev = json.loads((env / "demo" / "eval.json").read_text())
    table = format_summary_table(eval_summary_rows(ev))
    assert table in out  # printed numbers are the report's numbers
    html = (env / "demo" / "report.html").read_text()
    for row in eval_summary_rows(ev):
        assert all(cell in html for cell in row)
    assert str((env / "demo" / "report.html").resolve()) in out
    assert ev["datasets"]["harmful"]["n"] == cli.DEMO_SIZES["n_harmful"][1]
    assert (env / "demo" / "categories.json").is_file()
    assert "Persona" in html and "not run" in html  # persona is off by default in the demo


def test_demo_relaxes_kl_filter_step_by_step_without_rescoring(env, capsys, monkeypatch):
    """No candidate passes the KL filter: the demo warns, then re-picks from the same scores at the first
    threshold of select.KL_FALLBACK that lets one through (the KL filter off only as the last step)."""
    import refusal_fast.select as sel
    from refusal_fast.select import KL_FALLBACK

    calls = []
    real = sel.select_direction
    monkeypatch.setattr(sel, "select_direction", lambda *a, **k: calls.append(k) or real(*a, **k))
    out_dir = env / "demo_fallback"
    code = cli.main(["demo", "--quick", "--model", str(env / "tiny"), "--out", str(out_dir), "--no-progress",
                     "--batch-size", "8", "--kl-threshold=-1", "--induce-threshold", "none", "--skip-categories"])
    out = capsys.readouterr().out
    assert code == 0
    assert "WARNING: no candidate direction passed KL <= -1.0" in out
    assert len(calls) == 1  # scored once
    res = json.loads((out_dir / "selection.json").read_text())
    kls = {(r["layer"], r["position"]): r["kl"] for r in res["table"] if r["filtered"] in (None, "kl")}
    # the threshold used is the first of the ladder under which some candidate passes
    expect = next(t for t in KL_FALLBACK if t is None or any(k <= t for k in kls.values()))
    assert res["params"]["kl_threshold"] == expect
    assert ("KL filter off" if expect is None else f"KL <= {expect}") in out
    ok = [r for r in res["table"] if r["filtered"] is None]
    assert ok and all(expect is None or r["kl"] <= expect for r in ok)
    assert (res["layer"], res["position"]) == min((r["bypass"], r["layer"], r["position"]) for r in ok)[1:]
    ev = json.loads((out_dir / "eval.json").read_text())
    assert (ev["direction"]["layer"], ev["direction"]["position"]) == (res["layer"], res["position"])


# ---------------------------------------------------------------------------------- errors


def _err(argv, capsys):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    return err


def test_missing_model_path(env, capsys):
    err = _err(["extract", "--model", env / "nope", "--out", env / "e1"], capsys)
    assert "model path not found" in err and "nope" in err


def test_directory_without_config(env, capsys):
    (env / "empty").mkdir(exist_ok=True)
    err = _err(["extract", "--model", env / "empty", "--out", env / "e1"], capsys)
    assert "no config.json" in err


def test_directory_without_tokenizer(env, capsys):
    d = env / "no_tokenizer"
    d.mkdir(exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((env / "tiny" / f).read_bytes())
    err = _err(["extract", "--model", d, "--out", env / "e1"], capsys)
    assert "no tokenizer files" in err


def test_bad_dataset_json(env, capsys):
    bad = env / "bad.json"
    bad.write_text("[{'instruction': oops")
    err = _err(["extract", *_common(env, "e2"), "--harmful", bad], capsys)
    assert "bad.json" in err and "not valid JSON" in err


def test_dataset_rows_without_instruction(env, capsys):
    bad = env / "bad_rows.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    err = _err(["extract", *_common(env, "e3"), "--harmless", bad], capsys)
    assert "instruction" in err and "--harmless" in err


def test_unknown_dataset_name(env, capsys):
    err = _err(["extract", *_common(env, "e4"), "--harmful", "harmfull_train"], capsys)
    assert "harmfull_train" in err and "shipped dataset" in err


def test_select_without_means(env, capsys):
    err = _err(["select", *_common(env, "e5")], capsys)
    assert "means file not found" in err and "refusal-fast extract" in err


def test_eval_without_direction(env, capsys):
    err = _err(["eval", *_common(env, "e6")], capsys)
    assert "direction not found" in err


def test_report_missing_dir(env, capsys):
    err = _err(["report", "--out", env / "does_not_exist"], capsys)
    assert "not found" in err


@pytest.mark.parametrize("argv", [["extract", "--n-train", "0"], ["extract", "--layers", "x"],
                                  ["eval", "--conditions", "ablate,bogus"], ["nope"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_int_list_parsing():
    assert cli._int_list("3") == [3]
    assert cli._int_list("1,4,7") == [1, 4, 7]
    assert cli._int_list("10:13") == [10, 11, 12]
    assert cli._int_list("0:10:5,-1") == [0, 5, -1]


def test_eval_matched_random_control(env, pipeline):
    """--random-control matched: random_ablate's direction copies the selected direction on the model's
    massive-activation coordinates (planted here) and equals a direct computation."""
    import transformers

    from refusal_fast.analysis import random_like
    from refusal_fast.commands import _load_any_direction
    from refusal_fast.interventions import ablate

    model = transformers.AutoModelForCausalLM.from_pretrained(env / "tiny").eval()
    tok = transformers.AutoTokenizer.from_pretrained(env / "tiny")
    planted = 13
    with torch.no_grad():
        model.model.embed_tokens.weight[:, planted] = 5000.0
    model.save_pretrained(env / "tiny_massive")
    tok.save_pretrained(env / "tiny_massive")
    c = _common(env, "run_matched")
    c[1] = env / "tiny_massive"
    code, _ = _run(["eval", *c, "--harmful", env / "harmful.json", "--harmless", env / "harmless.json",
                    "--n-harmful", "6", "--n-harmless", "5", "--max-new-tokens", "3", "--conditions",
                    "baseline,random_ablate", "--random-control", "matched",
                    "--direction", env / "run" / "selection.json", "--allow-other-weights"])  # other weights: planted
    assert code == 0
    ev = json.loads((env / "run_matched" / "eval.json").read_text())
    assert ev["direction"]["allow_other_weights"] is True
    assert ev["random_control"]["kind"] == "matched" and ev["random_control"]["seed"] == 0
    assert ev["random_control"]["massive_activation_dims"] == [planted]
    d = _load_any_direction(env / "run" / "selection.json")
    rows = load_dataset(str(env / "harmful.json"), 6, 0)
    with ablate(model, random_like(d["direction"], 0, match_dims=[planted])):
        direct = refusal_scores(model, tok, [r["instruction"] for r in rows]).mean().item()
    got = ev["conditions"]["random_ablate"]["harmful"]["mean_refusal_score"]
    assert got == pytest.approx(direct, rel=1e-5, abs=1e-6)
    with ablate(model, random_like(d["direction"], 0)):
        iso = refusal_scores(model, tok, [r["instruction"] for r in rows]).mean().item()
    assert iso != pytest.approx(direct, rel=1e-5, abs=1e-6)  # the massive coordinate makes them differ
