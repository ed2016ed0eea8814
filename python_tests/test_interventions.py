"""ablate / steer / add / row_interventions / fused ablation on tiny random models."""
import copy
import time
from contextlib import contextmanager

import pytest
import torch
from tiny_models import library_hooks, make_model

from refusal_fast import interventions as iv
from refusal_fast.chat import encode_prompts
from refusal_fast.models import block_input, get_adapter, module_output_tensor

PROMPTS = ["How do I bake bread?", "Tell me a joke", "Write a poem about the sea and the sky at night."]
TOL = 1e-5  # relative residual component inside ablate, fp32


def _basis(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64)


def _inputs(tok, prompts=PROMPTS):
    return encode_prompts(tok, prompts)


@torch.no_grad()
def _logits(model, enc):
    return model(**enc).logits


def _no_hooks(model):
    left = library_hooks(model)
    assert not left, f"refusal-fast hooks left on the model: {left}"
    for m in model.modules():
        assert "forward" not in m.__dict__, f"patched forward left on {type(m).__name__}"


@contextmanager
def probe(model, layers=None):
    """Capture (clones of) block inputs and attn/mlp outputs; register after the intervention hooks."""
    ad = get_adapter(model)
    layers = range(ad.n_layers) if layers is None else layers
    seen, handles = {}, []

    def pre(name):
        def hook(mod, args, kwargs):
            seen[name] = block_input(args, kwargs).detach().clone()
        return hook

    def out(name):
        def hook(mod, args, output):
            seen[name] = module_output_tensor(output).detach().clone()
        return hook

    try:
        for i in layers:
            handles.append(ad.blocks[i].register_forward_pre_hook(pre(("resid", i)), with_kwargs=True))
            handles.append(ad.attn_out(i).register_forward_hook(out(("attn", i))))
            handles.append(ad.mlp_out(i).register_forward_hook(out(("mlp", i))))
        yield seen
    finally:
        for h in handles:
            h.remove()


def _rel_component(x, q):
    """max over tokens of |Q x| / |x| (rows with |x| = 0 ignored)."""
    q = q.to(torch.float64)
    x = x.to(torch.float64).reshape(-1, x.shape[-1])
    num = (x @ q.T).norm(dim=-1)
    den = x.norm(dim=-1)
    keep = den > 0
    return (num[keep] / den[keep]).max().item()


# ------------------------------------------------------------------------------------------
# ablate


def test_ablate_zero_component_all_archs(any_arch):
    model, tok = any_arch
    ad = get_adapter(model)
    enc = _inputs(tok)
    before = _logits(model, enc)
    basis = _basis(ad.d_model, 2)
    with iv.ablate(model, basis) as q, probe(model) as seen, torch.no_grad():
        ablated = model(**enc).logits
    assert len(seen) == 3 * ad.n_layers
    for name, x in seen.items():
        assert _rel_component(x, q) < TOL, name
    # without the intervention the component is far from zero
    with probe(model) as raw, torch.no_grad():
        model(**enc)
    assert min(_rel_component(x, q) for x in raw.values()) > 1e-3
    assert not torch.allclose(ablated, before)
    _no_hooks(model)
    assert torch.equal(_logits(model, enc), before)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_ablate_rank_k_equals_orthogonalized_copy(llama, k):
    model, tok = llama
    enc = _inputs(tok)
    before = _logits(model, enc)
    basis = _basis(get_adapter(model).d_model, k, seed=k)
    with iv.ablate(model, basis) as q, probe(model) as seen:
        ablated = _logits(model, enc)
    assert q.shape == (k, 80)
    assert max(_rel_component(x, q) for x in seen.values()) < TOL
    edited = copy.deepcopy(model)
    iv.orthogonalize(edited, basis)
    torch.testing.assert_close(ablated, _logits(edited, enc), rtol=1e-4, atol=1e-4)
    assert torch.equal(_logits(model, enc), before)


