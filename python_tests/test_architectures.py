"""Every tested architecture (tiny_models.ARCH_SPECS, the list docs/architectures.md is generated from):
the automatic adapter, extraction against the float64 ``output_hidden_states`` reference, ``ablate``
(zero component at every hook point), ``ablate == orthogonalize`` (or the clear refusal), export with
``save_pretrained``, and bitwise restoration. Plus an architecture the table does not name, and
structures the adapter cannot handle."""
import copy
import importlib.util
import types
from pathlib import Path

import pytest
import torch
import transformers
from test_extract import assert_rel_close, naive_reference
from tiny_models import ARCH_SPECS, SPECS, TEMPLATE_SOURCES, library_hooks, make_model, make_tokenizer

from refusal_fast import chat
from refusal_fast import interventions as iv
from refusal_fast.extract import extract_means
from refusal_fast.models import (
    SUPPORTED_ARCHS,
    ModelAdapter,
    UnsupportedModelError,
    block_input,
    get_adapter,
    module_output_tensor,
)

PROMPTS = ["How do I bake bread?", "Tell me a joke about cats", "Write a poem about the sea and the sky at night."]
TOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=[s.arch for s in ARCH_SPECS])
def arch(request):
    """(spec, model, tokenizer) for each tested architecture, with its family's chat template."""
    spec = SPECS[request.param]
    tok = make_tokenizer(spec.template)
    return spec, make_model(spec.arch, tok), tok


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


@torch.no_grad()
def _logits(model, enc):
    return model(**enc).logits


def _capture(model, seen, handles):
    """Register (after any intervention) hooks recording every hook point: block inputs, every writer's
    output and the final norm's input."""
    ad = get_adapter(model)

    def pre(key):
        return lambda m, a, k: seen.__setitem__(key, block_input(a, k).detach().clone())

    def out(key):
        return lambda m, a, o: seen.__setitem__(key, module_output_tensor(o).detach().clone())

    for i in range(ad.n_layers):
        handles.append(ad.blocks[i].register_forward_pre_hook(pre(("resid", i)), with_kwargs=True))
        for w, mod in zip(ad.writers(i), ad.writer_modules(i)):
            handles.append(mod.register_forward_hook(out((w.path, i))))
    handles.append(ad.final_norm.register_forward_pre_hook(pre(("final", ad.n_layers)), with_kwargs=True))


def _rel_component(x, q):
    x = x.double().reshape(-1, x.shape[-1])
    q = q.double()
    den = x.norm(dim=-1)
    keep = den > 0
    return ((x @ q.T).norm(dim=-1)[keep] / den[keep]).max().item()


def _basis(d, k=2, seed=0):
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_supported_archs_are_the_tested_ones():
    assert SUPPORTED_ARCHS == tuple(s.arch for s in ARCH_SPECS)
    assert all(s.template in TEMPLATE_SOURCES for s in ARCH_SPECS)
    for s in ARCH_SPECS:
        assert type(make_model(s.arch, n_layers=1).config).__name__ == s.config_class


