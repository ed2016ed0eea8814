import pytest
import torch
from tiny_models import EOI_STRINGS, TEMPLATES, make_tokenizer

from refusal_fast import chat


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
def test_eoi_tokens_exact(template, system_prompt):
    tok = make_tokenizer(template)
    ids = chat.eoi_tokens(tok, system_prompt)
    assert [tok.decode([i]) for i in ids] == EOI_STRINGS[template]
    assert chat.eoi_positions(tok, system_prompt) == list(range(-len(ids), 0))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_eoi_tokens_at_end_of_every_padded_row(template):
    tok = make_tokenizer(template)
    enc = chat.encode_prompts(tok, ["hi", "Explain photosynthesis in detail, please?", "x!"])
    eoi = torch.tensor(chat.eoi_tokens(tok))
    for row in enc["input_ids"]:
        assert torch.equal(row[-len(eoi):], eoi)


def test_system_prompt_rendered():
    tok = make_tokenizer("chatml")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in chat.format_prompt(tok, "hi", "Be brief.")
    gem = make_tokenizer("gemma")  # template rejects system role -> folded into the user turn
    assert "Be brief.\n\nhi<end_of_turn>" in chat.format_prompt(gem, "hi", "Be brief.")


def test_left_padding_and_position_ids(tokenizer):
    enc = chat.encode_prompts(tokenizer, ["a", "a much longer instruction than the first one"])
    mask = enc["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()
    pos = enc["position_ids"]
    n_real = int(mask[0].sum())
    assert pos[0, -n_real:].tolist() == list(range(n_real))
    assert pos[1].tolist() == list(range(pos.shape[1]))


def test_gpt2_padded_equals_unpadded_with_position_ids(gpt2):
    """Absolute-position models need position_ids derived from the mask (the known pitfall)."""
    model, tok = gpt2
    prompts = ["hi", "a much longer instruction than the first one"]
    enc = chat.encode_prompts(tok, prompts)
    single = chat.encode_prompts(tok, prompts[:1])
    with torch.no_grad():
        batched = model(**enc).logits[0, -1]
        alone = model(**single).logits[0, -1]
        no_pos = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, -1]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(no_pos, alone, atol=1e-3)


def test_refusal_token_ids(tokenizer):
    ids = chat.refusal_token_ids(tokenizer, ["I cannot", "Sorry", "I'm sorry"])
    assert len(ids) == len(set(ids)) == 2
    assert tokenizer.decode([ids[0]]) == "I"
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        chat.refusal_token_ids(tokenizer, [""])


def test_length_buckets():
    b = chat.length_buckets([3, 9, 1, 7, 5], 2)
    assert b == [[1, 3], [4, 0], [2]]
    assert sorted(i for x in b for i in x) == list(range(5))
    with pytest.raises(ValueError):
        chat.length_buckets([1], 0)


def test_bad_input(tokenizer):
    with pytest.raises(TypeError):
        chat.encode_prompts(tokenizer, "not a list")
    with pytest.raises(ValueError, match="empty"):
        chat.encode_prompts(tokenizer, [])
    with pytest.raises(TypeError, match="must be a str"):
        chat.encode_prompts(tokenizer, ["ok", 3])
    tok = make_tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        chat.format_prompt(tok, "hi")


def test_ensure_pad_token():
    tok = make_tokenizer("chatml")
    tok.pad_token = None
    tok.padding_side = "right"
    chat.ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