def _with_random_biases(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_ablate_equals_orthogonalize_with_biases(arch, tokenizer):
    """gpt2: tied embeddings, Conv1D and c_proj biases; qwen2: q/k/v biases."""
    model = _with_random_biases(make_model(arch, tokenizer, seed=3))
    assert any(n.endswith("bias") for n, _ in model.named_parameters())
    enc = _inputs(tokenizer)
    basis = _basis(get_adapter(model).d_model, 3, seed=1)
    with iv.ablate(model, basis):
        ablated = _logits(model, enc)
    rec = iv.orthogonalize(model, basis)
    torch.testing.assert_close(ablated, _logits(model, enc), rtol=1e-4, atol=1e-4)
    rec.undo()


def test_layer_window(llama):
    model, tok = llama
    enc = _inputs(tok)
    basis = _basis(80, 2)
    with iv.ablate(model, basis, layers=[1]) as q, probe(model) as seen:
        _logits(model, enc)
    for name in [("resid", 0), ("attn", 0), ("mlp", 0), ("attn", 2), ("mlp", 2)]:
        assert _rel_component(seen[name], q) > 1e-3, name  # outside the window: untouched
    for name in [("resid", 1), ("attn", 1), ("mlp", 1), ("resid", 2)]:  # resid 2 = sum of projected terms
        assert _rel_component(seen[name], q) < TOL, name
    with iv.ablate(model, basis, layers=range(1, 3)) as q, probe(model) as seen:
        _logits(model, enc)
    assert _rel_component(seen[("resid", 0)], q) > 1e-3
    assert max(_rel_component(x, q) for (kind, i), x in seen.items() if i >= 1) < TOL
    with iv.ablate(model, basis, layers=-1) as q, probe(model) as seen:  # negative = from the end
        _logits(model, enc)
    assert _rel_component(seen[("mlp", 2)], q) < TOL and _rel_component(seen[("mlp", 1)], q) > 1e-3


def test_affine_ablation_sets_mean_component(llama):
    model, tok = llama
    enc = _inputs(tok)
    basis, mean = _basis(80, 2), torch.randn(80, dtype=torch.float64)
    with iv.ablate(model, basis, mean=mean) as q, probe(model) as seen:
        _logits(model, enc)
    target = (q @ mean).float()
    for i in range(3):
        x = seen[("resid", i)].reshape(-1, 80).double()
        torch.testing.assert_close((x @ q.T).float(), target.expand(x.shape[0], -1), atol=1e-5, rtol=1e-5)
        assert _rel_component(seen[("attn", i)], q) < TOL and _rel_component(seen[("mlp", i)], q) < TOL
    # per-layer means: a mapping and a [len(layers), d] matrix are equivalent
    means = torch.randn(2, 80, dtype=torch.float64)
    with iv.ablate(model, basis, layers=[0, 2], mean=means):
        a = _logits(model, enc)
    with iv.ablate(model, basis, layers=[0, 2], mean={0: means[0], 2: means[1]}):
        b = _logits(model, enc)
    assert torch.equal(a, b)


def test_ablate_autograd_out_of_place(llama):
    """With autograd tracking, hooks compute out of place: gradients flow, same values as in place."""
    model, tok = llama
    enc = _inputs(tok)
    embeds = get_adapter(model).embed(enc["input_ids"]).detach().requires_grad_(True)
    orig = embeds.detach().clone()
    kw = dict(attention_mask=enc["attention_mask"], position_ids=enc["position_ids"])
    basis = _basis(80, 2)
    with iv.ablate(model, basis):
        with torch.no_grad():
            ref = model(inputs_embeds=embeds.detach().clone(), **kw).logits
        out = model(inputs_embeds=embeds, **kw).logits
        out.sum().backward()
    assert torch.equal(embeds.detach(), orig)  # the caller's block-0 input was not edited in place
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    g = embeds.grad.reshape(-1, 80).double()
    q = torch.linalg.qr(basis.T)[0].T
    assert (g @ q.T).abs().max() < 1e-6 * g.abs().max()  # gradient has no component along Q
    model.zero_grad(set_to_none=True)


def test_ablate_inference_mode_and_no_user_input_mutation(llama):
    model, tok = llama
    enc = _inputs(tok)
    embeds = get_adapter(model).embed(enc["input_ids"]).detach()
    orig = embeds.clone()
    with iv.ablate(model, _basis(80, 1)), torch.inference_mode():
        out = model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    assert torch.equal(embeds, orig)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------
# steer / add


@pytest.mark.parametrize("alpha", [1.0, -3.5])
def test_steer_adds_exactly_alpha_v(llama, alpha):
    model, tok = llama
    enc = _inputs(tok)
    v = torch.randn(80, dtype=torch.float64) * 7
    unit = (v / v.norm()).float()
    for layer in (0, 2):
        with probe(model, [layer]) as pre_seen, iv.steer(model, v, [layer], alpha=alpha), \
                probe(model, [layer]) as post_seen:
            _logits(model, enc)
        delta = post_seen[("resid", layer)] - pre_seen[("resid", layer)]
        torch.testing.assert_close(delta, (alpha * unit).expand_as(delta), rtol=0, atol=2e-6)


def test_steer_norm_match(llama):
    model, tok = llama
    enc = _inputs(tok)
    v = torch.randn(80, dtype=torch.float64)
    with probe(model, [1]) as a, iv.steer(model, v, 1, alpha=0.5, norm_match=True), probe(model, [1]) as b:
        _logits(model, enc)
    x = a[("resid", 1)]
    expect = 0.5 * x.norm(dim=-1, keepdim=True) * (v / v.norm()).float()
    torch.testing.assert_close(b[("resid", 1)] - x, expect, rtol=1e-5, atol=1e-5)


def test_add_raw_vector(gpt2):
    model, tok = gpt2
    enc = _inputs(tok)
    v = torch.randn(80, dtype=torch.float64) * 3
    before = _logits(model, enc)
    with probe(model, [0, 1]) as a, iv.add(model, v, [0, 1]), probe(model, [0, 1]) as b:
        _logits(model, enc)
    for i in (0, 1):
        d = b[("resid", i)] - a[("resid", i)]
        torch.testing.assert_close(d, v.float().expand_as(d), rtol=0, atol=1e-5)
    _no_hooks(model)
    assert torch.equal(_logits(model, enc), before)


# ------------------------------------------------------------------------------------------
# context-manager hygiene


def test_nested_contexts(llama):
    model, tok = llama
    enc = _inputs(tok)
    before = _logits(model, enc)
    # nested ablations compose their projections; for mutually orthogonal subspaces the composition
    # is the projection onto the complement of their sum
    qq = iv.orthonormalize(_basis(80, 3, seed=1))
    b1, b2 = qq[:1] * 3, qq[1:]
    with iv.ablate(model, b1) as q1:
        with iv.ablate(model, b2) as q2, probe(model) as seen:
            _logits(model, enc)
        both = torch.cat([q1, q2])
        assert max(_rel_component(x, both) for x in seen.values()) < TOL
        # steering inside an ablation of the same direction: the outer hook runs first, the steer survives
        with iv.steer(model, b1[0], [1], alpha=2.0), probe(model, [1, 2]) as seen:
            _logits(model, enc)
        c = (seen[("resid", 1)].double().reshape(-1, 80) @ q1.T)
        torch.testing.assert_close(c, torch.full_like(c, 2.0), rtol=0, atol=1e-5)
        assert _rel_component(seen[("attn", 2)], q1) < TOL
        with probe(model) as seen:  # inner contexts gone, outer still active
            _logits(model, enc)
        assert max(_rel_component(x, q1) for x in seen.values()) < TOL
        assert min(_rel_component(x, q2) for x in seen.values()) > 1e-3
    _no_hooks(model)
    assert torch.equal(_logits(model, enc), before)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_context_removes_hooks(llama, exc):
    model, tok = llama
    enc = _inputs(tok)
    before = _logits(model, enc)
    for ctx in (lambda: iv.ablate(model, _basis(80, 2)), lambda: iv.steer(model, _basis(80, 1)[0], [0, 1]),
                lambda: iv.add(model, _basis(80, 1)[0], 1), lambda: iv.ablate(model, _basis(80, 1), fused=True),
                lambda: iv.row_interventions(model)):
        with pytest.raises(exc):
            with ctx():
                _logits(model, enc)
                raise exc("boom")
        _no_hooks(model)
    assert torch.equal(_logits(model, enc), before)


def test_failure_while_registering_removes_hooks(llama, monkeypatch):
    model, _ = llama
    ad = get_adapter(model)
    target = ad.mlp_out(2)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, "register_forward_hook", boom)
    with pytest.raises(KeyboardInterrupt):
        with iv.ablate(model, _basis(80, 1)):
            pass
    with pytest.raises(KeyboardInterrupt):
        with iv.row_interventions(model):
            pass
    monkeypatch.undo()
    _no_hooks(model)


