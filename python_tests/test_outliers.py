"""Massive-activation detection and the matched random-direction control."""
import pytest
import torch
from tiny_models import library_hooks, make_model

from refusal_fast import chat
from refusal_fast.analysis import massive_activation_dims, random_like


def _block_input_max_reference(model, tok, prompts):
    """float64 [n_layers, d] max |hidden_states[l]| over real tokens, one unpadded prompt at a time."""
    out = None
    with torch.no_grad():
        for p in prompts:
            ids = tok(chat.format_prompt(tok, p), add_special_tokens=False, return_tensors="pt")
            hs = model(**ids, output_hidden_states=True).hidden_states[: model.config.num_hidden_layers]
            m = torch.stack([h[0].abs().double().amax(0) for h in hs])
            out = m if out is None else torch.maximum(out, m)
    return out


def test_finds_planted_massive_coordinate(tokenizer, harmless):
    model = make_model("llama", tokenizer, seed=3, d_model=72)
    planted = 41
    with torch.no_grad():  # every token embedding carries a huge value on one coordinate
        model.model.embed_tokens.weight[:, planted] = 3000.0
    prompts = harmless[:5]
    res = massive_activation_dims(model, tokenizer, prompts, ratio=100.0, batch_size=2)
    ref = _block_input_max_reference(model, tokenizer, prompts)
    assert res.dims[0] == planted
    # the reported maxima and layers are the float64 reference's, for every dim it returns
    best, layer = ref.max(0)
    for c, m, l in zip(res.dims, res.max_abs, res.layer):
        assert m == pytest.approx(float(best[c]), rel=1e-5)
        assert l == int(layer[c])
    # exactly the coordinates above the threshold (the median is a subsample's, so compare loosely)
    thr = res.ratio * res.median_abs
    assert set(res.dims) == {c for c in range(72) if best[c] > thr}
    assert res.n_prompts == 5 and res.to_dict()["dims"] == res.dims
    assert not library_hooks(model)


def test_plain_model_has_none_and_bad_input(llama, harmless):
    model, tok = llama
    res = massive_activation_dims(model, tok, harmless[:3], ratio=1e6)
    assert res.dims == [] and res.median_abs > 0
    for bad in (dict(ratio=1.0), dict(ratio=float("nan")), dict(batch_size=0)):
        with pytest.raises(ValueError):
            massive_activation_dims(model, tok, harmless[:2], **bad)
    with pytest.raises(ValueError, match="non-empty"):
        massive_activation_dims(model, tok, [])
    assert not library_hooks(model)


def test_hooks_removed_when_forward_fails(llama, harmless, monkeypatch):
    model, tok = llama

    def boom(*a, **k):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(model.model, "forward", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        massive_activation_dims(model, tok, harmless[:2])
    monkeypatch.undo()
    assert not library_hooks(model)


@pytest.mark.parametrize("shape", [(37,), (3, 37)])
def test_random_like_match_dims(shape):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    dims = [0, 5, 36]
    u = random_like(v, 4, match_dims=dims)
    assert u.shape == v.shape and u.dtype == torch.float64
    torch.testing.assert_close(u.norm(dim=-1), v.norm(dim=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u[..., dims], v[..., dims], rtol=0, atol=0)
    assert torch.equal(u, random_like(v, 4, match_dims=dims))
    assert not torch.equal(u, random_like(v, 5, match_dims=dims))
    # the free part is random: nearly orthogonal to v's free part, unlike v itself
    free = [i for i in range(37) if i not in dims]
    cos = torch.nn.functional.cosine_similarity(u[..., free], v[..., free], dim=-1)
    assert (cos.abs() < 0.6).all()
    # isotropic draws are unchanged by the new argument
    assert torch.equal(random_like(v, 4), random_like(v, 4, match_dims=None))


def test_random_like_match_dims_errors():
    v = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="coordinates in"):
        random_like(v, 0, match_dims=[4])
    with pytest.raises(ValueError, match="every coordinate"):
        random_like(v, 0, match_dims=[0, 1, 2, 3])


def test_maxima_match_reference_every_arch(any_arch, harmless):
    """Per-coordinate maxima over a left-padded batch equal the unpadded float64 reference (GPT-2's absolute
    positions included), for every supported architecture."""
    model, tok = any_arch
    prompts = [harmless[0], harmless[1] + " Please answer in detail, with three examples.", harmless[2]]
    res = massive_activation_dims(model, tok, prompts, ratio=1.0 + 1e-9, batch_size=3)
    ref = _block_input_max_reference(model, tok, prompts)
    best, layer = ref.max(0)
    assert len(res.dims) > 0
    for c, m, _l in zip(res.dims, res.max_abs, res.layer):
        assert m == pytest.approx(float(best[c]), rel=1e-4, abs=1e-5)
    assert res.max_abs == sorted(res.max_abs, reverse=True)
    assert not library_hooks(model)
