"""Chat formatting: prompt text, end-of-instruction positions, refusal tokens, length buckets.

The *end-of-instruction* (eoi) tokens are the chat-template tokens that follow the user's
instruction up to the assistant's first token, e.g. ``<|im_end|> \\n <|im_start|> assistant \\n``
for ChatML. The refusal-direction literature reads activations at these "post-instruction"
positions. Because prompts are left padded, the eoi tokens sit at the same negative offsets
(``[-n_eoi, ..., -1]``) in every row of a batch.

Reasoning ("thinking") models put a reasoning block between the instruction and the answer:
Qwen3 / DeepSeek-R1 ``<think>...</think>``, gpt-oss's harmony ``analysis`` channel, Magistral
``[THINK]...[/THINK]``, EXAONE Deep ``<thought>...</thought>``. Some templates open the block in
the generation prompt (then the eoi tokens end with the opening tag), others leave it to the
model. :func:`reasoning_format` recognises the format from the template,
:func:`close_reasoning` gives a tokenizer whose prompts end with an empty, closed block (the
model answers directly: ``enable_thinking=False`` where the template supports it), and
:func:`split_reasoning` / :func:`strip_reasoning` separate a completion's reasoning from its
answer so classifiers judge the answer.
"""
from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_REFUSAL_PHRASES", "format_prompt", "eoi_tokens", "eoi_positions", "encode_prompts",
    "length_buckets", "refusal_token_ids", "ensure_pad_token", "pad_token_id", "collate", "template_fingerprint",
    "check_prompt_lengths",
    "ReasoningFormat", "REASONING_FORMATS", "reasoning_format", "prompt_opens_reasoning", "close_reasoning",
    "split_reasoning", "strip_reasoning", "decode_completions",
]

#: Phrases whose first token starts a typical refusal; :func:`refusal_token_ids` keeps the first token of each.
DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = ("I", "As", "Sorry", "Unfortunately", "Apologies")

# Diverse instructions (different final characters/words) used to find the template suffix.
_SENTINELS = (
    "Tell me a story about a lighthouse keeper.",
    "what is 17 times 23?",
    "Translate 'bonjour' into English please",
    "List three colours!",
    "zqxv",
)


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token (eos or unk when missing) and left padding; returns it.

    This changes the tokenizer. The library's own functions never call it on a caller's tokenizer:
    they pad with :func:`pad_token_id` and :func:`collate` instead.
    """
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token first")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos, else its unk (the tokenizer is not changed)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(tokenizer, "unk_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token first")


def collate(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` / ``attention_mask`` / ``position_ids`` ``[batch, seq]``.

    ``position_ids = cumsum(mask) - 1`` clamped at 0, so absolute-position models see the positions
    of the unpadded prompt.
    """
    if not rows:
        raise ValueError("collate: no rows")
    T = max(len(r) for r in rows)
    if T == 0:
        raise ValueError("collate: all prompts are empty")
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[b, T - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def check_prompt_lengths(model, lengths: Sequence[int], instructions: Sequence[str], what: str = "prompt",
                         new_tokens: int = 0) -> None:
    """Fail on prompts longer than the model can read, warn on prompts longer than it was trained on.

    Models with a learned position table (GPT-2's ``wpe``, ``n_positions`` rows) cannot embed a
    longer input: ValueError naming the prompt and the limit. Rotary models can, but their quality
    past ``config.max_position_embeddings`` is not what they were trained for: a warning.

    Args:
        lengths: token count of each formatted prompt; ``instructions``: the prompts, same order.
        new_tokens: tokens that generation will append (``max_new_tokens``).
    """
    if not lengths:
        return
    from .models import get_adapter

    ad = get_adapter(model)
    i = max(range(len(lengths)), key=lambda j: lengths[j])
    n = int(lengths[i]) + int(new_tokens)
    size = f"{lengths[i]} tokens long after chat formatting" + (f", {n} with {new_tokens} new tokens" if new_tokens
                                                                 else "")
    if ad.pos_embed is not None:
        table = int(ad.pos_embed.num_embeddings)
        if n > table:
            raise ValueError(
                f"{what} {i} ({instructions[i][:60]!r}) is {size}, but {ad.arch} has learned positions for only "
                f"{table} tokens (n_positions); shorten or drop that prompt"
                + (" or generate fewer tokens" if new_tokens else "")
            )
        return
    trained = getattr(ad.model.config, "max_position_embeddings", None)
    if isinstance(trained, int) and n > trained:
        warnings.warn(
            f"{what} {i} ({instructions[i][:60]!r}) is {size}, beyond the model's max_position_embeddings={trained}; "
            "results past the trained context length are unreliable",
            stacklevel=3,
        )


def _messages(instruction: str, system_prompt: str | None) -> list[dict]:
    msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return msgs + [{"role": "user", "content": instruction}]


def format_prompt(tokenizer, instruction: str, system_prompt: str | None = None) -> str:
    """Render one instruction with the tokenizer's chat template, ending at the assistant's first token.

    Templates that reject a system role (Gemma, Mistral v0.1) get the system prompt prepended to
    the instruction, as their model cards recommend.
    """
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat_template; set tokenizer.chat_template to a Jinja template"
        )
    try:
        text = tokenizer.apply_chat_template(
            _messages(instruction, system_prompt), tokenize=False, add_generation_prompt=True
        )
    except Exception:  # jinja raise_exception on a system role ("roles must alternate", "System role not ...")
        if system_prompt is None:
            raise
        try:
            text = tokenizer.apply_chat_template(
                _messages(f"{system_prompt}\n\n{instruction}", None), tokenize=False, add_generation_prompt=True
            )
        except Exception:
            pass
        else:
            return text
        raise
    return text


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eoi_tokens(tokenizer, system_prompt: str | None = None) -> list[int]:
    """Token ids that follow the user's instruction up to the assistant's first token.

    Found as the longest token suffix shared by several diverse rendered instructions,
    never reaching into the instruction text itself.
    """
    suffix: list[int] | None = None
    for instruction in _SENTINELS:
        text = format_prompt(tokenizer, instruction, system_prompt)
        ids = _tokenize(tokenizer, text)
        # Tokens strictly after the instruction: tokenize the text after the instruction's end
        # would risk different merges, so bound the suffix length by the characters instead.
        tail_chars = len(text) - (text.rfind(instruction) + len(instruction))
        max_len = _max_suffix_tokens(tokenizer, text, ids, tail_chars)
        cand = ids[len(ids) - max_len:] if max_len else []
        if suffix is None:
            suffix = cand
        else:
            n = 0
            while n < min(len(suffix), len(cand)) and suffix[-1 - n] == cand[-1 - n]:
                n += 1
            suffix = suffix[len(suffix) - n:]
    if not suffix:
        raise ValueError("could not find any template tokens after the instruction (chat template adds none?)")
    return suffix


