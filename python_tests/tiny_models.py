"""Tiny random-initialised models and tokenizers for the test suite (no downloads).

``make_tokenizer(template)`` trains a small byte-level BPE on the shipped prompts and attaches
one of the chat templates written for these tests, each copying the style of a real model
family's template (ChatML, Llama 3, Gemma, Mistral ``[INST]``, Phi-3, Cohere, Granite, Tülu /
OLMo, gpt-oss harmony, DeepSeek, ...; see ``TEMPLATE_SOURCES``). ``make_model(arch, tokenizer)``
builds a 3-layer, d_model 80 (not a power of two) model of any architecture in ``ARCH_SPECS``:
the architecture table of docs/architectures.md is generated from that list
(scripts/architectures_table.py) and python_tests/test_architectures.py checks every claim in it.
"""
from __future__ import annotations

from dataclasses import dataclass
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
# Mistral / Mixtral instruct ([INST] ... [/INST], no system role in v0.1: folded into the user turn)
MISTRAL = (
    "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% else %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% endfor %}"
)
# Phi-3 instruct: <|user|>\n ... <|end|>\n<|assistant|>\n
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Phi-2 has no chat template; its model card's QA format
PHI2 = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n{% elif m['role'] == 'user' %}"
    "Instruct: {{ m['content'] }}\n{% else %}Output: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Output:{% endif %}"
)
# OpenAssistant Pythia (GPT-NeoX): <|prompter|> ... <|endoftext|><|assistant|>
OASST = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|prompter|>{% elif m['role'] == 'system' %}<|system|>"
    "{% else %}<|assistant|>{% endif %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Tülu 3 / OLMo 2 / OLMoE instruct: <|user|>\n ... \n<|assistant|>\n