def test_architecture_table_is_generated_from_the_specs():
    """docs/architectures.md's table is exactly what scripts/architectures_table.py renders from ARCH_SPECS."""
    spec = importlib.util.spec_from_file_location("architectures_table", ROOT / "scripts" / "architectures_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.DOC.read_text(encoding="utf-8")
    assert script.updated(text) == text, "run: python scripts/architectures_table.py"
    table = script.render()
    assert all(f"| `{s.arch}` |" in table for s in ARCH_SPECS)
    assert script.main(["--check"]) == 0


def test_adapter_matches_spec(arch):
    spec, model, tok = arch
    ad = get_adapter(model)
    assert ad.arch == spec.arch == model.config.model_type
    assert (ad.n_layers, ad.d_model) == (3, 80)
    assert not ad.hook_issues and not ad.weight_issues, ad.describe()
    assert ad.tied == spec.tied == (ad.lm_head.weight is ad.embed.weight)
    assert ad.has_post_sublayer_norms == spec.post_norms
    for i in range(ad.n_layers):
        kinds = [w.kind for w in ad.writers(i)]
        assert kinds == ["attn", "mlp"], (i, ad.writers(i))
        assert ad.hook_points(i)["attn_out"] is ad.attn_out(i)
    weights = ad.residual_weights(allow_inexact=True)
    fused = [w for w in weights if w.param.dim() == 3]
    assert bool(fused) == bool(spec.moe)
    assert any("shared" in w.name for w in weights) == ("shared" in spec.moe)
    if spec.moe:  # one fused tensor per MoE layer, holding every expert
        assert all(w.param.shape[0] == 4 for w in fused)
    assert any(w.param.dim() == 1 and w.layer is not None for w in weights) == spec.biases
    scaled = ad.embed_scale != 1.0 or any(w.scale != 1.0 for i in range(ad.n_layers) for w in ad.writers(i))
    assert scaled == spec.scaled
    names = {n for n, _ in model.named_parameters()}
    assert all(w.name in names for w in weights)


@torch.no_grad()
def test_parallel_flag_is_true(arch):
    """Parallel attention + MLP: perturbing the attention output leaves the MLP output unchanged."""
    spec, model, tok = arch
    ad = get_adapter(model)
    enc = chat.encode_prompts(tok, PROMPTS[:1])
    seen, handles = {}, []
    mlp = ad.mlp_out(1)
    def shifted(m, a, o):
        return (o[0] + 1.0, *o[1:]) if isinstance(o, tuple) else o + 1.0

    for key, perturb in (("a", False), ("b", True)):
        try:
            if perturb:
                handles.append(ad.attn_out(1).register_forward_hook(shifted))
            handles.append(mlp.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(
                key, module_output_tensor(o).clone())))
            model(**enc)
        finally:
            for h in handles:
                h.remove()
            handles.clear()
    assert torch.equal(seen["a"], seen["b"]) == spec.parallel


def test_extraction_matches_float64_reference(arch, harmful, harmless):
    spec, model, tok = arch
    groups = {"harmful": harmful[:4], "harmless": harmless[:3]}
    means = extract_means(model, tok, groups, batch_size=3, progress=False)
    ref, _ = naive_reference(model, tok, groups, means.positions, means.layers)
    assert means.positions == chat.eoi_positions(tok)
    for g in groups:
        assert_rel_close(means.mean(g), ref[g], rtol=2e-5)


def test_ablate_zero_component_at_every_hook_point(arch):
    spec, model, tok = arch
    ad = get_adapter(model)
    enc = chat.encode_prompts(tok, PROMPTS)
    state, before = _state(model), _logits(model, enc)
    seen, raw, handles = {}, {}, []
    with iv.ablate(model, _basis(80)) as q:
        try:
            _capture(model, seen, handles)
            ablated = _logits(model, enc)
        finally:
            for h in handles:
                h.remove()
    handles = []
    try:
        _capture(model, raw, handles)
        _logits(model, enc)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3 * ad.n_layers + 1 == len(raw)
    for key, x in seen.items():
        assert _rel_component(x, q) < TOL, key
    assert min(_rel_component(x, q) for x in raw.values()) > 1e-3
    assert not torch.allclose(ablated, before)
    assert not library_hooks(model)
    _assert_state_equal(model, state)
    assert torch.equal(_logits(model, enc), before)


