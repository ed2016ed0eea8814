"""Regression tests of the trustworthy-artifacts issue, one group per numbered defect (see the section
headers), plus the fault-injection test (SIGKILL a writer ~50 times; every artifact on disk then loads and
verifies, or is absent) and the concurrency test (two CLI runs on one --out: one proceeds, the other exits 1).

Each test here failed on the code before the fix (checked by running this file against that checkout).
"""
import contextlib
import copy
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_model, make_tokenizer

from refusal_fast import cli, datasets
from refusal_fast import extract as extract_module
from refusal_fast import interventions as iv
from refusal_fast.evaluate import generate_completions, kl_divergence, last_token_logprobs, refusal_scores
from refusal_fast.extract import Means, extract_means
from refusal_fast.io import load_direction, save_direction
from refusal_fast.select import SelectionResult, select_direction

HARMFUL = datasets.instructions("harmful_train", n=6)
HARMLESS = datasets.instructions("harmless_train", n=6)
GROUPS = {"harmful": HARMFUL, "harmless": HARMLESS}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture(scope="module")
def pair(tok):
    """Two tiny llamas with one configuration and different weights (seed 0 / seed 1)."""
    a, b = make_model("llama", tok, seed=0), make_model("llama", tok, seed=1)
    a.config._name_or_path, b.config._name_or_path = "tiny-a", "tiny-b"
    return a, b


@pytest.fixture(scope="module")
def means_a(pair, tok):
    return extract_means(pair[0], tok, GROUPS, batch_size=4, progress=False)


def _flip_data_byte(path: Path, tensor: str, offset: int = 3) -> None:
    """Flip one bit inside ``tensor``'s data in a safetensors file (located through its JSON header)."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + header_len])[tensor]["data_offsets"]
    assert start + offset < end
    raw[8 + header_len + start + offset] ^= 0x10
    path.write_bytes(bytes(raw))


# ============================================================================================
# 1. a model is identified by its weights, not only by its config hash


def test_means_of_other_weights_refused_naming_both(pair, tok, means_a, tmp_path):
    a, b = pair
    path = means_a.save(tmp_path / "means.safetensors")
    Means.load(path, model=a)  # the model they came from
    with pytest.raises(ValueError) as err:
        Means.load(path, model=b)
    msg = str(err.value)
    assert "weights_fingerprint" in msg and "'tiny-a'" in msg and "'tiny-b'" in msg and "allow_other_weights" in msg
    loaded = Means.load(path, model=b, allow_other_weights=True)  # a deliberate transfer, recorded
    assert loaded.metadata["transfer"]["allow_other_weights"] is True
    assert loaded.metadata["transfer"]["target_model"]["name_or_path"] == "tiny-b"


def test_merge_of_other_weights_refused(pair, tok, means_a):
    other = extract_means(pair[1], tok, GROUPS, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="weights_fingerprint"):
        means_a.merge(other)
    merged = means_a.merge(other, allow_other_weights=True)
    assert merged.metadata["merged_other_model"]["name_or_path"] == "tiny-b"


def test_checkpoint_of_other_weights_not_resumed(pair, tok, tmp_path):
    a, b = pair
    ckpt = tmp_path / "state.safetensors"
    extract_means(a, tok, GROUPS, batch_size=4, progress=False, checkpoint=ckpt)  # a finished checkpoint of A
    with pytest.raises(ValueError, match="weights_fingerprint") as err:
        extract_means(b, tok, GROUPS, batch_size=4, progress=False, checkpoint=ckpt)
    assert "'tiny-a'" in str(err.value) and "'tiny-b'" in str(err.value)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Two saved tiny llamas of one configuration with different weights, and small datasets."""
    root = tmp_path_factory.mktemp("rel_cli")
    tok = make_tokenizer("chatml")
    for name, seed in (("model_a", 0), ("model_b", 1)):
        m = make_model("llama", tok, seed=seed, n_layers=3, d_model=64)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "harmful.json").write_text(json.dumps(datasets.instructions("harmful_val", n=8)))
    (root / "harmless.json").write_text(json.dumps(datasets.instructions("harmless_val", n=8)))
    return root