TULU = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Granite 3 instruct
GRANITE = (
    "{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}<|end_of_text|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)
# Cohere Command-R
COHERE = (
    "<BOS_TOKEN>{% for m in messages %}<|START_OF_TURN_TOKEN|>{% if m['role'] == 'user' %}<|USER_TOKEN|>"
    "{% elif m['role'] == 'system' %}<|SYSTEM_TOKEN|>{% else %}<|CHATBOT_TOKEN|>{% endif %}{{ m['content'] }}"
    "<|END_OF_TURN_TOKEN|>{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    "{% endif %}"
)
# StarCoder2-instruct
STARCODER2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}### Response\n{{ m['content'] }}\n\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}### Response\n{% endif %}"
)
# StableLM 2 Zephyr: <|user|>\n ... <|endoftext|>\n<|assistant|>\n
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# DeepSeek V3
DEEPSEEK = (
    "<｜begin▁of▁sentence｜>{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% else %}<｜Assistant｜>{{ m['content'] }}"
    "<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
# --- reasoning ("thinking") templates: a reasoning block follows the instruction -------------
# Qwen3 (hybrid): the model opens <think> itself; enable_thinking=False renders an empty block
QWEN3_THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
# Qwen3-Thinking-2507 / DeepSeek-R1 style: the generation prompt itself opens <think>
QWEN3_OPEN_THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# gpt-oss harmony: the model writes an analysis-channel message, then the final channel
HARMONY = (
    "<|start|>system<|message|>You are a helpful assistant.\nReasoning: {{ reasoning_effort | default('medium') }}"
    "\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{% for m in messages %}{% if m['role'] == 'system' %}<|start|>developer<|message|># Instructions\n\n"
    "{{ m['content'] }}<|end|>{% elif m['role'] == 'user' %}<|start|>user<|message|>{{ m['content'] }}<|end|>"
    "{% else %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
# Magistral: [SYSTEM_PROMPT] asks for [THINK]...[/THINK]; the model opens [THINK] after [/INST]
MAGISTRAL = (
    "<s>{% set sys = 'First draft your thinking process between [THINK] and [/THINK], then answer.' %}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}[SYSTEM_PROMPT]{{ sys }}[/SYSTEM_PROMPT]"
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
# EXAONE Deep: the generation prompt opens <thought>
EXAONE_DEEP = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}[|system|][|endofturn|]\n{% endif %}"
    "[|{{ m['role'] }}|]{{ m['content'] }}{% if m['role'] != 'user' %}[|endofturn|]{% endif %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n[|assistant|]<thought>\\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL, "phi3": PHI3, "phi2": PHI2,
    "oasst": OASST, "tulu": TULU, "granite": GRANITE, "cohere": COHERE, "starcoder2": STARCODER2,
    "zephyr": ZEPHYR, "deepseek": DEEPSEEK, "harmony": HARMONY,
    "qwen3_think": QWEN3_THINK, "qwen3_open_think": QWEN3_OPEN_THINK, "magistral": MAGISTRAL,
    "exaone_deep": EXAONE_DEEP,
}
#: Which real models' chat templates each test template copies (the format, not the full template).
TEMPLATE_SOURCES = {
    "chatml": "Qwen2 / Qwen2.5, SmolLM2", "llama3": "Llama 3.x Instruct", "gemma": "Gemma 1/2/3 instruct",
    "mistral": "Mistral-7B-Instruct v0.1, Mixtral-8x7B-Instruct", "phi3": "Phi-3 instruct",
    "phi2": "Phi-2 (model card QA format)", "oasst": "OpenAssistant Pythia (GPT-NeoX)",
    "tulu": "OLMo 2 / OLMoE instruct (Tülu 3)", "granite": "Granite 3 instruct", "cohere": "Command-R",
    "starcoder2": "StarCoder2-Instruct", "zephyr": "StableLM 2 Zephyr", "deepseek": "DeepSeek V3",
    "harmony": "gpt-oss (harmony format)", "qwen3_think": "Qwen3 (enable_thinking)",
    "qwen3_open_think": "Qwen3-Thinking-2507, DeepSeek-R1", "magistral": "Magistral ([THINK])",
    "exaone_deep": "EXAONE Deep (<thought>)",
}
# Extra special tokens each template needs (the three original templates use SPECIAL_TOKENS only).
TEMPLATE_TOKENS = {
    "mistral": ["[INST]", "[/INST]"], "phi3": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
    "oasst": ["<|prompter|>", "<|assistant|>", "<|system|>", "<|endoftext|>"],
    "tulu": ["<|user|>", "<|assistant|>", "<|system|>"],
    "granite": ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"],
    "cohere": ["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
               "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"],
    "zephyr": ["<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"],
    "deepseek": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
    "harmony": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"],
    "qwen3_think": ["<think>", "</think>"], "qwen3_open_think": ["<think>", "</think>"],
    "magistral": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]"],
    "exaone_deep": ["[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]", "<thought>", "</thought>"],
}
# Reasoning markers that real tokenizers keep when decoding (Qwen3's <think>, EXAONE's <thought> are
# not special tokens there); the others are special (skipped by decode(skip_special_tokens=True)).
NON_SPECIAL_TOKENS = {"<think>", "</think>", "<thought>", "</thought>"}

# The exact eoi token strings each template must produce (asserted in test_chat.py).
EOI_STRINGS = {
    "chatml": ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"],
    "gemma": ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"],
}


