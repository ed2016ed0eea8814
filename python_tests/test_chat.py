import pytest
import torch
from tiny_models import EOI_STRINGS, EOI_TEXT, EOI_TEXT_CLOSED, REASONING_TEMPLATES, TEMPLATES, make_tokenizer

from refusal_fast import chat


@pytest.mark.parametrize("template", sorted(EOI_STRINGS))
@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
def test_eoi_tokens_exact(template, system_prompt):
    tok = make_tokenizer(template)
    ids = chat.eoi_tokens(tok, system_prompt)
    assert [tok.decode([i]) for i in ids] == EOI_STRINGS[template]
    assert chat.eoi_positions(tok, system_prompt) == list(range(-len(ids), 0))


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
def test_eoi_text_every_template(template, system_prompt):
    """Every model family's template: the eoi tokens are exactly the template text after the instruction."""
    assert set(EOI_TEXT) == set(TEMPLATES)
    tok = make_tokenizer(template)
    ids = chat.eoi_tokens(tok, system_prompt)
    assert "".join(tok.decode([i]) for i in ids) == EOI_TEXT[template]
    text = chat.format_prompt(tok, "hi there", system_prompt)
    assert text.endswith("hi there" + EOI_TEXT[template])
    if system_prompt is not None:
        assert system_prompt in text  # as a system turn, or folded into the user turn


_ROWS = ["hi", "Explain photosynthesis in detail, please?", "x!"]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_eoi_tokens_at_end_of_every_padded_row(template):
    tok = make_tokenizer(template)
    enc = chat.encode_prompts(tok, _ROWS)
    eoi = torch.tensor(chat.eoi_tokens(tok))
    for row in enc["input_ids"]:
        assert torch.equal(row[-len(eoi):], eoi)


# ------------------------------------------------------------------------------------------
# reasoning ("thinking") templates


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_reasoning_format_detected(template):
    tok = make_tokenizer(template)
    fmt = chat.reasoning_format(tok)
    if template not in REASONING_TEMPLATES:
        assert fmt is None and not chat.prompt_opens_reasoning(tok)
        with pytest.raises(ValueError, match="no known reasoning block"):
            chat.close_reasoning(tok)
        return
    name, opens = REASONING_TEMPLATES[template]
    assert fmt.name == name
    assert chat.prompt_opens_reasoning(tok) == opens
    assert chat.prompt_opens_reasoning(tok, "Be brief.") == opens


@pytest.mark.parametrize("template", sorted(REASONING_TEMPLATES))
@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
def test_close_reasoning_eoi_positions(template, system_prompt):
    """Without and with the closed reasoning block, the eoi tokens are the template text after the
    instruction, at the end of every left-padded row; the original tokenizer is untouched."""
    tok = make_tokenizer(template)
    closed = chat.close_reasoning(tok)
    assert closed is not tok and tok.chat_template == TEMPLATES[template]
    ids = chat.eoi_tokens(closed, system_prompt)
    assert "".join(closed.decode([i]) for i in ids) == EOI_TEXT_CLOSED[template]
    assert not chat.prompt_opens_reasoning(closed, system_prompt)
    enc = chat.encode_prompts(closed, _ROWS, system_prompt)
    for row in enc["input_ids"]:
        assert row[-len(ids):].tolist() == ids
    open_ids = chat.eoi_tokens(tok, system_prompt)
    assert len(ids) > len(open_ids)


def test_close_reasoning_uses_enable_thinking():
    """Qwen3's template renders its own empty block for enable_thinking=False; close_reasoning gives the same text."""
    tok = make_tokenizer("qwen3_think")
    msgs = [{"role": "user", "content": "hi"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert chat.format_prompt(chat.close_reasoning(tok), "hi") == want
    assert want.endswith("<think>\n\n</think>\n\n")


# (template, completion, reasoning, answer): completions in each model family's style
_COMPLETIONS = [
    ("qwen3_think", "<think>\nThe user asks for X. That is harmful.\n</think>\n\nI cannot help with that.",
     "The user asks for X. That is harmful.", "I cannot help with that."),
    ("qwen3_think", "Sure, here is a poem.", "", "Sure, here is a poem."),  # no block: all answer
    ("qwen3_think", "<think>\nLet me think about this for a long", "Let me think about this for a long", ""),
    ("qwen3_open_think", "The user wants X.\n</think>\n\nSorry, I can't do that.", "The user wants X.",
     "Sorry, I can't do that."),
    ("qwen3_open_think", "still thinking, never closed", "still thinking, never closed", ""),
    ("harmony", "<|channel|>analysis<|message|>We must refuse.<|end|><|start|>assistant<|channel|>final<|message|>"
                "I can't help with that.<|return|>", "We must refuse.", "I can't help with that."),
    ("magistral", "[THINK]Okay, the user asks...[/THINK]I'm sorry, but I can't assist.", "Okay, the user asks...",
     "I'm sorry, but I can't assist."),
    ("exaone_deep", "Hmm, this is a request for X.\n</thought>\nI apologize, but I cannot.",
     "Hmm, this is a request for X.", "I apologize, but I cannot."),
]


@pytest.mark.parametrize("template,text,reasoning,answer", _COMPLETIONS)
def test_split_reasoning_each_style(template, text, reasoning, answer):
    tok = make_tokenizer(template)
    fmt = chat.reasoning_format(tok)
    opened = chat.prompt_opens_reasoning(tok)
    assert chat.split_reasoning(text, fmt, opened) == (reasoning, answer)
    assert chat.strip_reasoning(text, fmt, opened) == answer
    if not opened:  # the format is also found from the text alone
        assert chat.split_reasoning(text) == (reasoning, answer)


def test_split_reasoning_plain_text_and_errors():
    assert chat.split_reasoning("I cannot help.") == ("", "I cannot help.")
    assert chat.split_reasoning("") == ("", "")
    with pytest.raises(TypeError):
        chat.split_reasoning(None)


def test_decode_completions_keeps_only_reasoning_markers():
    """gpt-oss's channel markers are special tokens: decode(skip_special_tokens=True) would glue
    'analysis...assistantfinal...' together; decode_completions keeps them, drops the rest (pad, eos)."""
    tok = make_tokenizer("harmony")
    text = ("<|channel|>analysis<|message|>We must refuse.<|end|><|start|>assistant<|channel|>final<|message|>"
            "No.<|return|>")
    ids = tok([text + "<pad><pad>", "Sure.</s><pad><pad><pad>"], add_special_tokens=False)["input_ids"]
    n = max(len(i) for i in ids)
    ids = torch.tensor([i + [tok.pad_token_id] * (n - len(i)) for i in ids])
    plain = tok.batch_decode(ids, skip_special_tokens=True)
    assert "<|channel|>" not in plain[0] and "analysisWe must refuse." in plain[0]
    got = chat.decode_completions(tok, ids, chat.reasoning_format(tok))
    assert got == [text, "Sure."]
    assert chat.decode_completions(tok, ids, None) == plain


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
