"""Evaluation: refusal score, KL divergence, batched greedy generation, refusal metrics.

Every function takes raw instructions, formats them with the tokenizer's chat template
(:func:`refusal_fast.chat.format_prompt`), groups them into length-bucketed, left-padded batches
(passing ``position_ids`` so absolute-position models see unpadded positions), runs under
``torch.inference_mode()`` and returns results in the input order. They work under any
intervention context manager (``ablate``, ``add``, ``steer``, ``row_interventions``), since those
act through forward hooks.

Only last-position logits are computed (``logits_to_keep=1``): ``[batch, vocab]``, never
``[batch, seq, vocab]``.
"""
from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from . import chat
from .classify import (  # noqa: F401 - re-exported
    DEFAULT_REFUSAL_PREFIX_PATTERNS,
    DEFAULT_REFUSAL_SUBSTRINGS,
    JudgeRefusalClassifier,
    PrefixRefusalClassifier,
    RefusalVerdict,
    SubstringRefusalClassifier,
    as_classifier,
)
from .models import get_adapter

__all__ = [
    "refusal_scores", "refusal_score_from_logits", "last_token_logprobs", "kl_divergence", "kl_from_logprobs",
    "generate_completions", "refusal_rate", "evaluate_prompts", "save_json",
    "SubstringRefusalClassifier", "PrefixRefusalClassifier", "JudgeRefusalClassifier", "RefusalVerdict",
    "DEFAULT_REFUSAL_SUBSTRINGS", "DEFAULT_REFUSAL_PREFIX_PATTERNS",
]


# --------------------------------------------------------------------------------------------
# input validation, tokenisation, batching