def _cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _opts(env, model, out):
    return ["--model", env / model, "--out", out, "--device", "cpu", "--no-progress", "--batch-size", "4"]


def test_cli_select_eval_affine_refuse_other_weights(cli_env):
    env, out = cli_env, cli_env / "ab"
    h, l = env / "harmful.json", env / "harmless.json"
    sel_args = ["--harmful-val", h, "--harmless-val", l, "--n-val", "3", "--layers", "1:3", "--kl-threshold", "none",
                "--induce-threshold", "none", "--prune-last-frac", "none"]
    ev_args = ["--harmful", h, "--harmless", l, "--n-harmful", "3", "--n-harmless", "3", "--max-new-tokens", "2"]
    assert _cli(["extract", *_opts(env, "model_a", out), "--harmful", h, "--harmless", l, "--n-train", "6"])[0] == 0
    code, err = _cli(["select", *_opts(env, "model_b", out), *sel_args])
    assert code == 1 and "weights_fingerprint" in err and "--allow-other-weights" in err
    assert "model_a" in err and "model_b" in err
    code, err = _cli(["select", *_opts(env, "model_b", out), *sel_args, "--allow-other-weights"])
    assert code == 0, err
    sel = json.loads((out / "selection.json").read_text())
    assert sel["params"]["allow_other_weights"] is True
    assert sel["params"]["means_model"]["name_or_path"].endswith("model_a")
    assert sel["params"]["model_identity"]["name_or_path"].endswith("model_b")
    # ablate_affine's harmless mean comes from model A's means: refused for B
    code, err = _cli(["eval", *_opts(env, "model_b", out), *ev_args, "--conditions", "baseline,ablate_affine"])
    assert code == 1 and "weights_fingerprint" in err and "means.safetensors" in err
    # the direction was selected on B: refused for A
    code, err = _cli(["eval", *_opts(env, "model_a", out), *ev_args, "--conditions", "baseline,ablate"])
    assert code == 1 and "weights_fingerprint" in err and "selection.json" in err
    code, err = _cli(["eval", *_opts(env, "model_b", out), *ev_args, "--conditions", "baseline,ablate_affine",
                      "--allow-other-weights"])
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["commands"][-1]["command"] == "eval" and run["commands"][-1]["allow_other_weights"] is True


# ============================================================================================
# 2. select_direction checks the Means against the model (architecture, depth, template, weights)


def test_select_direction_checks_means_against_model(pair, tok, means_a):
    a, b = pair
    kw = dict(layers=[1, 2], kl_threshold=None, induce_threshold=None, prune_last_frac=None, progress=False,
              batch_size=4)
    val = (HARMFUL[:2], HARMLESS[:2])
    assert select_direction(a, tok, means_a, *val, **kw).found
    qwen = make_model("qwen2", tok)  # same d_model and depth, another architecture
    with pytest.raises(ValueError, match="arch"):
        select_direction(qwen, tok, means_a, *val, **kw)
    deeper = make_model("llama", tok, n_layers=5)
    with pytest.raises(ValueError, match="n_layers"):
        select_direction(deeper, tok, means_a, *val, **kw)
    with pytest.raises(ValueError, match="chat template"):
        select_direction(a, make_tokenizer("llama3"), means_a, *val, **kw)
    with pytest.raises(ValueError, match="weights_fingerprint"):
        select_direction(b, tok, means_a, *val, **kw)
    res = select_direction(b, tok, means_a, *val, allow_other_weights=True, **kw)
    assert res.params["allow_other_weights"] is True and res.params["means_model"]["name_or_path"] == "tiny-a"


# ============================================================================================
# 3. OrthogonalizationRecord.undo out of order / after a parameter was replaced