def _max_suffix_tokens(tokenizer, text: str, ids: list[int], tail_chars: int) -> int:
    """Number of trailing tokens lying entirely inside the last ``tail_chars`` characters."""
    start_char = len(text) - tail_chars
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = 0
        for s, _ in reversed(offsets):
            if s < start_char:
                break
            n += 1
        return n
    # Slow tokenizer: count tokens of the tail alone (upper bound checked by the common suffix).
    return min(len(_tokenize(tokenizer, text[start_char:])), len(ids))


def eoi_positions(tokenizer, system_prompt: str | None = None) -> list[int]:
    """Negative offsets of the end-of-instruction tokens in a left-padded prompt, e.g. ``[-5, ..., -1]``."""
    n = len(eoi_tokens(tokenizer, system_prompt))
    return list(range(-n, 0))


def encode_prompts(
    tokenizer, instructions: Sequence[str], system_prompt: str | None = None, device=None
) -> dict[str, torch.Tensor]:
    """Format and tokenize instructions as one left-padded batch (the tokenizer is not changed).

    Returns:
        ``input_ids`` ``[batch, seq]``, ``attention_mask`` ``[batch, seq]`` and ``position_ids``
        ``[batch, seq]`` (``cumsum(mask) - 1``, so absolute-position models such as GPT-2 see
        the same positions as for the unpadded prompt — pass them to ``forward``/``generate``).
    """
    if isinstance(instructions, str) or not isinstance(instructions, Sequence):
        raise TypeError("instructions must be a sequence of strings")
    if len(instructions) == 0:
        raise ValueError("instructions is empty")
    texts = [format_prompt(tokenizer, t, system_prompt) for t in instructions]
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return collate(rows, pad_token_id(tokenizer), device)  # left padding, whatever the tokenizer's padding_side


