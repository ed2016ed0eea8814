"""extract_means / Means against a naive float64 reference on tiny models of every architecture."""
import copy
import json

import pytest
import torch
from tiny_models import make_model, make_tokenizer

from refusal_fast import chat, datasets
from refusal_fast import extract as extract_module
from refusal_fast.extract import Means, extract_means
from refusal_fast.models import get_adapter

BS = 5  # batch size: mixes groups within batches and leaves a ragged last batch


def naive_reference(model, tok, groups, positions, layers, system_prompt=None, second_layer=None):
    """Per prompt, unpadded, float64 copy of the model, output_hidden_states; gather and average."""
    ref = copy.deepcopy(model).to(torch.float64)
    if getattr(ref, "_can_set_experts_implementation", lambda: False)():
        ref.set_experts_implementation("eager")  # grouped_mm experts kernels take no float64
    means, seconds = {}, {}
    with torch.no_grad():
        for g, prompts in groups.items():
            total, total2 = 0, 0
            for p in prompts:
                text = chat.format_prompt(tok, p, system_prompt)
                ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
                x = torch.stack([hs[layer][0, positions] for layer in layers])  # [L, P, d]
                total = total + x
                if second_layer is not None:
                    xl = hs[second_layer][0, positions]  # [P, d]
                    total2 = total2 + xl[:, :, None] * xl[:, None, :]
            means[g] = total / len(prompts)
            if second_layer is not None:
                seconds[g] = total2 / len(prompts)
    return means, seconds


def assert_rel_close(actual, expected, rtol=1e-5, scale_of=None):
    """Max abs error per layer within rtol of that layer's max magnitude (of ``scale_of`` if given)."""
    assert actual.shape == expected.shape and actual.dtype == torch.float64
    scale_of = expected if scale_of is None else scale_of
    for i in range(actual.shape[0]):
        err = (actual[i] - expected[i]).abs().max().item()
        scale = scale_of[i].abs().max().item()
        assert err <= rtol * scale, f"layer slot {i}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def groups(harmful, harmless):
    return {"harmful": harmful[:8], "harmless": harmless[:7]}


def test_matches_naive_reference_all_archs(any_arch, groups):
    model, tok = any_arch
    adapter = get_adapter(model)
    means = extract_means(model, tok, groups, batch_size=BS, progress=False)
    positions = chat.eoi_positions(tok)
    assert means.positions == positions
    assert means.layers == list(range(adapter.n_layers))
    assert means.stats["padded_tokens"] > means.stats["tokens"]  # left padding really exercised
    ref, _ = naive_reference(model, tok, groups, positions, means.layers)
    for g, prompts in groups.items():
        assert means.count(g) == len(prompts)
        m = means.mean(g)
        assert m.shape == (adapter.n_layers, len(positions), adapter.d_model)
        assert_rel_close(m, ref[g])
    # layer 0 at template positions: identical tokens, so the diff is ~0; scale by the means
    assert_rel_close(means.diff("harmful", "harmless"), ref["harmful"] - ref["harmless"], scale_of=ref["harmful"])


def test_explicit_positions_layers_system_prompt(llama, groups):
    model, tok = llama
    sp = "You are a careful assistant."
    means = extract_means(model, tok, groups, positions=[-1, -9, -3], layers=[2, 0], batch_size=4,
                          system_prompt=sp, progress=True)
    assert means.positions == [-9, -3, -1] and means.layers == [0, 2]
    ref, _ = naive_reference(model, tok, groups, [-9, -3, -1], [0, 2], system_prompt=sp)
    for g in groups:
        assert_rel_close(means.mean(g), ref[g])
    assert means.metadata["system_prompt"] == sp


def test_gemma_system_prompt_and_negative_layer(gemma2, groups):
    model, tok = gemma2
    means = extract_means(model, tok, groups, layers=-1, batch_size=BS, system_prompt="Be brief.", progress=False)
    assert means.layers == [2]
    ref, _ = naive_reference(model, tok, groups, means.positions, [2], system_prompt="Be brief.")
    for g in groups:
        assert_rel_close(means.mean(g), ref[g])


