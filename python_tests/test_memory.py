"""Models that do not fit: accelerate device maps with offloaded blocks, bitsandbytes 8-/4-bit loading.

Only CPU devices exist here, so the device map puts blocks on "cpu" and on "disk" (weights on the
meta device, loaded by accelerate's hooks for each forward). That exercises the code path of a
multi-GPU ``device_map="auto"`` model: every hook casts its basis to the block's *execution*
device (``models.module_device``), never to the device of a parameter tensor.
"""
import pytest
import torch
import transformers
from test_extract import assert_rel_close
from tiny_models import library_hooks, make_model, make_tokenizer

from refusal_fast import chat
from refusal_fast import interventions as iv
from refusal_fast.extract import extract_means
from refusal_fast.models import UnsupportedModelError, block_input, get_adapter, module_device, module_output_tensor

PROMPTS = ["How do I bake bread?", "Tell me a joke about cats", "Write a poem about the sea."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = make_tokenizer("llama3")
    model = make_model("llama", tok)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return model, tok, path


def _components(model, basis, enc):
    """Relative component along ``basis`` at every block input and writer output (under the active hooks)."""
    ad = get_adapter(model)
    q = iv.orthonormalize(basis)
    out, handles = [], []

    def rec(x):
        x = x.detach().double().reshape(-1, x.shape[-1]).cpu()
        out.append(((x @ q.T).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)).max().item())

    try:
        for i in range(ad.n_layers):
            handles.append(ad.blocks[i].register_forward_pre_hook(lambda m, a, k: rec(block_input(a, k)),
                                                                  with_kwargs=True))
            for mod in ad.writer_modules(i):
                handles.append(mod.register_forward_hook(lambda m, a, o: rec(module_output_tensor(o))))
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return out


def test_device_map_with_offloaded_blocks(saved, tmp_path, harmful, harmless):
    model, tok, path = saved
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    off = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", device_map=device_map, offload_folder=tmp_path).eval()
    ad = get_adapter(off)
    assert off.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # really offloaded
    assert module_device(off.model.layers[1]) == torch.device("cpu") == ad.device
    assert not ad.weight_issues and not ad.hook_issues
    groups = {"harmful": harmful[:4], "harmless": harmless[:4]}
    want = extract_means(model, tok, groups, batch_size=3, progress=False)
    got = extract_means(off, tok, groups, batch_size=3, progress=False)
    for g in groups:
        assert_rel_close(got.mean(g), want.mean(g), rtol=1e-6)
    enc = chat.encode_prompts(tok, PROMPTS)
    basis = torch.randn(2, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with iv.ablate(model, basis):
        ref = model(**enc).logits.detach()
    with iv.ablate(off, basis):
        torch.testing.assert_close(off(**enc).logits.detach(), ref, rtol=1e-6, atol=1e-6)
        assert max(_components(off, basis, enc)) < 1e-5
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\..* is offloaded .*without cpu/disk offload"):
        iv.orthogonalize(off, basis)
    assert not library_hooks(off)


def _quantized(path, **quant):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (requirements.txt installs it)")
    cfg = transformers.BitsAndBytesConfig(**quant)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=cfg, device_map="cpu", dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def saved_4bit(tmp_path_factory):
    """bitsandbytes' CPU 4-bit kernel needs quantized output widths that are multiples of 32 and input
    widths that are multiples of its 64-element blocks: d_model 192 (still not a power of two)."""
    tok = make_tokenizer("llama3")
    cfg = transformers.LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, hidden_size=192, intermediate_size=320,
                                   num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=False,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama_192")
    model.save_pretrained(path)
    return model, tok, path


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_extract_and_hooks_orthogonalize_refused(bits, saved, saved_4bit, harmful):
    model, tok, path = saved if bits == 8 else saved_4bit
    quant = {"load_in_8bit": True} if bits == 8 else {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32}
    qm = _quantized(path, **quant)
    ad = get_adapter(qm)
    o_proj = qm.model.layers[0].self_attn.o_proj
    assert "bitsandbytes" in type(o_proj).__module__
    assert not ad.hook_issues
    # extraction: the hooks read exactly the quantized model's own hidden states
    groups = {"harmful": harmful[:3]}
    means = extract_means(qm, tok, groups, batch_size=2, progress=False)
    ref = 0
    with torch.no_grad():
        for p in groups["harmful"]:
            ids = tok(chat.format_prompt(tok, p), add_special_tokens=False, return_tensors="pt")["input_ids"]
            hs = qm(input_ids=ids, output_hidden_states=True).hidden_states
            ref = ref + torch.stack([hs[i][0, means.positions] for i in means.layers]).double()
    assert_rel_close(means.mean("harmful"), ref / len(groups["harmful"]), rtol=1e-4)
    # hooks: zero component at every hook point, nothing left behind
    enc = chat.encode_prompts(tok, PROMPTS)
    basis = torch.randn(ad.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = qm(**enc).logits
    with iv.ablate(qm, basis):
        assert max(_components(qm, basis, enc)) < 1e-5
    with pytest.raises(UnsupportedModelError, match=r"quantized.*full-precision checkpoint"):
        iv.orthogonalize(qm, basis)
    assert not library_hooks(qm)
    with torch.no_grad():
        assert torch.equal(qm(**enc).logits, before)
