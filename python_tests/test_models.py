import pytest
import torch
from tiny_models import ARCHS, make_model
from torch import nn

from refusal_fast.models import SUPPORTED_ARCHS, UnsupportedModelError, block_input, get_adapter, module_output_tensor


def test_all_seven_archs_supported():
    assert set(ARCHS) <= set(SUPPORTED_ARCHS)


def test_adapter_finds_everything(any_arch):
    model, tok = any_arch
    ad = get_adapter(model)
    assert ad.arch == model.config.model_type
    assert ad.n_layers == 3 and ad.d_model == 80
    assert ad.embed.weight.shape == (len(tok), 80)
    assert ad.lm_head.weight.shape[0] == len(tok)
    assert ad.tied == (ad.arch in ("gemma2", "gpt2"))
    assert ad.tied == (ad.lm_head.weight.data_ptr() == ad.embed.weight.data_ptr())
    assert (ad.pos_embed is not None) == (ad.arch == "gpt2")
    assert ad.has_post_sublayer_norms == (ad.arch == "gemma2")
    if ad.arch == "gemma2":
        assert ad.embed_scale == pytest.approx(80 ** 0.5)
    for i in range(ad.n_layers):
        w_attn = ad.attn_out_proj(i).weight
        w_mlp = ad.mlp_out_proj(i).weight
        assert 80 in w_attn.shape and 80 in w_mlp.shape


def test_hook_points_match_hidden_states(any_arch):
    """resid_pre[i] == hidden_states[i]; resid_pre[i+1] == resid_pre[i] + attn_out[i] + mlp_out[i]."""
    model, tok = any_arch
    ad = get_adapter(model)
    captured = {}
    handles = []
    for i in range(ad.n_layers):
        hp = ad.hook_points(i)
        handles.append(hp["resid_pre"].register_forward_pre_hook(
            lambda m, a, k, i=i: captured.__setitem__(("pre", i), block_input(a, k).clone()), with_kwargs=True))
        for name in ("attn_out", "mlp_out"):
            handles.append(hp[name].register_forward_hook(
                lambda m, a, o, i=i, name=name: captured.__setitem__((name, i), module_output_tensor(o).clone())))
    ids = tok(["<|im_start|>user\nhello there friend"], return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for i in range(ad.n_layers):
        torch.testing.assert_close(captured[("pre", i)], out.hidden_states[i])
        nxt = captured[("pre", i + 1)] if i + 1 < ad.n_layers else None
        if nxt is not None:
            torch.testing.assert_close(captured[("pre", i)] + captured[("attn_out", i)] + captured[("mlp_out", i)],
                                       nxt, rtol=1e-5, atol=1e-5)


def test_unsupported_arch_clear_error():
    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mamba"})()
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'mamba'"):
        get_adapter(Fake())
    with pytest.raises(UnsupportedModelError, match="no transformers config"):
        get_adapter(nn.Linear(2, 2))


def test_missing_module_named(tokenizer):
    model = make_model("llama", tokenizer)
    del model.model.norm
    with pytest.raises(UnsupportedModelError, match="final norm at 'norm'"):
        get_adapter(model)


def test_check_layers(llama):
    ad = get_adapter(llama[0])
    assert ad.check_layers(None) == [0, 1, 2]
    assert ad.check_layers([-1, 0, 0]) == [0, 2]
    with pytest.raises(ValueError, match="out of range"):
        ad.check_layers([3])
    with pytest.raises(TypeError):
        ad.check_layers(["a"])
    with pytest.raises(ValueError, match="empty"):
        ad.check_layers([])


def test_config_hash_distinguishes_models(tokenizer):
    a = get_adapter(make_model("llama", tokenizer))
    b = get_adapter(make_model("llama", tokenizer, n_layers=2))
    assert a.config_hash == get_adapter(make_model("llama", tokenizer, seed=1)).config_hash
    assert a.config_hash != b.config_hash