def test_ablate_equals_orthogonalize_or_refusal(arch):
    spec, model, tok = arch
    enc = chat.encode_prompts(tok, PROMPTS)
    state, before = _state(model), _logits(model, enc)
    basis = _basis(80, 3, seed=1)
    if spec.orthogonalize == "refused":
        with pytest.raises(ValueError, match="allow_inexact"):
            iv.orthogonalize(model, basis)
        _assert_state_equal(model, state)
        rec = iv.orthogonalize(model, basis, allow_inexact=True)  # edits the projections before the norms
        rec.undo()
        _assert_state_equal(model, state)
        return
    assert spec.orthogonalize == "exact"
    with iv.ablate(model, basis) as q:
        ablated = _logits(model, enc)
    rec = iv.orthogonalize(model, basis)
    ad = get_adapter(model)
    for w in ad.residual_weights():  # every residual-writing weight, every expert included
        p = w.param.detach().movedim(w.dim, -1).double()
        assert (p @ q.T).abs().max() < 1e-5 * max(1.0, p.abs().max().item()), w.name
    torch.testing.assert_close(_logits(model, enc), ablated, rtol=1e-4, atol=1e-4)
    assert set(rec.edited) == {w.name for w in ad.residual_weights()}
    rec.undo()
    _assert_state_equal(model, state)
    assert torch.equal(_logits(model, enc), before)