# The decoded eoi text of every template (joined), and with the reasoning block closed
# (chat.close_reasoning) for the reasoning templates (asserted in test_chat.py).
EOI_TEXT = {
    "chatml": "<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<end_of_turn>\n<start_of_turn>model\n",
    "mistral": " [/INST]",
    "phi3": "<|end|>\n<|assistant|>\n",
    "phi2": "\nOutput:",
    "oasst": "<|endoftext|><|assistant|>",
    "tulu": "\n<|assistant|>\n",
    "granite": "<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
    "cohere": "<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "starcoder2": "\n\n### Response\n",
    "zephyr": "<|endoftext|>\n<|assistant|>\n",
    "deepseek": "<｜Assistant｜>",
    "harmony": "<|end|><|start|>assistant",
    "qwen3_think": "<|im_end|>\n<|im_start|>assistant\n",
    "qwen3_open_think": "<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "magistral": "[/INST]",
    "exaone_deep": "\n[|assistant|]<thought>\n",
}
EOI_TEXT_CLOSED = {
    "qwen3_think": "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "qwen3_open_think": "<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n\n",
    "harmony": "<|end|><|start|>assistant<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final"
               "<|message|>",
    "magistral": "[/INST][THINK][/THINK]",
    "exaone_deep": "\n[|assistant|]<thought>\n</thought>\n",
}
#: Reasoning format name (chat.reasoning_format) and whether the generation prompt opens the block.
REASONING_TEMPLATES = {
    "qwen3_think": ("think", False), "qwen3_open_think": ("think", True), "harmony": ("harmony", False),
    "magistral": ("THINK", False), "exaone_deep": ("thought", True),
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
    extra = [t for t in TEMPLATE_TOKENS.get(template, []) if t not in SPECIAL_TOKENS]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[4:] + [t for t in extra if t not in NON_SPECIAL_TOKENS],
    )
    plain = [t for t in extra if t in NON_SPECIAL_TOKENS]
    if plain:
        tok.add_tokens(plain)  # added, but kept by decode(skip_special_tokens=True), as in Qwen3
    tok.chat_template = TEMPLATES[template]
    tok.padding_side = "left"
    return tok


@dataclass(frozen=True)
class ArchSpec:
    """One tested architecture: how the tiny model is built and what the suite checks on it.

    ``orthogonalize``: "exact" (tested equal to ``ablate`` and exported with ``save_pretrained``)
    or "refused" (the weight edit cannot be exact; tested to raise, naming the reason).
    The flags are asserted against the adapter in test_architectures.py.
    """

    arch: str  # config.model_type
    config_class: str
    template: str
    orthogonalize: str = "exact"
    tied: bool = False
    moe: str = ""  # "" | "fused experts" | "fused experts + shared expert"
    post_norms: bool = False
    scaled: bool = False  # embedding or residual multipliers (Gemma sqrt(d), Granite)
    parallel: bool = False  # attention and MLP read the same block input
    biases: bool = False  # residual-writing biases
    note: str = ""


ARCH_SPECS: list[ArchSpec] = [
    ArchSpec("llama", "LlamaConfig", "llama3"),
    ArchSpec("mistral", "MistralConfig", "mistral"),
    ArchSpec("mixtral", "MixtralConfig", "mistral", moe="fused experts"),
    ArchSpec("qwen2", "Qwen2Config", "chatml"),
    ArchSpec("qwen2_moe", "Qwen2MoeConfig", "chatml", moe="fused experts + shared expert",
             note="layer 1 dense (mlp_only_layers)"),
    ArchSpec("qwen3", "Qwen3Config", "qwen3_think"),
    ArchSpec("qwen3_moe", "Qwen3MoeConfig", "qwen3_think", moe="fused experts"),
    ArchSpec("gemma", "GemmaConfig", "gemma", tied=True, scaled=True),
    ArchSpec("gemma2", "Gemma2Config", "gemma", orthogonalize="refused", tied=True, post_norms=True, scaled=True),
    ArchSpec("gemma3_text", "Gemma3TextConfig", "gemma", orthogonalize="refused", tied=True, post_norms=True,
             scaled=True, note="Gemma3ForCausalLM (text)"),
    ArchSpec("phi3", "Phi3Config", "phi3"),
    ArchSpec("phi", "PhiConfig", "phi2", parallel=True, biases=True),
    ArchSpec("gpt2", "GPT2Config", "chatml", tied=True, biases=True, note="Conv1D, learned positions"),
    ArchSpec("gpt_neox", "GPTNeoXConfig", "oasst", parallel=True, biases=True),
    ArchSpec("olmo2", "Olmo2Config", "tulu", orthogonalize="refused", post_norms=True),
    ArchSpec("olmoe", "OlmoeConfig", "tulu", moe="fused experts"),
    ArchSpec("granite", "GraniteConfig", "granite", tied=True, scaled=True,
             note="embedding x12, residual x0.22, logits /8"),
    ArchSpec("cohere", "CohereConfig", "cohere", tied=True, parallel=True, note="logit_scale"),
    ArchSpec("starcoder2", "Starcoder2Config", "starcoder2", biases=True),
    ArchSpec("stablelm", "StableLmConfig", "zephyr", parallel=True, note="use_parallel_residual=True"),
    ArchSpec("smollm3", "SmolLM3Config", "qwen3_think", tied=True, note="NoPE every 2nd layer"),
    ArchSpec("gpt_oss", "GptOssConfig", "harmony", moe="fused experts", biases=True,
             note="transposed experts with biases, attention sinks"),
    ArchSpec("deepseek_v3", "DeepseekV3Config", "deepseek", moe="fused experts + shared expert",
             note="MLA attention; layer 0 dense"),
]
SPECS = {s.arch: s for s in ARCH_SPECS}