def test_second_moments_match_reference(gpt2, groups):
    model, tok = gpt2
    means = extract_means(model, tok, groups, layers=[0, 1], batch_size=BS, second_moment_layers=[1], progress=False)
    assert means.second_moment_layers == [1]
    ref, ref2 = naive_reference(model, tok, groups, means.positions, [0, 1], second_layer=1)
    for g in groups:
        assert_rel_close(means.second_moment(g, 1), ref2[g])
        mu = ref[g][1]
        cov = ref2[g] - mu[:, :, None] * mu[:, None, :]
        err = (means.covariance(g, 1) - cov).abs().max().item()
        assert err <= 1e-4 * cov.abs().max().item()
        n = means.count(g)
        torch.testing.assert_close(means.covariance(g, 1, unbiased=True), means.covariance(g, 1) * n / (n - 1))
    with pytest.raises(KeyError, match="second moments"):
        means.second_moment("harmful", 0)


def test_bf16_model(groups):
    tok = make_tokenizer("chatml")
    m16 = make_model("qwen2", tok, dtype=torch.bfloat16)
    a = extract_means(m16, tok, groups, batch_size=BS, progress=False)
    ref, _ = naive_reference(m16, tok, groups, a.positions, a.layers)
    for g in groups:
        # bf16 forward rounding (batched vs single) only; accumulation itself is fp32/fp64
        assert_rel_close(a.mean(g), ref[g], rtol=5e-2)
    assert a.metadata["model"]["dtype"] == "bfloat16"


def test_forward_stops_after_last_needed_layer_and_hooks_removed(llama, groups):
    model, tok = llama
    adapter = get_adapter(model)
    calls = {"blocks": [], "norm": 0, "lm_head": 0}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls["blocks"].append(i))
               for i, b in enumerate(adapter.blocks)]
    handles.append(adapter.final_norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1)))
    handles.append(adapter.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)))
    before = {i: len(b._forward_pre_hooks) for i, b in enumerate(adapter.blocks)}
    try:
        extract_means(model, tok, groups, layers=[1], batch_size=BS, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert set(calls["blocks"]) == {0}  # block 1's input is captured before block 1 runs
    assert calls["norm"] == 0 and calls["lm_head"] == 0
    assert {i: len(b._forward_pre_hooks) for i, b in enumerate(adapter.blocks)} == before

    def boom(done):
        raise RuntimeError("injected")

    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="injected"):
        mp.setattr(extract_module, "_after_batch", boom)
        extract_means(model, tok, groups, batch_size=BS, progress=False)
    assert {i: len(b._forward_pre_hooks) for i, b in enumerate(adapter.blocks)} == before


def test_deterministic_bit_identical(llama, groups):
    model, tok = llama
    a = extract_means(model, tok, groups, batch_size=BS, deterministic=True, progress=False)
    b = extract_means(model, tok, groups, batch_size=BS, deterministic=True, progress=False)
    for g in groups:
        assert torch.equal(a.sum(g), b.sum(g))
    assert a.metadata["deterministic"] is True


