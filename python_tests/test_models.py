import pytest
import torch
from tiny_models import ARCHS, make_model
from torch import nn

from refusal_fast import models
from refusal_fast.models import (
    SUPPORTED_ARCHS,
    ModelAdapter,
    UnsupportedModelError,
    block_input,
    get_adapter,
    module_device,
    module_output_tensor,
)


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


def test_unsupported_structure_clear_error():
    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "mamba"})()
    with pytest.raises(UnsupportedModelError, match=r"mamba: could not tell .* decoder blocks.*blocks="):
        get_adapter(Fake())
    with pytest.raises(UnsupportedModelError, match="no transformers config"):
        get_adapter(nn.Linear(2, 2))


def test_missing_module_named(tokenizer):
    model = make_model("llama", tokenizer)
    with pytest.raises(UnsupportedModelError, match=r"final norm at 'model.nrm'.*final_norm="):
        ModelAdapter(model, final_norm="model.nrm")
    del model.model.norm
    with pytest.raises(UnsupportedModelError, match="probe .* failed.*norm"):
        get_adapter(model)


def test_ambiguous_blocks_need_override(tokenizer):
    model = make_model("llama", tokenizer)
    model.model.extra = nn.ModuleList([nn.Linear(80, 80) for _ in range(3)])  # also 3 modules with weights
    with pytest.raises(UnsupportedModelError, match=r"'model.layers' \(3\), 'model.extra' \(3\).*blocks="):
        get_adapter(model)
    ad = ModelAdapter(model, blocks="model.layers")
    assert ad.blocks is model.model.layers and not ad.weight_issues
    assert get_adapter(model)._layout is ad._layout  # the explicit adapter is used from now on


def test_explicit_writers_and_cache(tokenizer, monkeypatch):
    model = make_model("llama", tokenizer)
    ad = ModelAdapter(model, blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
                      lm_head="lm_head", pos_embed="", writers={"attn": "self_attn", "mlp": "mlp"})
    assert [w.path for w in ad.writers(1)] == ["self_attn", "mlp"] and not ad.weight_issues
    # cached per model object: no second probe
    monkeypatch.setattr(models._Probe, "run", lambda self: (_ for _ in ()).throw(AssertionError("probed")))
    assert get_adapter(model).writers(0) == ad.writers(0)
    monkeypatch.undo()
    # writers that do not account for the residual update: hooks only on those, weight edit refused
    bad = ModelAdapter(make_model("llama", tokenizer), writers={"attn": "self_attn"})
    assert bad.hook_issues and "not a sum" in bad.hook_issues[0]
    with pytest.raises(UnsupportedModelError, match="cannot list every weight"):
        bad.residual_weights()


def test_residual_weights_orientation(any_arch):
    model, _ = any_arch
    ad = get_adapter(model)
    ws = ad.residual_weights(allow_inexact=True)
    assert ws[0].module == "embed" and ws[0].dim == -1 and ws[0].param is ad.embed.weight
    for w in ws:
        assert w.param.shape[w.dim] == ad.d_model
        if w.layer is not None and w.param.dim() == 2:
            conv = type(ad.blocks[w.layer].get_submodule(w.name.split(f".{w.layer}.", 1)[1].rsplit(".", 1)[0]))
            assert w.dim == (-1 if conv.__name__ == "Conv1D" else 0), w.name
    assert len([w for w in ws if w.layer == 0 and w.name.endswith("weight")]) == 2


def test_probe_keeps_training_mode_and_leaves_no_hooks(tokenizer):
    model = make_model("gpt2", tokenizer).train()
    get_adapter(model)
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    text = get_adapter(model).describe()
    assert "transformer.h" in text and "attn.c_proj.weight[-1]" in text


def test_module_device_execution_device():
    lin = nn.Linear(3, 3)
    assert module_device(lin) == torch.device("cpu")

    class Hook:
        execution_device = "cpu"

    meta = nn.Linear(3, 3, device="meta")
    assert module_device(meta, torch.device("cpu")) == torch.device("cpu")
    meta._hf_hook = Hook()
    assert module_device(meta) == torch.device("cpu")


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
