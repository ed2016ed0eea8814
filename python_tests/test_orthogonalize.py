"""orthonormalize (basis validation) and orthogonalize (permanent weight edit + undo)."""
import copy

import pytest
import torch
import transformers
from tiny_models import make_model

from refusal_fast import interventions as iv
from refusal_fast import weight_edit
from refusal_fast.chat import encode_prompts
from refusal_fast.models import get_adapter

PROMPTS = ["How do I bake bread?", "Tell me a joke about cats", "Hi"]


@torch.no_grad()
def _logits(model, enc):
    return model(**enc).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# ------------------------------------------------------------------------------------------
# orthonormalize


def test_orthonormalize_single_direction():
    v = torch.randn(80, dtype=torch.float32) * 5
    q = iv.orthonormalize(v)
    assert q.shape == (1, 80) and q.dtype == torch.float64 and q.device.type == "cpu"
    torch.testing.assert_close(q[0], v.double() / v.double().norm(), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_orthonormalize_spans_input(k):
    b = torch.randn(k, 37, dtype=torch.float64)
    q = iv.orthonormalize(b)
    torch.testing.assert_close(q @ q.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(b @ q.T @ q, b, rtol=1e-10, atol=1e-10)  # same span
    assert ((q * b).sum(-1) > 0).all()  # sign convention: row j points along input row j


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_orthonormalize_any_dtype_and_numpy(dtype):
    b = torch.randn(3, 24).to(dtype)
    q = iv.orthonormalize(b)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q, iv.orthonormalize(b.double()), rtol=0, atol=0)
    qn = iv.orthonormalize(b.double().numpy())
    torch.testing.assert_close(qn, iv.orthonormalize(b.double()), rtol=0, atol=0)
    assert iv.orthonormalize([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])[1].tolist() == [0.0, 1.0, 0.0]


def test_orthonormalize_normalize_false():
    q = iv.orthonormalize(torch.randn(4, 30))
    assert torch.equal(iv.orthonormalize(q, normalize=False), q)
    assert torch.equal(iv.orthonormalize(q.float(), normalize=False), q.float().double())
    with pytest.raises(ValueError, match="not orthonormal"):
        iv.orthonormalize(q * 1.01, normalize=False)
    with pytest.raises(ValueError, match="not orthonormal"):
        iv.orthonormalize(torch.randn(2, 30), normalize=False)


@pytest.mark.parametrize("bad,err,match", [
    (torch.zeros(0, 8), ValueError, "empty"),
    (torch.zeros(2, 0), ValueError, "empty"),
    (torch.zeros(8), ValueError, "all zeros"),
    (torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]), ValueError, "rank-deficient"),
    (torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-9, 0.0]], dtype=torch.float64), ValueError, "rank-deficient"),
    (torch.tensor([1.0, float("nan"), 0.0]), ValueError, "NaN"),
    (torch.tensor([1.0, float("inf"), 0.0]), ValueError, "NaN or inf"),
    (torch.randn(5, 4), ValueError, "k=5"),
    (torch.randn(2, 3, 4), ValueError, "shape"),
    (torch.randn(4, dtype=torch.complex64), TypeError, "real"),
    (torch.ones(4, dtype=torch.bool), TypeError, "real"),
    ("abc", TypeError, "tensor"),
])
def test_orthonormalize_errors(bad, err, match):
    with pytest.raises(err, match=match):
        iv.orthonormalize(bad)


# ------------------------------------------------------------------------------------------
# orthogonalize


def _random_biases(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _llama_with_biases(tok):
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _random_biases(transformers.LlamaForCausalLM(cfg).eval())


def test_orthogonalize_edits_only_residual_writers(tokenizer):
    model = _llama_with_biases(tokenizer)
    ad = get_adapter(model)
    state = _state(model)
    q = iv.orthonormalize(torch.randn(2, 48))
    rec = iv.orthogonalize(model, q)
    expected = {"model.embed_tokens.weight"} | {
        f"model.layers.{i}.{m}.{p}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")
        for p in ("weight", "bias")
    }
    assert set(rec.edited) == expected and set(rec.originals) == expected and not rec.untied
    sd = model.state_dict()
    for k in state:
        if k not in expected:
            assert torch.equal(sd[k], state[k]), k
    qf = q.float()
    assert (ad.embed.weight @ qf.T).abs().max() < 1e-5
    for i in range(2):
        for mod in (ad.attn_out_proj(i), ad.mlp_out_proj(i)):
            assert (qf @ mod.weight).abs().max() < 1e-5  # Linear weight [d, in]: output side = rows of W^T
            assert (qf @ mod.bias).abs().max() < 1e-5
            assert (qf @ state[[n for n, p in model.named_parameters() if p is mod.weight][0]]).abs().max() > 1e-2
    rec.undo()
    _assert_state_equal(model, state)
    with pytest.raises(RuntimeError, match="already undone"):
        rec.undo()