def test_orthogonalize_undo_out_of_order_refused(tok):
    m = make_model("gpt2", tok)  # tied embeddings: the first edit unties the LM head
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(80, generator=g), torch.randn(80, generator=g)
    r1 = iv.orthogonalize(m, v)
    r2 = iv.orthogonalize(m, w)
    with pytest.raises(RuntimeError, match="out of order"):
        r1.undo()
    r2.undo()
    r1.undo()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.lm_head.weight is m.transformer.wte.weight


def test_orthogonalize_undo_after_parameter_replaced_refused(tok):
    m = make_model("llama", tok)
    rec = iv.orthogonalize(m, torch.randn(80))
    proj = m.model.layers[1].mlp.down_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced"):
        rec.undo()


# ============================================================================================
# 4. output paths are checked before the compute


def _count_forwards(model):
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_unwritable_checkpoint_dir_fails_before_any_forward(pair, tok, tmp_path):
    a = pair[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    calls, handle = _count_forwards(a)
    try:
        with pytest.raises(ValueError, match="checkpoint directory"):
            extract_means(a, tok, GROUPS, batch_size=4, progress=False, checkpoint=blocker / "sub" / "c.safetensors")
    finally:
        handle.remove()
    assert calls == []
    # a checkpoint in a directory that does not exist yet: created, then written
    ckpt = tmp_path / "new" / "dir" / "c.safetensors"
    extract_means(a, tok, GROUPS, batch_size=4, progress=False, checkpoint=ckpt)
    assert Means.load(ckpt).count("harmful") == len(HARMFUL)


def _no_file_writes():  # preexec_fn: every write of a byte to a regular file fails with EFBIG
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_cli_unwritable_out_fails_before_the_model_loads(cli_env):
    out = cli_env / "unwritable"
    out.mkdir()
    argv = [sys.executable, "-m", "refusal_fast.cli", "extract", *map(str, _opts(cli_env, "model_a", out)),
            "--harmful", str(cli_env / "harmful.json"), "--harmless", str(cli_env / "harmless.json"),
            "--n-train", "4"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=_no_file_writes, cwd=REPO)
    assert res.returncode == 1, res.stderr
    assert "not writable" in res.stderr and str(out) in res.stderr
    assert "loading model" not in res.stderr  # failed before the model was loaded


# ============================================================================================
# 5. atomic, race-free writes; the --out lock; a corrupt run.json is an error


def test_two_writers_of_one_path_never_collide(tmp_path):
    from fault_writer import means_at

    path = tmp_path / "means.safetensors"
    errors = []
    start = threading.Barrier(3)

    def writer(seed):
        start.wait()
        try:
            for i in range(40):
                means_at(seed * 100 + i).save(path)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []  # (fixed temporary names made concurrent writers fail with FileNotFoundError)
    assert Means.load(path).metadata["iteration"] in {139, 239, 339}  # one writer's last save, verified
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind by a finished writer


def test_corrupt_run_json_is_an_error_not_reset(cli_env):
    out = cli_env / "corrupt_run"
    out.mkdir()
    garbage = '{"commands": [{"command": "extract"'  # truncated
    (out / "run.json").write_text(garbage)
    code, err = _cli(["extract", *_opts(cli_env, "model_a", out), "--harmful", cli_env / "harmful.json",
                      "--harmless", cli_env / "harmless.json", "--n-train", "4"])
    assert code == 1 and "run.json" in err and "mv " in err
    assert (out / "run.json").read_text() == garbage  # never silently replaced
    assert not (out / "means.safetensors").exists()  # refused before any work


def test_two_cli_runs_on_one_out(cli_env):
    """Two CLI runs on one --out: the first (a subprocess, paused while it holds the lock) proceeds, the second
    exits 1 with a clear message; the first run's artifacts are intact."""
    from refusal_fast.artifacts import verify

    out = cli_env / "concurrent"
    data = ["--harmful", cli_env / "harmful.json", "--harmless", cli_env / "harmless.json", "--n-train", "6"]
    argv = ["extract", *_opts(cli_env, "model_a", out), *data]
    first = subprocess.Popen([sys.executable, "-m", "refusal_fast.cli", *map(str, argv)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    lock = out / ".refusal-fast.lock"
    try:
        deadline = time.monotonic() + 240
        while f"pid {first.pid}:" not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None, f"the first run ended without holding a lock on --out: {first.communicate()}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # hold it inside its run, lock taken
        try:
            code, err2 = _cli(argv)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _, err1 = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err1
    assert code == 1, err2
    assert "in use by another refusal-fast run" in err2 and f"pid {first.pid}" in err2
    assert verify(out / "means.safetensors")["sidecar"] == "ok"
    assert Means.load(out / "means.safetensors").count("harmful") == 6
    run = json.loads((out / "run.json").read_text())
    assert [c["command"] for c in run["commands"]] == ["extract"]


# ============================================================================================
# 6. integrity: checksums, NaN sums, layers beyond the depth, partial checkpoints


def test_bit_flip_in_means_direction_checkpoint_detected(pair, tok, means_a, tmp_path):
    path = means_a.save(tmp_path / "means.safetensors")
    _flip_data_byte(path, "sums")
    with pytest.raises(ValueError, match="checksum") as err:
        Means.load(path)
    assert str(path) in str(err.value)
    d = save_direction(tmp_path / "direction.safetensors", torch.randn(80, dtype=torch.float64), {"layer": 1})
    _flip_data_byte(d, "direction", 17)
    with pytest.raises(ValueError, match="checksum"):
        load_direction(d)
    ckpt = tmp_path / "state.safetensors"
    extract_means(pair[0], tok, GROUPS, batch_size=4, progress=False, checkpoint=ckpt)
    _flip_data_byte(ckpt, "sums", 40)
    with pytest.raises(ValueError, match="checksum"):
        extract_means(pair[0], tok, GROUPS, batch_size=4, progress=False, checkpoint=ckpt)


def test_bit_flip_in_selection_json_detected(tmp_path):
    from fault_writer import selection_at

    p = selection_at(3).to_json(tmp_path / "selection.json")
    d = json.loads(p.read_text())
    d["direction"][5] = d["direction"][5] * (1 + 2 ** -40)  # a changed digit deep in one number
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="checksum"):
        SelectionResult.from_json(p)


def test_means_load_rejects_nan_layers_beyond_depth_and_partial(pair, tok, tmp_path):
    from fault_writer import means_at

    bad = means_at(1)
    sums = torch.stack([bad.sum(g) for g in bad.groups], dim=1)
    sums[0, 0, 0, 0] = math.nan
    Means(sums, [2, 3], bad.groups, bad.layers, bad.positions, bad.metadata).save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        Means.load(tmp_path / "nan.safetensors")
    deep = Means(torch.zeros(2, 2, 2, 24, dtype=torch.float64), [1, 1], bad.groups, [0, 7], bad.positions,
                 bad.metadata)  # the recorded model has 3 layers
    deep.save(tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match="depth"):
        Means.load(tmp_path / "deep.safetensors")
    # a partial checkpoint is not a finished result unless asked for
    ckpt = tmp_path / "partial.safetensors"

    def stop(done):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(extract_module, "_after_batch", stop)
        extract_means(pair[0], tok, GROUPS, batch_size=2, progress=False, checkpoint=ckpt, checkpoint_every=1)
    with pytest.raises(ValueError, match="checkpoint"):
        Means.load(ckpt)
    assert Means.load(ckpt, allow_partial=True).metadata["checkpoint"]["batches_done"] == 2


# ============================================================================================
# 7. numeric edge cases


def test_vector_overflowing_the_model_dtype_is_refused(tok):
    m = make_model("llama", tok)
    with pytest.raises(ValueError, match="overflow"):
        with iv.add(m, torch.full((80,), 1e300, dtype=torch.float64), layers=[1]):
            pass
    half = make_model("llama", tok, dtype=torch.float16)
    with pytest.raises(ValueError, match="overflow float16"):
        with iv.steer(half, torch.randn(80), layers=[1], alpha=1e6):
            pass
    with iv.steer(half, torch.randn(80), layers=[1], alpha=100.0):  # representable: fine
        pass


def test_alpha_numpy_scalar_and_0d_tensor(tok):
    m = make_model("llama", tok)
    enc = tok(["Hello there"], return_tensors="pt")
    v = torch.randn(80, generator=torch.Generator().manual_seed(0))
    outs = []
    for alpha in (2.0, np.float32(2.0), np.int64(2), torch.tensor(2.0)):
        with torch.no_grad(), iv.add(m, v, layers=[1], alpha=alpha):
            outs.append(m(**enc).logits)
        with torch.no_grad(), iv.steer(m, v, layers=[1], alpha=alpha):
            outs.append(m(**enc).logits)
    for i in range(2, len(outs)):
        assert torch.equal(outs[i], outs[i % 2])
    for bad in (np.bool_(True), torch.tensor([1.0, 2.0]), float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            with iv.add(m, v, layers=[1], alpha=bad):
                pass


# ============================================================================================
# 8. unclear errors made clear


def test_directory_truncated_and_non_json_metadata_errors(means_a, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        Means.load(tmp_path)
    path = means_a.save(tmp_path / "means.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as err:
        Means.load(tmp_path / "cut.safetensors")
    assert "cut.safetensors" in str(err.value)
    from safetensors.torch import save_file

    save_file({"sums": torch.zeros(1)}, str(tmp_path / "badmeta.safetensors"),
              metadata={"refusal_fast": "{not json", "refusal_fast.integrity": "{}"})
    with pytest.raises(ValueError, match="not valid JSON") as err:
        Means.load(tmp_path / "badmeta.safetensors")
    assert not isinstance(err.value, json.JSONDecodeError) and "badmeta.safetensors" in str(err.value)


def test_checkpoint_path_that_is_a_directory(pair, tok, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        extract_means(pair[0], tok, GROUPS, batch_size=4, progress=False, checkpoint=tmp_path)


def test_prompt_longer_than_the_position_table(tok):
    gpt2 = make_model("gpt2", tok)  # 512 learned positions
    long = " ".join(["word"] * 700)
    with pytest.raises(ValueError, match="n_positions") as err:
        extract_means(gpt2, tok, {"a": ["short one", long], "b": ["x"]}, progress=False)
    assert "prompt 1" in str(err.value)
    with pytest.raises(ValueError, match="n_positions"):
        refusal_scores(gpt2, tok, [long], progress=False)
    n = len(tok(long)["input_ids"])
    with pytest.raises(ValueError, match="generate fewer tokens"):  # the prompt fits, prompt + new tokens do not
        generate_completions(gpt2, tok, [" ".join(["word"] * 100)], max_new_tokens=500, progress=False)
    assert n > 512
    llama = make_model("llama", tok)  # rotary, max_position_embeddings 512: warns, works
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        extract_means(llama, tok, {"a": [long], "b": ["x"]}, layers=[1], progress=False)


def test_meta_device_model_is_a_clear_error(tok):
    with torch.device("meta"):
        m = make_model("llama", tok)
    with pytest.raises(ValueError, match="meta device"):
        extract_means(m, tok, GROUPS, progress=False)


def test_prune_last_frac_not_a_number(pair, tok, means_a):
    with pytest.raises(ValueError, match="prune_last_frac must be a number"):
        select_direction(pair[0], tok, means_a, HARMFUL[:2], HARMLESS[:2], prune_last_frac="x", progress=False)


def test_rank_above_kernel_maximum_fails_at_entry(tok):
    from refusal_fast import ops

    m = make_model("llama", tok)
    basis = torch.randn(ops.MAX_K + 1, 80, generator=torch.Generator().manual_seed(0))
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="maximum"):
            with iv.ablate(m, basis):
                pass
    with iv.ablate(m, basis[: ops.MAX_K]):  # at the limit: fine
        pass


# ============================================================================================
# 9. the caller's tokenizer is not changed


def test_public_functions_leave_the_tokenizer_alone(pair, tok):
    a = pair[0]
    mine = copy.deepcopy(tok)
    mine.pad_token = None
    mine.padding_side = "right"
    prompts = HARMFUL[:3]
    got = extract_means(a, mine, GROUPS, batch_size=4, progress=False)
    s = refusal_scores(a, mine, prompts, progress=False)
    lp = last_token_logprobs(a, mine, prompts, progress=False)
    kl = kl_divergence(a, mine, prompts, reference=lp, progress=False)
    text = generate_completions(a, mine, prompts[:2], max_new_tokens=2, progress=False)
    assert mine.pad_token is None and mine.padding_side == "right"
    ref = extract_means(a, tok, GROUPS, batch_size=4, progress=False)
    for g in GROUPS:
        torch.testing.assert_close(got.sum(g), ref.sum(g), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, refusal_scores(a, tok, prompts, progress=False), rtol=1e-6, atol=1e-6)
    assert float(kl.max()) < 1e-9 and len(text) == 2


# ============================================================================================
# fault injection: SIGKILL a writer at random points


def _check_artifacts(d: Path) -> dict:
    """Every artifact in ``d`` loads and verifies (tensor checksums; a sidecar equals its header) or is absent."""
    seen = {}
    for name in ("means.safetensors", "checkpoint.safetensors"):
        p = d / name
        if p.exists():
            try:
                m = Means.load(p, allow_partial=True)
            except TypeError:  # (code without allow_partial)
                m = Means.load(p)
            side = p.with_suffix(".json")
            if name == "means.safetensors" and side.exists():
                assert json.loads(side.read_text()) == m.metadata, f"{side} does not match {p}"
            seen[name] = m.metadata["iteration"]
    if (d / "selection.json").exists():
        sel = SelectionResult.from_json(d / "selection.json")
        torch.testing.assert_close(sel.direction, sel.raw / sel.raw.norm(), rtol=0, atol=1e-15)
        seen["selection.json"] = sel.params["iteration"]
    if (d / "direction.safetensors").exists():
        t, meta = load_direction(d / "direction.safetensors")
        assert t.shape == (24,)
        seen["direction.safetensors"] = meta["iteration"]
    if (d / "eval.json").exists():
        seen["eval.json"] = json.loads((d / "eval.json").read_text())["iteration"]
    return seen


def test_sigkilled_writer_never_leaves_a_bad_artifact(tmp_path):
    """50 SIGKILLs at random points of a loop that saves means, a checkpoint, selection.json, a direction
    file and a JSON artifact. The writer is a fork of this process (torch already imported: ~ms per start)."""
    import fault_writer

    rng = random.Random(0)
    kills, latest, temp_files = 50, [], 0
    for _ in range(kills):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(r)
            try:
                os.write(w, b"1")
                fault_writer.write_loop(str(tmp_path))
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        if not (tmp_path / "eval.json").exists():  # the first writer completes one round, however busy the CPU
            deadline = time.monotonic() + 120
            while not (tmp_path / "eval.json").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftovers = list(tmp_path.glob(".*.tmp"))
        temp_files += bool(leftovers)
        for t in leftovers:  # a killed writer's temporary file is never read; clear it
            t.unlink()
        latest.append(_check_artifacts(tmp_path).get("means.safetensors", 0))
    assert set(_check_artifacts(tmp_path)) == {"means.safetensors", "checkpoint.safetensors", "selection.json",
                                              "direction.safetensors", "eval.json"}
    assert max(latest) >= 1
    assert temp_files >= 1  # some kills landed inside a write: the protocol, not luck, kept the artifacts whole