def check_instructions(instructions: Any, what: str = "instructions") -> list[str]:
    """Validate a non-empty list of strings (TypeError / ValueError naming ``what``)."""
    if isinstance(instructions, str) or not isinstance(instructions, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(instructions).__name__}")
    out = list(instructions)
    if not out:
        raise ValueError(f"{what} is empty")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(t).__name__}")
    return out


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is a positive int, else ValueError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def tokenize_prompts(tokenizer, instructions: Sequence[str], system_prompt: str | None = None) -> list[list[int]]:
    """Chat-formatted token ids of each instruction (no padding), as :func:`chat.encode_prompts` would.

    The tokenizer is not changed (padding uses :func:`chat.pad_token_id` / :func:`chat.collate`).
    """
    texts = [chat.format_prompt(tokenizer, t, system_prompt) for t in instructions]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _batches(model, tokenizer, instructions, batch_size, system_prompt, progress, desc, new_tokens: int = 0
             ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(indices, batch)`` over length buckets of the formatted prompts (longest first)."""
    ids = tokenize_prompts(tokenizer, instructions, system_prompt)
    chat.check_prompt_lengths(model, [len(r) for r in ids], instructions, new_tokens=new_tokens)
    pad = chat.pad_token_id(tokenizer)
    device = get_adapter(model).device
    bar = progress_bar(len(ids), desc, progress)
    try:
        for idx in chat.length_buckets([len(r) for r in ids], batch_size):
            yield idx, chat.collate([ids[i] for i in idx], pad, device)
            bar.update(len(idx))
    finally:
        bar.close()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` items (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------------
# last-position logits


_KEEP_SUPPORT: dict[type, bool] = {}


def _supports_logits_to_keep(model) -> bool:
    cls = type(model)
    if cls not in _KEEP_SUPPORT:
        try:
            _KEEP_SUPPORT[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _KEEP_SUPPORT[cls] = False
    return _KEEP_SUPPORT[cls]


def last_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits at the last position of a left-padded batch: ``[batch, vocab]`` (model dtype).

    Uses ``logits_to_keep=1`` (transformers >= 4.50); otherwise runs the base model and applies
    the LM head (and Gemma-2's final logit soft-capping) to the last hidden state only.
    """
    if _supports_logits_to_keep(model):
        out = model(**batch, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, :]
    ad = get_adapter(model)
    h = ad.base_model(**batch, use_cache=False).last_hidden_state[:, -1, :]
    logits = ad.lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def refusal_mask(refusal_ids: Any, vocab: int, device) -> torch.Tensor:
    """``[vocab]`` bool mask of the refusal token ids (validated: 1-D, integers in range, not every token)."""
    ids = torch.as_tensor(list(refusal_ids) if not isinstance(refusal_ids, torch.Tensor) else refusal_ids)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"refusal_ids must be a non-empty 1-D list of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"refusal_ids must be integers, got dtype {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"refusal_ids must be in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[ids.to(device=device, dtype=torch.long)] = True
    if bool(mask.all()):
        raise ValueError("refusal_ids cover the whole vocabulary; the refusal score is undefined")
    return mask


def refusal_score_from_logits(logits: torch.Tensor, refusal_mask: torch.Tensor) -> torch.Tensor:
    """``log p(R) - log(1 - p(R))`` from next-token logits ``[batch, vocab]``: ``[batch]`` float64.

    Computed stably as ``logsumexp(logits[R]) - logsumexp(logits[not R])`` in float64, where
    ``refusal_mask`` ``[vocab]`` bool marks the refusal tokens R.
    """
    x = logits.to(torch.float64)
    neg = torch.tensor(-math.inf, dtype=torch.float64, device=x.device)
    lse_r = torch.logsumexp(torch.where(refusal_mask, x, neg), dim=-1)
    lse_n = torch.logsumexp(torch.where(refusal_mask, neg, x), dim=-1)
    return lse_r - lse_n


def refusal_scores(model, tokenizer, instructions: Sequence[str], refusal_ids: Sequence[int] | None = None,
                   batch_size: int = 32, system_prompt: str | None = None, progress: bool = False) -> torch.Tensor:
    """Refusal score of each prompt: ``log p(R) - log(1 - p(R))`` for the first reply token.

    ``p(R)`` is the next-token probability mass of the refusal tokens ``refusal_ids`` (default
    :func:`chat.refusal_token_ids`) at the last prompt position (Arditi et al. 2024).

    Returns:
        ``[n]`` float64 CPU tensor, in the order of ``instructions``.
    """
    instructions = check_instructions(instructions)
    batch_size = check_batch_size(batch_size)
    if refusal_ids is None:
        refusal_ids = chat.refusal_token_ids(tokenizer)
    out = torch.empty(len(instructions), dtype=torch.float64)
    mask = None
    with torch.inference_mode():
        for idx, batch in _batches(model, tokenizer, instructions, batch_size, system_prompt, progress,
                                   "refusal score"):
            logits = last_logits(model, batch)
            if mask is None:
                mask = refusal_mask(refusal_ids, logits.shape[-1], logits.device)
            out[idx] = refusal_score_from_logits(logits, mask).cpu()
    return out


# --------------------------------------------------------------------------------------------
# KL divergence


def last_token_logprobs(model, tokenizer, instructions: Sequence[str], batch_size: int = 32,
                        system_prompt: str | None = None, progress: bool = False,
                        dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Next-token log-probabilities at the last prompt position: ``[n, vocab]``.

    Args:
        dtype: storage dtype (float64 default; float32 halves the ``n * vocab`` memory and is
            accurate to ~1e-7 relative, ample for KL thresholds such as 0.1).
        device: where the result lives (default: the model's device, where :func:`kl_divergence`
            uses it; pass ``"cpu"`` for many prompts and a large vocabulary).
    """
    instructions = check_instructions(instructions)
    batch_size = check_batch_size(batch_size)
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    device = torch.device(device) if device is not None else get_adapter(model).device
    out = None
    with torch.inference_mode():
        for idx, batch in _batches(model, tokenizer, instructions, batch_size, system_prompt, progress, "logprobs"):
            lp = torch.log_softmax(last_logits(model, batch).to(torch.float64), dim=-1)
            if out is None:
                out = torch.empty((len(instructions), lp.shape[-1]), dtype=dtype, device=device)
            out[torch.as_tensor(idx, device=device)] = lp.to(device=device, dtype=dtype)
    assert out is not None, "instructions is non-empty (check_instructions), so at least one batch ran"
    return out


def kl_from_logprobs(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(P_ref || P) = sum_v p_ref (log p_ref - log p)`` over the last dim: ``[...]`` float64.

    Terms with ``p_ref = 0`` contribute 0; ``p = 0`` where ``p_ref > 0`` gives ``inf``.
    """
    ref = ref_logprobs.to(torch.float64)
    lp = logprobs.to(device=ref.device, dtype=torch.float64)
    p = ref.exp()
    terms = torch.where(p > 0, p * (ref - lp), torch.zeros((), dtype=torch.float64, device=ref.device))
    return terms.sum(-1)


def kl_divergence(model, tokenizer, instructions: Sequence[str], reference: torch.Tensor | None = None,
                  intervention: Callable[[], Any] | None = None, batch_size: int = 32,
                  system_prompt: str | None = None, progress: bool = False, reduction: str = "none") -> torch.Tensor:
    """KL divergence ``KL(P_ref || P_model)`` of the last-position next-token distribution.

    Either pass ``reference`` (``[n, vocab]`` log-probs from :func:`last_token_logprobs` of the
    unmodified model) and call this inside the intervention context::

        ref = last_token_logprobs(model, tok, prompts)
        with ablate(model, direction):
            kl = kl_divergence(model, tok, prompts, reference=ref)

    or pass ``intervention``, a zero-argument callable returning a context manager (e.g.
    ``lambda: ablate(model, direction)``): the reference is then computed first without it.

    Returns:
        ``[n]`` float64 CPU tensor of per-prompt KL (``reduction="none"``), or its mean as a
        0-d tensor (``reduction="mean"``).
    """
    instructions = check_instructions(instructions)
    batch_size = check_batch_size(batch_size)
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    if reference is None and intervention is None:
        raise ValueError(
            "kl_divergence needs reference= (log-probs of the unmodified model, from last_token_logprobs) "
            "or intervention= (a callable returning the intervention's context manager)"
        )
    if reference is not None and intervention is not None:
        raise ValueError("pass either reference= or intervention=, not both")
    if reference is None:
        assert intervention is not None  # one of the two is given (checked above)
        reference = last_token_logprobs(model, tokenizer, instructions, batch_size, system_prompt, progress)
        ctx = intervention()
    else:
        if not isinstance(reference, torch.Tensor) or reference.dim() != 2:
            got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            raise ValueError(f"reference must be a [n, vocab] tensor of log-probs, got {got}")
        if reference.shape[0] != len(instructions):
            raise ValueError(f"reference has {reference.shape[0]} rows but there are {len(instructions)} instructions")
        ctx = nullcontext()
    out = torch.empty(len(instructions), dtype=torch.float64)
    with ctx, torch.inference_mode():
        for idx, batch in _batches(model, tokenizer, instructions, batch_size, system_prompt, progress, "KL"):
            lp = torch.log_softmax(last_logits(model, batch).to(torch.float64), dim=-1)
            if lp.shape[-1] != reference.shape[-1]:
                raise ValueError(f"reference has vocab {reference.shape[-1]} "
                                 f"but the model's logits have {lp.shape[-1]}")
            ref = reference[torch.as_tensor(idx, device=reference.device)].to(lp.device)
            out[idx] = kl_from_logprobs(ref, lp).cpu()
    return out.mean() if reduction == "mean" else out


# --------------------------------------------------------------------------------------------
# generation


def generate_completions(model, tokenizer, instructions: Sequence[str], max_new_tokens: int = 64,
                         batch_size: int = 32, system_prompt: str | None = None, progress: bool = True,
                         **generate_kwargs) -> list[str]:
    """Greedy completions (``do_sample=False``) of each instruction, in input order.

    Batches are length-bucketed and left-padded; only the new text is returned (special tokens
    skipped, except a reasoning format's markers: see :func:`chat.decode_completions`). Works
    under any intervention context (hooks stay active during ``generate``).
    Extra ``generate_kwargs`` go to ``model.generate`` (e.g. ``repetition_penalty``).
    """
    instructions = check_instructions(instructions)
    batch_size = check_batch_size(batch_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if "do_sample" in generate_kwargs and generate_kwargs["do_sample"]:
        raise ValueError("generate_completions is greedy; do_sample=True is not supported")
    generate_kwargs.pop("do_sample", None)
    out: list[str | None] = [None] * len(instructions)
    gen_cfg = _greedy_config(model, tokenizer, max_new_tokens)
    fmt = chat.reasoning_format(tokenizer)  # keep its markers (harmony's are special tokens) for split_reasoning
    with torch.inference_mode():
        for idx, batch in _batches(model, tokenizer, instructions, batch_size, system_prompt, progress, "generate",
                                   new_tokens=max_new_tokens):
            batch.pop("position_ids")  # generate derives them from the attention mask at every step
            seq = model.generate(**batch, generation_config=gen_cfg, **generate_kwargs)
            new = seq[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, chat.decode_completions(tokenizer, new, fmt)):
                out[i] = text
    return out  # type: ignore[return-value]


def _greedy_config(model, tokenizer, max_new_tokens: int):
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.do_sample = False
    cfg.num_beams = 1
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.min_new_tokens = None
    for k in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(cfg, k):
            setattr(cfg, k, None)
    if cfg.pad_token_id is None:
        cfg.pad_token_id = chat.pad_token_id(tokenizer)
    if cfg.eos_token_id is None and tokenizer.eos_token_id is not None:
        cfg.eos_token_id = tokenizer.eos_token_id
    return cfg


# --------------------------------------------------------------------------------------------
# metrics


def _classifiers(classifier: Any) -> list:
    if classifier is None:
        return [SubstringRefusalClassifier()]
    items = list(classifier) if isinstance(classifier, (list, tuple)) else [classifier]
    if not items:
        raise ValueError("classifier list is empty")
    return [as_classifier(c) for c in items]


def _names(classifiers: list) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for c in classifiers:
        n = str(getattr(c, "name", type(c).__name__))
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return names


def refusal_rate(completions: Sequence[str], classifier: Any = None) -> float:
    """Fraction of ``completions`` classified as refusals (default: substring classifier)."""
    completions = check_instructions(completions, "completions")
    clf = _classifiers(classifier)[0]
    verdicts = clf.classify_many(completions)
    return sum(v.refused for v in verdicts) / len(verdicts)


def evaluate_prompts(model, tokenizer, instructions: Sequence[str], categories: Sequence[str | None] | None = None,
                     classifier: Any = None, max_new_tokens: int = 64, batch_size: int = 32,
                     system_prompt: str | None = None, refusal_ids: Sequence[int] | None = None,
                     compute_scores: bool = True, progress: bool = True, reasoning: str = "answer") -> dict:
    """Generate, classify and score a prompt set; returns a JSON-serialisable dict.

    Args:
        categories: one category (or None) per instruction, for per-category rates.
        classifier: a classifier, a judge function ``list[str] -> list[bool]``, or a list of
            them (the first is primary: it defines ``refusal_rate``); default substring.
        compute_scores: also compute the refusal score of each prompt (one extra forward pass).
        reasoning: for tokenizers whose template has a reasoning block (:func:`chat.reasoning_format`):
            ``"answer"`` (default) classifies only the answer after the block (a refusal after the
            reasoning counts; an unfinished block leaves an empty answer); ``"close"`` prompts with an
            empty, closed block (:func:`chat.close_reasoning`, ``enable_thinking=False``) so the model
            answers at once and the refusal score is that of the answer's first token; ``"full"``
            classifies the whole completion. Without a reasoning format all three are the same.

    Returns:
        ``{"n", "classifier", "refusal_rate", "rates": {name: rate}, "mean_refusal_score",
        "per_category": {cat: {"n", "refusal_rate", "rates", "mean_refusal_score"}}, "settings",
        "records": [{"instruction", "category", "completion", "refused", "matched",
        "verdicts": {name: {"refused", "matched", "span"}}, "refusal_score"}]}``; with a
        reasoning format each record also has ``"reasoning"`` and ``"answer"``. Prompts without
        a category are left out of ``per_category``.
    """
    instructions = check_instructions(instructions)
    if categories is not None:
        if isinstance(categories, str) or not isinstance(categories, Sequence):
            raise TypeError("categories must be a list (one category or None per instruction)")
        categories = list(categories)
        if len(categories) != len(instructions):
            raise ValueError(f"{len(categories)} categories for {len(instructions)} instructions")
        for c in categories:
            if c is not None and not isinstance(c, str):
                raise TypeError(f"categories must be str or None, got {type(c).__name__}")
    else:
        categories = [None] * len(instructions)
    clfs = _classifiers(classifier)
    names = _names(clfs)
    if reasoning not in ("answer", "close", "full"):
        raise ValueError(f"reasoning must be 'answer', 'close' or 'full', got {reasoning!r}")
    fmt = chat.reasoning_format(tokenizer)
    if fmt is not None and reasoning == "close":
        tokenizer = chat.close_reasoning(tokenizer, fmt)
    opened = fmt is not None and chat.prompt_opens_reasoning(tokenizer, system_prompt, fmt)
    completions = generate_completions(model, tokenizer, instructions, max_new_tokens, batch_size,
                                       system_prompt, progress)
    split = [chat.split_reasoning(c, fmt, opened) if fmt is not None and reasoning != "full" else None
             for c in completions]
    judged = [c if sp is None else sp[1] for c, sp in zip(completions, split)]
    verdicts = {n: c.classify_many(judged, instructions) for n, c in zip(names, clfs)}
    scores = None
    if compute_scores:
        scores = refusal_scores(model, tokenizer, instructions, refusal_ids, batch_size, system_prompt).tolist()
    records = []
    for i, (inst, cat, comp) in enumerate(zip(instructions, categories, completions)):
        v0 = verdicts[names[0]][i]
        rec = {
            "instruction": inst, "category": cat, "completion": comp,
            "refused": v0.refused, "matched": v0.matched,
            "verdicts": {n: verdicts[n][i].to_dict() for n in names},
            "refusal_score": None if scores is None else scores[i],
        }
        parts = split[i]
        if parts is not None:
            rec["reasoning"], rec["answer"] = parts
        records.append(rec)

    def summary(rows: list[int]) -> dict:
        rates = {n: sum(verdicts[n][i].refused for i in rows) / len(rows) for n in names}
        s = None if scores is None else sum(scores[i] for i in rows) / len(rows)
        return {"n": len(rows), "refusal_rate": rates[names[0]], "rates": rates, "mean_refusal_score": s}

    per_cat: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        if c is not None:
            per_cat.setdefault(c, []).append(i)
    overall = summary(list(range(len(instructions))))
    return {
        "n": overall["n"], "classifier": names[0], "refusal_rate": overall["refusal_rate"], "rates": overall["rates"],
        "mean_refusal_score": overall["mean_refusal_score"],
        "per_category": {c: summary(rows) for c, rows in sorted(per_cat.items())},
        "settings": {
            "max_new_tokens": max_new_tokens, "system_prompt": system_prompt, "batch_size": batch_size,
            "reasoning": None if fmt is None else {"format": fmt.name, "mode": reasoning, "prompt_opens": opened},
            "classifiers": {n: repr(c) for n, c in zip(names, clfs)},
            "refusal_ids": None if not compute_scores else
            [int(t) for t in (refusal_ids if refusal_ids is not None else chat.refusal_token_ids(tokenizer))],
        },
        "records": records,
    }


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as strict JSON (NaN -> null, tensors / arrays as lists), atomically, creating parent folders.

    Kept for existing callers; it is :func:`refusal_fast.artifacts.write_json` with the arguments swapped.
    """
    from .artifacts import write_json

    return write_json(path, obj, indent=2)
