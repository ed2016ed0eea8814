"""Chat formatting: prompt text, end-of-instruction positions, refusal tokens, length buckets.

The *end-of-instruction* (eoi) tokens are the chat-template tokens that follow the user's
instruction up to the assistant's first token, e.g. ``<|im_end|> \\n <|im_start|> assistant \\n``
for ChatML. The refusal-direction literature reads activations at these "post-instruction"
positions. Because prompts are left padded, the eoi tokens sit at the same negative offsets
(``[-n_eoi, ..., -1]``) in every row of a batch.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_REFUSAL_PHRASES", "format_prompt", "eoi_tokens", "eoi_positions", "encode_prompts",
    "length_buckets", "refusal_token_ids", "ensure_pad_token", "pad_token_id", "collate", "template_fingerprint",
    "check_prompt_lengths",
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

    Templates that reject a system role (Gemma) get the system prompt prepended to the
    instruction, as their model cards recommend.
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
    except Exception as exc:  # jinja raise_exception on a system role
        if system_prompt is None or "system" not in str(exc).lower():
            raise
        text = tokenizer.apply_chat_template(
            _messages(f"{system_prompt}\n\n{instruction}", None), tokenize=False, add_generation_prompt=True
        )
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