def test_orthogonalize_equals_ablate_llama_biases(tokenizer):
    model = _llama_with_biases(tokenizer)
    enc = encode_prompts(tokenizer, PROMPTS)
    before = _logits(model, enc)
    basis = torch.randn(3, 48, dtype=torch.float64)
    with iv.ablate(model, basis):
        ablated = _logits(model, enc)
    rec = iv.orthogonalize(model, basis)
    torch.testing.assert_close(_logits(model, enc), ablated, rtol=1e-4, atol=1e-4)
    rec.undo()
    assert torch.equal(_logits(model, enc), before)


def test_orthogonalize_gpt2_conv1d_tied(tokenizer):
    """GPT-2: Conv1D weights [in, d], wpe edited; untie=True == ablate; untie=False keeps the tie and
    also projects the readout; undo restores both bitwise (and the tie)."""
    model = _random_biases(make_model("gpt2", tokenizer, seed=1))
    ad = get_adapter(model)
    assert ad.tied
    enc = encode_prompts(tokenizer, PROMPTS)
    state, before = _state(model), _logits(model, enc)
    basis = torch.randn(2, 80, dtype=torch.float64)
    q = iv.orthonormalize(basis).float()
    with iv.ablate(model, basis):
        ablated = _logits(model, enc)
        normed = {}
        h = ad.final_norm.register_forward_hook(lambda m, a, o: normed.__setitem__("x", o.detach().clone()))
        _logits(model, enc)
        h.remove()

    rec = iv.orthogonalize(model, basis)  # untie=True (default)
    assert rec.untied and "transformer.wpe.weight" in rec.edited
    assert ad.lm_head.weight is not ad.embed.weight and model.config.tie_word_embeddings is False
    assert torch.equal(ad.lm_head.weight, state["transformer.wte.weight"])  # readout unchanged
    assert (ad.pos_embed.weight @ q.T).abs().max() < 1e-5
    assert (ad.attn_out_proj(0).weight @ q.T).abs().max() < 1e-5  # Conv1D [in, d]
    untied = _logits(model, enc)
    torch.testing.assert_close(untied, ablated, rtol=1e-4, atol=1e-4)
    rec.undo()
    assert ad.lm_head.weight is ad.embed.weight and model.config.tie_word_embeddings is True
    _assert_state_equal(model, state)
    assert torch.equal(_logits(model, enc), before)

    rec = iv.orthogonalize(model, basis, untie=False)
    assert not rec.untied and ad.lm_head.weight is ad.embed.weight
    tied = _logits(model, enc)
    # same residual stream as under ablate, but read out through the edited embedding
    expect = normed["x"] @ ad.embed.weight.T
    torch.testing.assert_close(tied, expect, rtol=1e-4, atol=1e-4)
    assert (tied - untied).abs().max() > 1e-3
    rec.undo()
    _assert_state_equal(model, state)


def test_orthogonalize_gemma2_requires_allow_inexact(gemma2):
    model, tok = gemma2
    state = _state(model)
    with pytest.raises(ValueError, match="allow_inexact"):
        iv.orthogonalize(model, torch.randn(80))
    _assert_state_equal(model, state)
    rec = iv.orthogonalize(model, torch.randn(80), allow_inexact=True)
    assert rec.untied and len(rec.edited) == 1 + 2 * get_adapter(model).n_layers
    rec.undo()
    _assert_state_equal(model, state)
    assert get_adapter(model).tied


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_failure_midway_restores_everything(arch, tokenizer, monkeypatch):
    model = make_model(arch, tokenizer, seed=4)
    state, tied = _state(model), get_adapter(model).tied
    real, calls = weight_edit._edit, []

    def flaky(param, q, side):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real(param, q, side)

    monkeypatch.setattr(weight_edit, "_edit", flaky)
    with pytest.raises(KeyboardInterrupt):
        iv.orthogonalize(model, torch.randn(80))
    assert len(calls) == 4
    _assert_state_equal(model, state)
    ad = get_adapter(model)
    assert ad.tied == tied and (ad.lm_head.weight is ad.embed.weight) == tied


def test_orthogonalize_bad_input_and_keep_originals(llama):
    model, _ = llama
    state = _state(model)
    with pytest.raises(ValueError, match="d_model"):
        iv.orthogonalize(model, torch.randn(81))
    with pytest.raises(ValueError, match="rank-deficient"):
        iv.orthogonalize(model, torch.ones(2, 80))
    with pytest.raises(ValueError, match="not orthonormal"):
        iv.orthogonalize(model, torch.randn(80) * 2, normalize=False)
    _assert_state_equal(model, state)
    m2 = copy.deepcopy(model)
    rec = iv.orthogonalize(m2, torch.randn(80), keep_originals=False)
    assert not rec.originals
    with pytest.raises(RuntimeError, match="keep_originals"):
        rec.undo()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_roundtrip(arch, tokenizer, tmp_path):
    model = make_model(arch, tokenizer, seed=6)
    enc = encode_prompts(tokenizer, PROMPTS)
    iv.orthogonalize(model, torch.randn(2, 80, dtype=torch.float64))
    edited = _logits(model, enc)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert get_adapter(loaded).tied is False
    _assert_state_equal(loaded, _state(model))
    assert torch.equal(_logits(loaded, enc), edited)