def test_export_roundtrip(arch, tmp_path):
    """The orthogonalized model saved with save_pretrained reloads to the same logits (exact archs)."""
    spec, model, tok = arch
    if spec.orthogonalize != "exact":
        pytest.skip(f"{spec.arch}: orthogonalize refused (post-sub-layer norms), nothing to export")
    edited = copy.deepcopy(model)
    iv.orthogonalize(edited, _basis(80, 2, seed=2))
    enc = chat.encode_prompts(tok, PROMPTS[:2])
    want = _logits(edited, enc)
    edited.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    _assert_state_equal(loaded, _state(edited))  # bit for bit
    # (logits to rounding only: the grouped_mm experts kernel's sums depend on where tensors lie in memory)
    torch.testing.assert_close(_logits(loaded, enc), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2_moe", "gpt_oss"])
def test_bfloat16_models(arch_name):
    """In bf16 the probe's identities hold to bf16 rounding: same structure found, every block's weights
    traced, ablate leaves ~eps, orthogonalize passes its own post-edit check and tracks ablate."""
    spec = SPECS[arch_name]
    tok = make_tokenizer(spec.template)
    model = make_model(arch_name, tok, dtype=torch.bfloat16)
    ad = get_adapter(model)
    assert not ad.hook_issues and not ad.weight_issues, ad.describe()
    assert all(w.scale == 1.0 for i in range(ad.n_layers) for w in ad.writers(i))
    ref = get_adapter(make_model(arch_name, tok))
    assert [w.name for w in ad.residual_weights()] == [w.name for w in ref.residual_weights()]
    enc = chat.encode_prompts(tok, PROMPTS)
    basis = _basis(80, 2, seed=5)
    seen, handles = {}, []
    with iv.ablate(model, basis) as q:
        try:
            _capture(model, seen, handles)
            ablated = _logits(model, enc)
        finally:
            for h in handles:
                h.remove()
    assert max(_rel_component(x, q) for x in seen.values()) < 4 * torch.finfo(torch.bfloat16).eps
    rec = iv.orthogonalize(model, basis)
    diff = (_logits(model, enc).float() - ablated.float()).abs()
    # bf16 rounding of the edited weights vs of the hooked activations; in MoE models it flips the top-k
    # routing of a few near-tie tokens (gpt-oss: 5 of 297 here), so compare means, not maxima
    assert diff.mean() / ablated.float().abs().mean() < 0.05
    rec.undo()


# ------------------------------------------------------------------------------------------
# beyond the table


def test_untested_architecture_is_handled_automatically():
    """GraniteMoE (experts + embedding/residual multipliers) is in no table or override: the adapter
    finds its structure, and ablate == orthogonalize."""
    assert "granitemoe" not in SUPPORTED_ARCHS and "granitemoe" not in SPECS
    tok = make_tokenizer("granite")
    model = make_model("granitemoe", tok)
    ad = get_adapter(model)
    assert not ad.weight_issues and not ad.hook_issues
    assert ad.embed_scale == pytest.approx(6.0) and ad.writers(0)[0].scale == pytest.approx(0.5)
    assert any(w.param.dim() == 3 for w in ad.residual_weights())
    enc = chat.encode_prompts(tok, PROMPTS)
    basis = _basis(80, 2, seed=3)
    with iv.ablate(model, basis):
        ablated = _logits(model, enc)
    rec = iv.orthogonalize(model, basis)
    torch.testing.assert_close(_logits(model, enc), ablated, rtol=1e-4, atol=1e-4)
    rec.undo()


def _layer_scale(model):
    """Give every llama block a per-channel LayerScale on its attention output: the block then adds
    ``gamma * attn(x)``, which is no sum of sub-module outputs (and no weight edit can stay exact)."""
    gamma = torch.linspace(0.5, 1.5, model.config.hidden_size)
    for layer in model.model.layers:
        def forward(self, hidden_states, *args, **kwargs):
            h = hidden_states + gamma * self.self_attn(self.input_layernorm(hidden_states), *args, **kwargs)[0]
            return h + self.mlp(self.post_attention_layernorm(h))

        layer.forward = types.MethodType(forward, layer)
    return model


def test_structure_it_cannot_handle_gives_clear_error(tokenizer):
    model = _layer_scale(make_model("llama", tokenizer))
    ad = get_adapter(model)
    assert ad.hook_issues and "block 0" in ad.hook_issues[0] and "writers=" in ad.hook_issues[0]
    state = _state(model)
    with pytest.raises(UnsupportedModelError, match=r"block 0.*not a sum of its sub-modules"):
        iv.orthogonalize(model, torch.randn(80))
    _assert_state_equal(model, state)
    enc = chat.encode_prompts(tokenizer, PROMPTS)
    with pytest.warns(UserWarning, match="not a sum"):  # hooks still work at the block inputs
        with iv.ablate(model, _basis(80)) as q:
            seen, handles = {}, []
            try:
                _capture(model, seen, handles)
                _logits(model, enc)
            finally:
                for h in handles:
                    h.remove()
    assert max(_rel_component(seen[("resid", i)], q) for i in range(1, 3)) < TOL


def test_fused_experts_without_layout_refused_then_explicit_weights(tokenizer):
    """Experts as 3-D parameters without transformers' layout attributes: orientation unknown, so
    orthogonalize refuses naming the module; writer_weights= tells it, and the edit equals ablate."""
    tok = make_tokenizer("mistral")
    model = make_model("mixtral", tok)
    model.set_experts_implementation("eager")  # the plain loop over experts: no layout attributes needed
    for layer in model.model.layers:
        del layer.mlp.experts.is_transposed
    with pytest.raises(UnsupportedModelError, match=r"mlp\.experts.*layout attributes.*writer_weights="):
        iv.orthogonalize(model, torch.randn(80))
    ModelAdapter(model, writer_weights={"self_attn.o_proj.weight": 0, "mlp.experts.down_proj": 1})
    assert get_adapter(model).weight_issues == []  # the explicit adapter is the one used from now on
    enc = chat.encode_prompts(tok, PROMPTS)
    basis = _basis(80, 2, seed=4)
    with iv.ablate(model, basis):
        ablated = _logits(model, enc)
    rec = iv.orthogonalize(model, basis)
    torch.testing.assert_close(_logits(model, enc), ablated, rtol=1e-4, atol=1e-4)
    rec.undo()
    state = _state(model)
    ModelAdapter(model, writer_weights={"self_attn.o_proj.weight": 0})  # wrong: the experts are missing
    with pytest.raises(UnsupportedModelError, match=r"layer \d mlp still writes the direction"):
        iv.orthogonalize(model, basis)  # caught by the check after the edit, and rolled back
    _assert_state_equal(model, state)