def test_merge_halves_equals_whole(llama, groups):
    model, tok = llama
    # batch_size=1: no padding, so every prompt's activations are identical in all runs and
    # the comparison checks the bookkeeping exactly (float64 summation order only)
    kw = dict(batch_size=1, second_moment_layers=[2], progress=False)
    groups = {g: p[:5] for g, p in groups.items()}
    whole = extract_means(model, tok, groups, **kw)
    first = extract_means(model, tok, {g: p[: len(p) // 2] for g, p in groups.items()}, **kw)
    second = extract_means(model, tok, {g: p[len(p) // 2:] for g, p in groups.items()}, **kw)
    merged = first.merge(second)
    assert merged.groups == whole.groups
    for g in groups:
        assert merged.count(g) == whole.count(g)
        torch.testing.assert_close(merged.sum(g), whole.sum(g), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(merged.second_moment(g, 2), whole.second_moment(g, 2), rtol=1e-12, atol=1e-9)
    assert merged.metadata["prompt_sets"] == whole.metadata["prompt_sets"]
    assert merged.metadata["counts"] == whole.metadata["counts"]
    # disjoint groups: a harmful-only run merged with a harmless-only run
    only_a = extract_means(model, tok, {"harmful": groups["harmful"]}, **kw)
    only_b = extract_means(model, tok, {"harmless": groups["harmless"]}, **kw)
    both = only_a.merge(only_b)
    assert both.groups == ["harmful", "harmless"]
    torch.testing.assert_close(both.diff("harmful", "harmless"), whole.diff("harmful", "harmless"),
                               rtol=1e-12, atol=1e-9)


def test_merge_incompatible_raises(llama, gpt2, groups):
    (model, tok), (other, _) = llama, gpt2
    a = extract_means(model, tok, groups, layers=[0, 1], batch_size=BS, progress=False)
    with pytest.raises(ValueError, match="layers"):
        a.merge(extract_means(model, tok, groups, layers=[0], batch_size=BS, progress=False))
    with pytest.raises(ValueError, match="positions"):
        a.merge(extract_means(model, tok, groups, layers=[0, 1], positions=[-2, -1], batch_size=BS, progress=False))
    with pytest.raises(ValueError, match="config_hash|n_layers|d_model"):
        a.merge(extract_means(other, tok, groups, layers=[0, 1], batch_size=BS, progress=False))
    with pytest.raises(TypeError):
        a.merge({"harmful": 1})


def test_resume_equals_one_run(llama, groups, tmp_path):
    model, tok = llama
    kw = dict(batch_size=3, second_moment_layers=[1], progress=False, deterministic=True)
    one = extract_means(model, tok, groups, **kw)
    for every in (None, 1, 2):
        ckpt = tmp_path / f"state_{every}.safetensors"

        def interrupt(done):
            if done == 3:
                raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
            mp.setattr(extract_module, "_after_batch", interrupt)
            extract_means(model, tok, groups, checkpoint=ckpt, checkpoint_every=every, **kw)
        assert ckpt.exists()
        partial = Means.load(ckpt, allow_partial=True)
        assert partial.metadata["checkpoint"]["batches_done"] == 3
        assert sum(partial.count(g) for g in groups) == 9
        resumed = extract_means(model, tok, groups, checkpoint=ckpt, checkpoint_every=every, **kw)
        assert resumed.stats["resumed_batches"] == 3
        for g in groups:
            assert resumed.count(g) == one.count(g)
            assert torch.equal(resumed.sum(g), one.sum(g))
            assert torch.equal(resumed.second_moment(g, 1), one.second_moment(g, 1))
        # a finished checkpoint returns the result without another forward pass
        again = extract_means(model, tok, groups, checkpoint=ckpt, checkpoint_every=every, **kw)
        assert again.stats["resumed_batches"] == again.stats["n_batches"]
        assert torch.equal(again.sum("harmful"), one.sum("harmful"))
    with pytest.raises(ValueError, match="different arguments"):
        extract_means(model, tok, groups, checkpoint=ckpt, batch_size=4, progress=False)


def test_accumulator_size_independent_of_prompt_count(llama):
    model, tok = llama
    prompts = datasets.instructions("harmless_train", n=200)
    small = extract_means(model, tok, {"a": prompts[:10], "b": prompts[10:20]}, batch_size=32, progress=False)
    large = extract_means(model, tok, {"a": prompts[:100], "b": prompts[100:]}, batch_size=32, progress=False)
    assert large.count("a") + large.count("b") == 200
    assert small.stats["accumulator_nbytes"] == large.stats["accumulator_nbytes"] > 0
    assert small.state_nbytes == large.state_nbytes
    G, L, P, d = 2, 3, len(small.positions), 80
    # fp32 partials + float64 totals, nothing per prompt
    assert large.stats["accumulator_nbytes"] == L * G * P * d * (4 + 8)


def test_save_load_roundtrip_and_model_check(llama, gpt2, groups, tmp_path):
    model, tok = llama
    means = extract_means(model, tok, groups, layers=[0, 2], batch_size=BS, second_moment_layers=[2], progress=False)
    path = tmp_path / "means.safetensors"
    means.save(path)
    side = json.loads((tmp_path / "means.json").read_text())
    loaded = Means.load(path, model=model)
    assert loaded.metadata == means.metadata == side
    meta = loaded.metadata
    assert meta["model"]["config_hash"] == get_adapter(model).config_hash
    assert meta["model"]["arch"] == "llama" and meta["layers"] == [0, 2]
    assert meta["positions"] == chat.eoi_positions(tok)
    assert meta["counts"] == {g: len(p) for g, p in groups.items()}
    assert meta["template"]["sha256"] == chat.template_fingerprint(tok)
    assert meta["template"]["eoi_tokens"] == chat.eoi_tokens(tok)
    assert set(meta["prompt_sets"]) == set(groups) and meta["library_version"]
    for g in groups:
        assert torch.equal(loaded.sum(g), means.sum(g)) and loaded.count(g) == means.count(g)
        assert torch.equal(loaded.second_moment(g, 2), means.second_moment(g, 2))
    with pytest.raises(ValueError, match="config_hash"):
        Means.load(path, model=gpt2[0])
    deeper = make_model("llama", tok, n_layers=4)
    with pytest.raises(ValueError, match="extracted from model"):
        Means.load(path, model=deeper)
    with pytest.raises(FileNotFoundError):
        Means.load(tmp_path / "missing.safetensors")


def test_prompt_set_hash_is_order_independent(llama, groups):
    model, tok = llama
    a = extract_means(model, tok, groups, layers=[0], batch_size=BS, progress=False)
    b = extract_means(model, tok, {g: p[::-1] for g, p in groups.items()}, layers=[0], batch_size=BS, progress=False)
    assert a.metadata["prompt_sets"] == b.metadata["prompt_sets"]
    assert a.metadata["prompt_sets"]["harmful"] != a.metadata["prompt_sets"]["harmless"]


def test_bad_input(llama, groups):
    model, tok = llama
    ok = {"harmful": groups["harmful"][:2]}
    with pytest.raises(ValueError, match="empty"):
        extract_means(model, tok, {}, progress=False)
    with pytest.raises(ValueError, match="'harmless' is empty"):
        extract_means(model, tok, {"harmful": ["a"], "harmless": []}, progress=False)
    with pytest.raises(TypeError, match="prompt 1"):
        extract_means(model, tok, {"harmful": ["a", 3]}, progress=False)
    with pytest.raises(TypeError, match="list of prompt strings"):
        extract_means(model, tok, {"harmful": "just one string"}, progress=False)
    with pytest.raises(TypeError, match="dict"):
        extract_means(model, tok, ["a", "b"], progress=False)
    with pytest.raises(ValueError, match="not a negative offset"):
        extract_means(model, tok, ok, positions=[0], progress=False)
    with pytest.raises(ValueError, match="shortest prompt"):
        extract_means(model, tok, ok, positions=[-1000], progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        extract_means(model, tok, ok, positions=[-1, -1], progress=False)
    with pytest.raises(TypeError, match="positions"):
        extract_means(model, tok, ok, positions=[-1.5], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        extract_means(model, tok, ok, layers=[3], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        extract_means(model, tok, ok, layers=[-4], progress=False)
    with pytest.raises(ValueError, match="not among the extracted layers"):
        extract_means(model, tok, ok, layers=[0], second_moment_layers=[1], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_means(model, tok, ok, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="not initialised"):
        extract_means(model, tok, ok, distributed=True, progress=False)
    means = extract_means(model, tok, ok, layers=[0], progress=False)
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        means.mean("nope")
    with pytest.raises(TypeError):
        means.mean(0)
    with pytest.raises(ValueError, match="no second moments"):
        means.covariance("harmful", 2)
