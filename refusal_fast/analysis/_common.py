"""Shared pieces of the analyses: JSON-able result dataclasses, seeded random nulls, and one
measurement routine (refusal score, optional generation-based classifier / degeneration rates)
built only on :mod:`refusal_fast.evaluate`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..artifacts import dumps_json, read_json, to_jsonable, write_text

__all__ = [
    "JSONResult", "EvalConfig", "derive_seed", "random_like", "random_basis", "measure",
    "degeneration_rate", "degeneration_stats", "as_prompt_dict",
]


# --------------------------------------------------------------------------------------------
# JSON (the conversion policy and the writing live in refusal_fast.artifacts)


class JSONResult:
    """Mixin for result dataclasses: ``to_dict()`` (plain JSON types, NaN -> null, tensors -> lists),
    ``to_json(path=None)`` (string, also written to ``path``) and ``from_dict`` / ``load_json``
    (arrays come back as nested lists). Fields named in ``_json_exclude`` (large tensors) are left out."""

    _json_exclude: tuple[str, ...] = ()
    if TYPE_CHECKING:  # set by @dataclass on the subclasses (lets dataclasses.fields accept self / cls)
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_dict(self) -> dict:
        out = {"kind": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.name in self._json_exclude:
                continue
            out[f.name] = to_jsonable(getattr(self, f.name))
        return out

    def to_json(self, path: str | Path | None = None, indent: int = 1) -> str:
        """Strict JSON text of :meth:`to_dict`; also written atomically to ``path`` if given."""
        text = dumps_json(self.to_dict(), indent=indent)
        if path is not None:
            write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kw and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        for m in missing:  # excluded (large) fields are not stored
            kw[m] = None
        return cls(**kw)

    @classmethod
    def load_json(cls, path: str | Path):
        return cls.from_dict(read_json(path, f"{cls.__name__} JSON"))


def nan_array(*shape: int) -> np.ndarray:
    return np.full(shape, np.nan)


#: A difference of means smaller than this fraction of the mean activation's norm is rounding
#: noise (e.g. layer 0 at the last token, which every prompt shares) and is set to exactly zero.
ZERO_RTOL = 1e-5


def zero_noise(diff: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Zero the rows of ``diff`` ``[L, ..., d]`` whose norm is <= ``ZERO_RTOL * |reference[L]|``
    (``reference`` ``[L, d]``, the activation mean at the same layer)."""
    ref = torch.linalg.vector_norm(reference, dim=-1)                  # [L]
    n = torch.linalg.vector_norm(diff, dim=-1)                         # [L, ...]
    ref = ref.reshape(ref.shape + (1,) * (n.dim() - 1))
    return torch.where((n <= ZERO_RTOL * ref).unsqueeze(-1), torch.zeros_like(diff), diff)