def _config(arch: str, vocab: int, n_layers: int, d_model: int, tok) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab, num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=2 * d_model,
        num_attention_heads=4, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    head_dim = d_model // 4
    moe = dict(num_experts_per_tok=2)
    small_ff = dict(common, intermediate_size=48)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    T = transformers
    extra = {
        "mixtral": lambda: T.MixtralConfig(num_key_value_heads=2, sliding_window=None, num_local_experts=4,
                                           tie_word_embeddings=False, **moe, **common),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, moe_intermediate_size=48,
                                              shared_expert_intermediate_size=96, mlp_only_layers=[1],
                                              tie_word_embeddings=False, **moe, **common),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(num_key_value_heads=2, head_dim=head_dim, num_experts=4,
                                              moe_intermediate_size=48, tie_word_embeddings=False, **moe, **common),
        "gemma": lambda: T.GemmaConfig(num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=True, **common),
        "gemma3_text": lambda: T.Gemma3TextConfig(num_key_value_heads=2, head_dim=head_dim, sliding_window=4,
                                                  tie_word_embeddings=True, **common),
        "phi": lambda: T.PhiConfig(num_key_value_heads=4, tie_word_embeddings=False, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(use_parallel_residual=True, tie_word_embeddings=False, **common),
        "olmo2": lambda: T.Olmo2Config(num_key_value_heads=2, tie_word_embeddings=False, **common),
        "olmoe": lambda: T.OlmoeConfig(num_key_value_heads=2, num_experts=4, tie_word_embeddings=False, **moe,
                                       **small_ff),
        "granite": lambda: T.GraniteConfig(num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                                           attention_multiplier=0.05, logits_scaling=8.0, tie_word_embeddings=True,
                                           **common),
        "cohere": lambda: T.CohereConfig(num_key_value_heads=2, logit_scale=0.25, tie_word_embeddings=True, **common),
        "starcoder2": lambda: T.Starcoder2Config(num_key_value_heads=2, use_bias=True, sliding_window=None,
                                                 tie_word_embeddings=False, **common),
        "stablelm": lambda: T.StableLmConfig(num_key_value_heads=2, use_parallel_residual=True,
                                             rope_parameters=dict(rope, partial_rotary_factor=0.5),
                                             tie_word_embeddings=False, **common),
        "smollm3": lambda: T.SmolLM3Config(num_key_value_heads=2, no_rope_layer_interval=2, tie_word_embeddings=True,
                                           **common),
        "gpt_oss": lambda: T.GptOssConfig(num_key_value_heads=2, head_dim=head_dim, num_local_experts=4,
                                          sliding_window=4, rope_parameters=rope, tie_word_embeddings=False, **moe,
                                          **small_ff),
        "deepseek_v3": lambda: T.DeepseekV3Config(
            num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=48,
            first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=20, n_group=1, topk_group=1, tie_word_embeddings=False, **moe, **common),
        "granitemoe": lambda: T.GraniteMoeConfig(  # not in ARCH_SPECS: the "untested architecture" test
            num_key_value_heads=2, num_local_experts=4, embedding_multiplier=6.0, residual_multiplier=0.5,
            tie_word_embeddings=False, **moe, **small_ff),
    }
    if arch in extra:
        return extra[arch]()
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
    tokenizer = tokenizer or make_tokenizer(SPECS[arch].template if arch in SPECS else "chatml")
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
