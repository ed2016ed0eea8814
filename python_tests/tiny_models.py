"""Tiny random-initialised models and tokenizers for the test suite (no downloads).

``make_tokenizer(template)`` trains a small byte-level BPE on the shipped prompts and attaches
one of three chat templates written for these tests (ChatML, Llama-3 style, Gemma style).
``make_model(arch, tokenizer)`` builds a 3-layer, d_model 80 (not a power of two) model of
one of seven architectures.
"""
from __future__ import annotations

from functools import cache

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from refusal_fast import datasets

ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "mistral", "phi3", "gpt2"]

SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<s>", "</s>",
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<bos>", "<start_of_turn>", "<end_of_turn>",
]

# ChatML (Qwen / SmolLM style): eoi = <|im_end|> \n <|im_start|> assistant \n
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3 style: eoi = <|eot_id|> <|start_header_id|> assistant <|end_header_id|> \n\n
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma style (no system role): eoi = <end_of_turn> \n <start_of_turn> model \n
GEMMA = (
    "<bos>{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}

# The exact eoi token strings each template must produce (asserted in test_chat.py).
EOI_STRINGS = {
    "chatml": ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"],
    "gemma": ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"],
}


@cache
def _tokenizer_json() -> str:
    corpus = datasets.instructions("harmful_train") + datasets.instructions("harmless_train", n=1500)
    corpus += ["assistant", "model", "user", "system", "I cannot help with that.", "Sorry, I can't.",
               "As an AI, I must decline.", "Unfortunately no.", "Apologies, but no.", "Sure, here is"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Keep role names and "\n\n" single tokens so the eoi tokens are easy to assert.
    tok.add_tokens(["assistant", "model", "\n\n"])
    return tok.to_str()


def make_tokenizer(template: str = "chatml") -> PreTrainedTokenizerFast:
    """A fresh small BPE tokenizer (~700 tokens) with the named chat template, left padding."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tok.chat_template = TEMPLATES[template]
    tok.padding_side = "left"
    return tok


def _config(arch: str, vocab: int, n_layers: int, d_model: int, tok) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab, num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=2 * d_model,
        num_attention_heads=4, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    head_dim = d_model // 4
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False,
                                          **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=False, **common)
    if arch == "phi3":
        return transformers.Phi3Config(num_key_value_heads=4, tie_word_embeddings=False, **common)
    if arch == "gemma2":
        return transformers.Gemma2Config(num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=True, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=512,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    raise ValueError(f"unknown arch {arch!r}")


def make_model(arch: str, tokenizer=None, seed: int = 0, n_layers: int = 3, d_model: int = 80,
               dtype: torch.dtype = torch.float32):
    """A random-initialised causal LM of ``arch`` sized for tests, in eval mode."""
    tokenizer = tokenizer or make_tokenizer()
    config = _config(arch, len(tokenizer), n_layers, d_model, tokenizer)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Larger-than-default init so the residual stream carries structure worth measuring.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.to(dtype).eval()


def library_hooks(model) -> list[str]:
    """Forward (pre-)hooks on ``model`` installed by refusal-fast code (not transformers' own).

    transformers v5 keeps persistent output-capturing hooks on decoder layers once
    ``output_hidden_states`` has been used, so tests look only for hooks whose function
    comes from a ``refusal_fast`` module.
    """
    left = []
    for name, m in model.named_modules():
        for fn in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()):
            owner = getattr(fn, "__module__", "") or ""
            bound = getattr(fn, "__self__", None)
            if owner.startswith("refusal_fast") or type(bound).__module__.startswith("refusal_fast"):
                left.append(f"{name or type(m).__name__}: {getattr(fn, '__qualname__', fn)}")
    return left