def test_bad_inputs(llama, gpt2):
    model, _ = llama
    with pytest.raises(ValueError, match="d_model"):
        with iv.ablate(model, torch.randn(81)):
            pass
    with pytest.raises(ValueError, match="NaN"):
        with iv.ablate(model, torch.full((80,), float("nan"))):
            pass
    with pytest.raises(ValueError, match="rank-deficient"):
        with iv.ablate(model, torch.ones(2, 80)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with iv.ablate(model, torch.randn(80), layers=[3]):
            pass
    with pytest.raises(TypeError):
        with iv.ablate(model, torch.randn(80), layers=["1"]):
            pass
    with pytest.raises(ValueError, match="mean"):
        with iv.ablate(model, torch.randn(80), mean=torch.randn(79)):
            pass
    with pytest.raises(ValueError, match="mean"):
        with iv.ablate(model, torch.randn(80), layers=[0, 1], mean=torch.randn(3, 80)):
            pass
    with pytest.raises(ValueError, match="zero vector"):
        with iv.steer(model, torch.zeros(80), [0]):
            pass
    with pytest.raises(ValueError, match="alpha"):
        with iv.steer(model, torch.randn(80), [0], alpha=float("inf")):
            pass
    with pytest.raises(ValueError, match="one vector"):
        with iv.add(model, torch.randn(2, 80), [0]):
            pass
    with pytest.raises(ValueError, match="fused"):
        with iv.ablate(gpt2[0], torch.randn(80), fused=True):
            pass
    with pytest.raises(ValueError, match="mean"):
        with iv.ablate(model, torch.randn(80), fused=True, mean=torch.randn(80)):
            pass
    _no_hooks(model)
    _no_hooks(gpt2[0])


# ------------------------------------------------------------------------------------------
# generate and torch.compile


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_under_ablate_matches_orthogonalized(arch, tokenizer):
    model = make_model(arch, tokenizer, seed=5)
    enc = _inputs(tokenizer)  # left padded, different lengths
    basis = _basis(80, 2, seed=4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        with iv.ablate(model, basis):
            ablated = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        iv.orthogonalize(model, basis)
        edited = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert ablated.shape[1] == enc["input_ids"].shape[1] + 5
    assert torch.equal(ablated, edited)
    assert not torch.equal(ablated, plain)


def test_torch_compile_matches_eager(tokenizer, monkeypatch):
    """Hooks + the refusal_fast custom ops trace into one graph (fullgraph=True). Dynamo only
    notices hooks added after the first compiled call when hook guards are on (see module doc)."""
    tok = tokenizer
    model = make_model("llama", tok, seed=9, n_layers=2)  # 2 layers: shorter tracing
    enc = _inputs(tok)
    b1, b2 = _basis(80, 3, seed=1), _basis(80, 3, seed=2)
    with torch.no_grad():
        plain_eager = _logits(model, enc)
        with iv.ablate(model, b1):
            eager1 = _logits(model, enc)
        with iv.ablate(model, b2):
            eager2 = _logits(model, enc)
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            plain = compiled(**enc).logits  # compiled without hooks first
            with iv.ablate(model, b1):
                got1 = compiled(**enc).logits  # hooks added -> guard fails -> recompiled with them
            with iv.ablate(model, b2):
                got2 = compiled(**enc).logits  # same ranks, new basis values: graph reused, basis is an input
            plain2 = compiled(**enc).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(plain, plain_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got1, eager1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2, eager2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain2, plain_eager, rtol=1e-5, atol=1e-5)
    assert (eager1 - eager2).abs().max() > 1e-3
    print(f"compile+run: {time.perf_counter() - t0:.1f}s")


# ------------------------------------------------------------------------------------------
# row interventions


def test_row_interventions_match_single_interventions(llama):
    model, tok = llama
    dirs = torch.randn(2, 80, dtype=torch.float64)
    enc = _inputs(tok, [PROMPTS[0]] * 5)
    with iv.row_interventions(model) as ri:
        ri.set(ablate_bases=dirs, ablate_index=torch.tensor([-1, 0, 1, -1, 1]),
               add_vectors=dirs, add_index=torch.tensor([-1, -1, -1, 1, 0]),
               add_layers=torch.tensor([-1, -1, -1, 2, 1]), alpha=1.5)
        rows = _logits(model, enc)
        ri.clear()
        cleared = _logits(model, enc)
    one = {k: v[:1] for k, v in enc.items()}
    base = _logits(model, one)
    with iv.ablate(model, dirs[0]):
        a0 = _logits(model, one)
    with iv.ablate(model, dirs[1]):
        a1 = _logits(model, one)
    with iv.add(model, dirs[1], [2], alpha=1.5):
        ad1 = _logits(model, one)
    with iv.ablate(model, dirs[1]), iv.add(model, dirs[0], [1], alpha=1.5):  # ablate first, then add
        both = _logits(model, one)
    for got, want in zip(rows, [base, a0, a1, ad1, both]):
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cleared, base.expand_as(cleared), rtol=1e-5, atol=1e-5)
    _no_hooks(model)


def test_row_interventions_rank_k_and_errors(llama):
    model, tok = llama
    bases = torch.randn(2, 3, 80, dtype=torch.float64)
    enc = _inputs(tok, PROMPTS[:2])
    with iv.row_interventions(model) as ri:
        ri.set(ablate_bases=bases, ablate_index=torch.tensor([1, -1]))
        with probe(model) as seen:
            _logits(model, enc)
        q = iv.orthonormalize(bases[1])
        for x in seen.values():
            assert _rel_component(x[:1], q) < TOL
            assert _rel_component(x[1:], q) > 1e-3
        with pytest.raises(ValueError, match="batch"):
            _logits(model, _inputs(tok, PROMPTS[:3]))
        with pytest.raises(ValueError, match=r"\[-1, 2\)"):
            ri.set(ablate_bases=bases, ablate_index=torch.tensor([2, 0]))
        with pytest.raises(TypeError):
            ri.set(ablate_bases=bases, ablate_index=torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match="together"):
            ri.set(ablate_bases=bases)
        with pytest.raises(ValueError, match="together"):
            ri.set(add_vectors=bases[0], add_index=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="d_model"):
            ri.set(ablate_bases=torch.randn(2, 1, 81), ablate_index=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="add_layers"):
            ri.set(add_vectors=bases[0], add_index=torch.tensor([0, 1]), add_layers=torch.tensor([0, 3]))
    _no_hooks(model)


def test_row_interventions_generate(llama):
    model, tok = llama
    d = torch.randn(80, dtype=torch.float64)
    enc = _inputs(tok, PROMPTS[:2])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        with iv.ablate(model, d):
            want = model.generate(**{k: enc[k] for k in ("input_ids", "attention_mask")}, **kw)
        with iv.row_interventions(model) as ri:
            ri.set(ablate_bases=d[None], ablate_index=torch.tensor([0, 0]))
            got = model.generate(**{k: enc[k] for k in ("input_ids", "attention_mask")}, **kw)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------
# fused in-layer ablation


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_matches_hooks(arch, tokenizer):
    model = make_model(arch, tokenizer, seed=2, n_layers=4)
    enc = _inputs(tokenizer)
    before = _logits(model, enc)
    basis = _basis(80, 2)
    for layers in (None, [1, 2], [0, 2, 3]):
        with iv.ablate(model, basis, layers=layers):
            hooks = _logits(model, enc)
        with iv.ablate(model, basis, layers=layers, fused=True) as q:
            with probe(model, layers) as seen:
                fused = _logits(model, enc)
        torch.testing.assert_close(fused, hooks, rtol=1e-5, atol=1e-5)
        for (kind, _i), x in seen.items():
            if kind == "resid":
                assert _rel_component(x, q) < TOL
        _no_hooks(model)
    assert torch.equal(_logits(model, enc), before)


def test_fused_generate_and_autograd(llama):
    model, tok = llama
    enc = _inputs(tok)
    basis = _basis(80, 2, seed=7)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    ids = {k: enc[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        with iv.ablate(model, basis):
            want = model.generate(**ids, **kw)
        with iv.ablate(model, basis, fused=True):
            got = model.generate(**ids, **kw)
    assert torch.equal(got, want)
    with iv.ablate(model, basis):
        ref = _logits(model, enc)
    with iv.ablate(model, basis, fused=True):
        out = model(**enc).logits  # grad enabled: out-of-place path
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    _no_hooks(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ablate_half_precision(tokenizer, dtype):
    """bf16/fp16 activations: fp32 math, one rounding of the result (component ~ dtype eps)."""
    model = make_model("llama", tokenizer, seed=8, dtype=dtype)
    enc = _inputs(tokenizer)
    before = _logits(model, enc)
    with iv.ablate(model, _basis(80, 5)) as q, probe(model) as seen:
        out = _logits(model, enc)
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max(_rel_component(x, q) for x in seen.values()) < 4 * eps
    with probe(model) as raw:
        _logits(model, enc)
    assert min(_rel_component(x, q) for x in raw.values()) > 20 * eps
    assert torch.equal(_logits(model, enc), before)