def prompt_lengths(tokenizer, instructions: Sequence[str], system_prompt: str | None = None) -> list[int]:
    """Token count of each formatted prompt (no padding)."""
    texts = [format_prompt(tokenizer, t, system_prompt) for t in instructions]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of at most ``batch_size`` with similar lengths (longest first), to cut padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def refusal_token_ids(tokenizer, phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES) -> list[int]:
    """Unique first token ids of ``phrases`` as they would start the assistant's reply."""
    if isinstance(phrases, str):
        phrases = [phrases]
    ids: list[int] = []
    for phrase in phrases:
        toks = _tokenize(tokenizer, phrase)
        if not toks:
            raise ValueError(f"refusal phrase {phrase!r} tokenizes to nothing")
        if toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise ValueError("no refusal phrases given")
    return ids


def template_fingerprint(tokenizer, system_prompt: str | None = None) -> str:
    """Short hash of the rendered template around a fixed instruction (for artifact metadata)."""
    import hashlib

    text = format_prompt(tokenizer, "{instruction}", system_prompt)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# reasoning blocks


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model family marks its reasoning block.

    Attributes:
        name: short name.
        open: text that opens the reasoning block.
        answer: text after which the answer starts (the closing tag, or harmony's final-channel header).
        empty: a closed, empty block as it would follow the generation prompt (the model then answers).
        end: texts that end the answer (stripped from it), e.g. harmony's ``<|return|>``.
        models: which real models use it (documentation).
    """

    name: str
    open: str
    answer: str
    empty: str
    end: tuple[str, ...] = ()
    models: str = ""


#: The reasoning formats :func:`reasoning_format` recognises, checked in this order.
REASONING_FORMATS: tuple[ReasoningFormat, ...] = (
    ReasoningFormat("harmony", "<|channel|>analysis<|message|>", "<|channel|>final<|message|>",
                    "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
                    ("<|return|>", "<|end|>", "<|call|>"), "gpt-oss"),
    ReasoningFormat("think", "<think>", "</think>", "<think>\n\n</think>\n\n", (),
                    "Qwen3, Qwen3-Thinking, DeepSeek-R1, SmolLM3, GLM-4.5"),
    ReasoningFormat("THINK", "[THINK]", "[/THINK]", "[THINK][/THINK]", (), "Magistral"),
    ReasoningFormat("thought", "<thought>", "</thought>", "<thought>\n\n</thought>\n", (), "EXAONE Deep"),
)
_SENTINEL = "zqxv instruction"


def reasoning_format(tokenizer) -> ReasoningFormat | None:
    """The :class:`ReasoningFormat` whose markers the tokenizer's chat template uses, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = " ".join(str(t) for t in template.values())
    if not isinstance(template, str):
        return None
    for fmt in REASONING_FORMATS:
        markers = ("<|channel|>",) if fmt.name == "harmony" else (fmt.open, fmt.answer)
        if any(m in template for m in markers):
            return fmt
    return None


def prompt_opens_reasoning(tokenizer, system_prompt: str | None = None, fmt: ReasoningFormat | None = None) -> bool:
    """True when the generation prompt itself opens a reasoning block that it does not close
    (Qwen3-Thinking ``<think>\\n``, EXAONE Deep ``<thought>\\n``): completions then start inside it."""
    fmt = fmt or reasoning_format(tokenizer)
    if fmt is None:
        return False
    text = format_prompt(tokenizer, _SENTINEL, system_prompt)
    tail = text[text.rfind(_SENTINEL) + len(_SENTINEL):]
    i = tail.rfind(fmt.open)
    return i >= 0 and tail.find(fmt.answer, i + len(fmt.open)) < 0


def _prompt_closes_reasoning(tokenizer, fmt: ReasoningFormat, system_prompt: str | None = None) -> bool:
    text = format_prompt(tokenizer, _SENTINEL, system_prompt)
    tail = text[text.rfind(_SENTINEL) + len(_SENTINEL):]
    return tail.rstrip().endswith(fmt.answer.rstrip()) or (fmt.answer in tail and not prompt_opens_reasoning(
        tokenizer, system_prompt, fmt) and tail.rfind(fmt.answer) > tail.rfind(fmt.open))


def close_reasoning(tokenizer, fmt: ReasoningFormat | None = None):
    """A copy of ``tokenizer`` whose generation prompts end with an empty, closed reasoning block,
    so the model answers at once (as users expect when they switch thinking off).

    Templates that support ``enable_thinking`` (Qwen3, SmolLM3) get it set to false; a template
    that opens the block itself gets the closing tag appended; otherwise the format's empty block
    (``<think>\\n\\n</think>\\n\\n``, harmony's empty analysis message + final-channel header,
    ``[THINK][/THINK]``) is appended to every generation prompt. The eoi tokens of the copy end with
    the closed block.

    Raises:
        ValueError: the template uses no known reasoning format (pass ``fmt``), or the result does
            not end with a closed block.
    """
    fmt = fmt or reasoning_format(tokenizer)
    if fmt is None:
        raise ValueError("the chat template uses no known reasoning block (<think>, harmony analysis channel, [THINK], "
                         "<thought>); pass fmt=refusal_fast.chat.ReasoningFormat(...)")
    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise ValueError("close_reasoning needs a single string chat_template")
    out = copy.deepcopy(tokenizer)
    if "enable_thinking" in template:
        out.chat_template = "{%- set enable_thinking = false %}" + template
        if _prompt_closes_reasoning(out, fmt):
            return out
    if prompt_opens_reasoning(tokenizer, fmt=fmt):
        suffix = fmt.answer + fmt.empty[fmt.empty.find(fmt.answer) + len(fmt.answer):]
    else:
        suffix = fmt.empty
    literal = json.dumps(suffix)  # a Jinja string literal (JSON escapes, ASCII only)
    out.chat_template = template + "{%- if add_generation_prompt %}{{- " + literal + " }}{%- endif %}"
    if not _prompt_closes_reasoning(out, fmt):
        raise ValueError(f"could not close the {fmt.name} reasoning block in this chat template")
    return out


def split_reasoning(text: str, fmt: ReasoningFormat | None = None, opened: bool = False) -> tuple[str, str]:
    """``(reasoning, answer)`` of a completion.

    Args:
        text: the completion (decoded keeping the format's markers, see :func:`decode_completions`).
        fmt: the format (default: the first of :data:`REASONING_FORMATS` whose markers occur in ``text``).
        opened: the prompt opened the block (:func:`prompt_opens_reasoning`), so the completion
            starts inside it.

    Returns:
        the reasoning (without markers; "" when there is none) and the answer after the block
        (leading whitespace stripped). A block that never closes leaves the answer "" (the model
        did not get to answer); text without any block is all answer unless ``opened``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if fmt is None:
        hits = [(text.find(m), f) for f in REASONING_FORMATS for m in (f.open, f.answer) if m in text]
        if not hits:
            return ("", "") if opened and text.strip() else ("", text)
        fmt = min(hits, key=lambda h: h[0])[1]
    a = text.find(fmt.answer)
    if a < 0:
        if fmt.open in text:
            start = text.find(fmt.open) + len(fmt.open)
            return text[start:].strip(), ""
        return (text.strip(), "") if opened else ("", text)
    reasoning = text[:a]
    if fmt.open in reasoning:
        reasoning = reasoning[reasoning.find(fmt.open) + len(fmt.open):]
    if fmt.name == "harmony":  # the analysis message ends with <|end|><|start|>assistant
        for marker in ("<|end|>", "<|start|>assistant"):
            reasoning = reasoning.replace(marker, "")
    answer = text[a + len(fmt.answer):]
    for end in fmt.end:
        if end in answer:
            answer = answer[:answer.find(end)]
    return reasoning.strip(), answer.lstrip()


def strip_reasoning(text: str, fmt: ReasoningFormat | None = None, opened: bool = False) -> str:
    """The answer of a completion, without its reasoning block (see :func:`split_reasoning`).

    Classifiers call this so that a refusal after the reasoning counts and reasoning that
    merely discusses refusing does not."""
    return split_reasoning(text, fmt, opened)[1]


def decode_completions(tokenizer, ids, fmt: ReasoningFormat | None = None) -> list[str]:
    """Decode generated ids ``[batch, new]`` like ``batch_decode(skip_special_tokens=True)``, except
    that special tokens belonging to the reasoning format's markers (harmony's ``<|channel|>``,
    ``<|message|>``, ...) are kept so :func:`split_reasoning` can find the answer."""
    if fmt is None:
        return tokenizer.batch_decode(ids, skip_special_tokens=True)
    markers = fmt.open + fmt.answer + fmt.empty + "".join(fmt.end)
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t and t not in markers),
                      key=len, reverse=True)
    out = []
    for text in tokenizer.batch_decode(ids, skip_special_tokens=False):
        for t in specials:
            text = text.replace(t, "")
        out.append(text)
    return out