# --------------------------------------------------------------------------------------------
# random nulls


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``keys`` (independent streams per key)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def random_like(vectors: torch.Tensor, seed: int, match_dims: Sequence[int] | None = None) -> torch.Tensor:
    """Gaussian random directions with the same norm as each row of ``vectors``.

    Args:
        vectors: ``[d]`` or ``[k, d]``.
        seed: generator seed (same seed -> same output).
        match_dims: coordinates copied from ``vectors`` instead of drawn (e.g. the massive-activation
            dims of :func:`refusal_fast.analysis.massive_activation_dims`); the other coordinates
            are a random direction of the remaining norm. ``None``: isotropic.

    Returns:
        float64 tensor with the shape of ``vectors``; row ``i`` has norm ``|vectors[i]|`` (and, with
        ``match_dims``, the same entries there).
    """
    v = torch.as_tensor(vectors).detach().to("cpu", torch.float64)
    if v.dim() not in (1, 2) or v.shape[-1] == 0:
        raise ValueError(f"vectors must be [d] or [k, d] with d > 0, got shape {tuple(v.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(v.shape, generator=g, dtype=torch.float64)
    norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    if match_dims is None:
        return r / torch.linalg.vector_norm(r, dim=-1, keepdim=True) * norms
    d = v.shape[-1]
    idx = sorted({int(i) for i in match_dims})
    if any(not 0 <= i < d for i in idx):
        raise ValueError(f"match_dims must be coordinates in [0, {d}), got {list(match_dims)}")
    if len(idx) >= d:
        raise ValueError("match_dims covers every coordinate: nothing left to randomise")
    keep = torch.zeros(d, dtype=torch.bool)
    keep[idx] = True
    fixed = torch.where(keep, v, torch.zeros_like(v))
    free = torch.where(keep, torch.zeros_like(r), r)
    rest = (norms.square() - fixed.square().sum(-1, keepdim=True)).clamp(min=0).sqrt()
    return fixed + free / torch.linalg.vector_norm(free, dim=-1, keepdim=True) * rest


def random_basis(k: int, d: int, seed: int) -> torch.Tensor:
    """``[k, d]`` float64 orthonormal rows spanning a seeded Gaussian random subspace."""
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= d, got k={k}, d={d}")
    g = torch.Generator().manual_seed(int(seed))
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.T.contiguous()


# --------------------------------------------------------------------------------------------
# degeneration


def _repetition(text: str, n: int) -> float:
    """Fraction of repeated n-grams (words when there are enough, characters otherwise)."""
    words = text.split()
    units: Sequence[str] = words if len(words) >= 2 * n else re.sub(r"\s+", " ", text.strip())
    if len(units) < n + 1:
        return 0.0
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def degeneration_stats(texts: Sequence[str], n: int = 3, threshold: float = 0.5) -> dict[str, float]:
    """Rates of empty and repetitive outputs among ``texts``.

    A text is *empty* when it is blank after stripping whitespace; *repetitive* when more than
    ``threshold`` of its ``n``-grams are repeats (word n-grams, or character n-grams for texts
    with fewer than ``2n`` words, so "!!!!!!!!" and "the the the the the the" both count).
    *degenerate* = empty or repetitive.

    Returns:
        ``{"empty": r, "repetitive": r, "degenerate": r, "n": len(texts)}`` (rates in [0, 1]; NaN for no texts).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts:
        return {"empty": math.nan, "repetitive": math.nan, "degenerate": math.nan, "n": 0}
    empty = [not t.strip() for t in texts]
    rep = [(not e) and _repetition(t, n) > threshold for t, e in zip(texts, empty)]
    m = len(texts)
    return {"empty": sum(empty) / m, "repetitive": sum(rep) / m,
            "degenerate": sum(a or b for a, b in zip(empty, rep)) / m, "n": m}


def degeneration_rate(texts: Sequence[str], n: int = 3, threshold: float = 0.5) -> float:
    """Fraction of ``texts`` that are empty or repetitive (see :func:`degeneration_stats`)."""
    return degeneration_stats(texts, n, threshold)["degenerate"]


# --------------------------------------------------------------------------------------------
# measurement


@dataclasses.dataclass
class EvalConfig:
    """How refusal is measured in the analyses.

    Attributes:
        generate: also generate completions (slow) and report the classifier refusal rate and the
            degeneration rate; otherwise only the refusal score (one forward pass per prompt).
        max_new_tokens: generation length.
        batch_size: prompts per forward pass.
        refusal_ids: refusal token ids for the score (default: :func:`refusal_fast.chat.refusal_token_ids`).
        system_prompt: system prompt rendered into the evaluated prompts.
        classifier: a :mod:`refusal_fast.classify` classifier (``.classify_many``) or a function
            ``list[str] -> list[bool]`` (default :class:`~refusal_fast.classify.SubstringRefusalClassifier`).
        progress: tqdm bars in the underlying evaluation calls.
    """

    generate: bool = False
    max_new_tokens: int = 64
    batch_size: int = 32
    refusal_ids: list[int] | None = None
    system_prompt: str | None = None
    classifier: Any = None
    progress: bool = False

    def summary(self) -> dict:
        return {"generate": self.generate, "max_new_tokens": self.max_new_tokens if self.generate else None,
                "system_prompt": self.system_prompt,
                "classifier": None if not self.generate else type(self._classifier()).__name__}

    def _classifier(self):
        if self.classifier is not None:
            return self.classifier
        from ..classify import SubstringRefusalClassifier

        return SubstringRefusalClassifier()


def _classify(classifier, texts: list[str], prompts: list[str]) -> list[bool]:
    from ..classify import as_classifier

    return [bool(v) for v in as_classifier(classifier).classify_many(texts, prompts)]


def as_prompt_dict(prompts: Sequence[str] | Mapping[str, Sequence[str]], name: str = "prompts") -> dict[str, list[str]]:
    """``{group: [instruction, ...]}`` from a dict or a flat list (one group named ``name``); validated."""
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a list of strings or a dict of lists, not one string")
    d = dict(prompts) if isinstance(prompts, Mapping) else {name: list(prompts)}
    if not d:
        raise ValueError(f"{name} is empty")
    for k, v in d.items():
        if isinstance(v, str) or not all(isinstance(x, str) for x in v):
            raise TypeError(f"{name}[{k!r}] must be a list of strings")
        if len(v) == 0:
            raise ValueError(f"{name}[{k!r}] has no prompts")
    return {str(k): list(v) for k, v in d.items()}


def measure(model, tokenizer, groups: Mapping[str, Sequence[str]],
            cfg: EvalConfig) -> dict[str, dict[str, float | None]]:
    """Mean refusal score (and with ``cfg.generate`` the classifier refusal rate and degeneration
    rate) of each prompt group under whatever interventions are active on ``model``.

    All groups are scored in one :func:`refusal_fast.evaluate.refusal_scores` call (one
    :func:`~refusal_fast.evaluate.generate_completions` call when generating).

    Returns:
        ``{group: {"score": float, "rate": float|None, "degeneration": float|None, "n": int}}``.
    """
    from ..evaluate import generate_completions, refusal_scores

    names = list(groups)
    flat = [p for g in names for p in groups[g]]
    bounds = np.cumsum([0] + [len(groups[g]) for g in names])
    scores = refusal_scores(model, tokenizer, flat, refusal_ids=cfg.refusal_ids, batch_size=cfg.batch_size,
                            system_prompt=cfg.system_prompt, progress=cfg.progress)
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    texts = None
    refused = None
    if cfg.generate:
        texts = generate_completions(model, tokenizer, flat, max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.batch_size, system_prompt=cfg.system_prompt,
                                     progress=cfg.progress)
        refused = _classify(cfg._classifier(), list(texts), flat)
    out = {}
    for i, g in enumerate(names):
        a, b = int(bounds[i]), int(bounds[i + 1])
        res = {"score": float(scores[a:b].mean()), "rate": None, "degeneration": None, "n": b - a}
        if texts is not None and refused is not None:  # both set when cfg.generate
            res["rate"] = sum(refused[a:b]) / (b - a)
            res["degeneration"] = degeneration_rate(texts[a:b])
        out[g] = res
    return out
