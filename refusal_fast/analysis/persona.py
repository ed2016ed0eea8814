"""Persona experiments: "refusal lives downstream of persona".

1. :func:`persona_direction`: mean last-prompt-token activation (every layer) under compliant-persona
   system prompts minus under refusing-persona system prompts, over the same instructions.
2. :func:`steering_sweep`: add the (unit) persona direction at one layer with strength ``alpha``;
   refusal on harmful prompts and degeneration, over layers x alphas.
3. :func:`refusal_readd`: while steering, add the refusal direction back at a later layer.
4. :func:`window_knockout`: while steering, project the persona direction out in a layer window
   (late vs earlier windows) beside a seeded random direction.

Thin layer over :func:`refusal_fast.extract.extract_means`, :func:`refusal_fast.interventions.steer`
/ ``add`` / ``ablate`` and :mod:`refusal_fast.evaluate`.

Steering strength: with ``norm_match=True`` ``alpha`` is a fraction of each token's residual norm
(``steer(norm_match=True)``); otherwise with ``alpha_unit="direction"`` (default) the added vector
has norm ``alpha * |persona direction at that layer|`` (alpha = 1 moves the activation by the mean
difference between the two persona sets), and with ``alpha_unit="raw"`` norm ``alpha``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import load_tensors, read_json, save_tensors
from ..fingerprint import check_identity
from ._common import (  # noqa: F401  (re-exported)
    EvalConfig,
    JSONResult,
    as_prompt_dict,
    degeneration_rate,
    degeneration_stats,
    derive_seed,
    measure,
    nan_array,
    random_like,
    zero_noise,
)

__all__ = [
    "DEFAULT_PERSONA_PROMPTS", "load_persona_prompts", "PersonaDirection", "persona_direction",
    "SteeringSweepResult", "steering_sweep", "ReaddResult", "refusal_readd", "KnockoutResult",
    "window_knockout", "default_windows", "degeneration_rate", "degeneration_stats",
]

DEFAULT_PERSONA_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "persona_prompts.json"
_ALPHA_UNITS = ("direction", "raw")
_KIND = "refusal_fast.persona_direction"


def load_persona_prompts(path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """``(compliant, refusing)`` system prompts from a JSON file ``{"compliant": [...], "refusing": [...]}``
    (default: the shipped set, 8 of each)."""
    path = Path(path) if path is not None else DEFAULT_PERSONA_PROMPTS
    if not path.is_file():
        raise FileNotFoundError(f"persona prompt file not found: {path}")
    d = read_json(path, "persona prompt file")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object with 'compliant' and 'refusing' lists")
    out = []
    for key in ("compliant", "refusing"):
        v = d.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
            raise ValueError(f"{path}: '{key}' must be a non-empty list of non-empty strings")
        out.append(list(v))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# direction


@dataclasses.dataclass
class PersonaDirection(JSONResult):
    """Compliant-minus-refusing persona direction at every layer.

    Attributes:
        layers: layers (residual at the input of block ``l``).
        position: token position read (-1 = last prompt token).
        directions: ``[n_layers, d_model]`` float64 ``mean(compliant) - mean(refusing)``, each side
            the average over its persona prompts of the mean over instructions.
        norms: ``[n_layers]`` norms of ``directions`` (0 at layer 0: the last token is shared).
        prompt_agreement: ``[n_compliant + n_refusing, n_layers]`` cosine between each persona
            prompt's own difference (its mean minus the other side's mean, sign so that it
            points compliant-ward) and the direction: how consistently the prompts agree.
        compliant_prompts / refusing_prompts: the system prompts used.
        n_instructions: instructions per persona prompt.
        model: identity of the model the direction comes from
            (:func:`refusal_fast.fingerprint.model_identity`, with its weights fingerprint).
    """

    layers: list[int]
    position: int
    directions: Any
    norms: Any
    prompt_agreement: Any
    compliant_prompts: list[str]
    refusing_prompts: list[str]
    n_instructions: int
    model: dict | None = None

    _json_exclude = ("directions",)

    def vector(self, layer: int) -> torch.Tensor:
        """Raw ``[d_model]`` direction at ``layer``."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} not in the persona direction's layers {self.layers}")
        return torch.as_tensor(self.directions[self.layers.index(layer)], dtype=torch.float64).clone()

    def unit(self, layer: int) -> torch.Tensor:
        """Unit ``[d_model]`` direction at ``layer`` (ValueError if it is zero there)."""
        v = self.vector(layer)
        n = torch.linalg.vector_norm(v)
        if n == 0:
            raise ValueError(f"the persona direction is zero at layer {layer} (e.g. layer 0 at the last "
                             f"token, which all prompts share); choose another layer")
        return v / n

    def nonzero_layers(self) -> list[int]:
        return [l for l, n in zip(self.layers, self.norms) if float(n) > 0]

    def save(self, path: str | Path) -> Path:
        """Write ``directions`` to ``path`` (safetensors, checksummed; the rest as JSON in the header and beside it)."""
        return save_tensors(path, {"directions": torch.as_tensor(self.directions)}, self.to_dict(), kind=_KIND,
                            version=1)

    @classmethod
    def load(cls, path: str | Path, model=None, allow_other_weights: bool = False) -> PersonaDirection:
        """Read and verify what :meth:`save` wrote; with ``model``, check it is the model it came from."""
        tensors, meta = load_tensors(path, kind=_KIND, max_version=1, what="persona direction")
        obj = cls.from_dict(meta)
        obj.directions = tensors["directions"]
        if model is not None:
            check_identity(obj.model, model, what="this persona direction was computed from",
                           allow_other_weights=allow_other_weights)
        return obj


def persona_direction(model, tokenizer, instructions: Sequence[str], compliant: Sequence[str] | None = None,
                      refusing: Sequence[str] | None = None, *, position: int = -1, batch_size: int = 32,
                      progress: bool = False) -> PersonaDirection:
    """Persona direction from one :func:`~refusal_fast.extract.extract_means` pass per persona prompt.

    Args:
        instructions: user instructions rendered under every persona system prompt.
        compliant, refusing: system prompts (default: :func:`load_persona_prompts`).
        position: token offset read (default -1, the last prompt token).

    Returns:
        :class:`PersonaDirection` with ``directions`` ``[n_layers, d_model]``.
    """
    from ..extract import extract_means

    instructions = as_prompt_dict(instructions, "instructions")["instructions"]
    if compliant is None or refusing is None:
        dc, dr = load_persona_prompts()
        compliant = dc if compliant is None else compliant
        refusing = dr if refusing is None else refusing
    compliant = as_prompt_dict(compliant, "compliant")["compliant"]
    refusing = as_prompt_dict(refusing, "refusing")["refusing"]
    if isinstance(position, bool) or not isinstance(position, int) or position >= 0:
        raise ValueError(f"position must be a negative int, got {position!r}")
    per_prompt = []
    layers: list[int] = []  # set by the loop below (compliant and refusing are non-empty)
    identity: dict | None = None
    for sp in list(compliant) + list(refusing):
        m = extract_means(model, tokenizer, {"x": instructions}, positions=[position], batch_size=batch_size,
                          system_prompt=sp, progress=progress)
        layers = list(m.layers)
        identity = m.metadata.get("model")
        per_prompt.append(m.mean("x")[:, 0])                           # [L, d]
    pp = torch.stack(per_prompt)                                       # [P, L, d]
    nc = len(compliant)
    mc, mr = pp[:nc].mean(0), pp[nc:].mean(0)
    dirs = zero_noise(mc - mr, mr)
    own = torch.cat([pp[:nc] - mr, mc - pp[nc:]])                     # [P, L, d], compliant-ward
    num = (own * dirs).sum(-1)
    den = torch.linalg.vector_norm(own, dim=-1) * torch.linalg.vector_norm(dirs, dim=-1)
    agree = torch.where(den > 0, num / den.where(den > 0, torch.ones_like(den)), torch.full_like(den, float("nan")))
    return PersonaDirection(layers=layers, position=position, directions=dirs,
                            norms=torch.linalg.vector_norm(dirs, dim=-1).numpy(), prompt_agreement=agree.numpy(),
                            compliant_prompts=list(compliant), refusing_prompts=list(refusing),
                            n_instructions=len(instructions), model=identity)


# --------------------------------------------------------------------------------------------
# steering


def _check_mode(norm_match: bool, alpha_unit: str) -> None:
    if alpha_unit not in _ALPHA_UNITS:
        raise ValueError(f"alpha_unit must be one of {_ALPHA_UNITS}, got {alpha_unit!r}")
    if not isinstance(norm_match, bool):
        raise TypeError(f"norm_match must be a bool, got {norm_match!r}")


def _effective_alpha(persona: PersonaDirection, layer: int, alpha: float, norm_match: bool, alpha_unit: str) -> float:
    if norm_match or alpha_unit == "raw":
        return float(alpha)
    return float(alpha) * float(torch.linalg.vector_norm(persona.vector(layer)))


@contextlib.contextmanager
def _steering(model, persona: PersonaDirection, layer: int, alpha: float, norm_match: bool, alpha_unit: str):
    from ..interventions import steer

    with steer(model, persona.unit(layer), layers=[layer], norm_match=norm_match,
               alpha=_effective_alpha(persona, layer, alpha, norm_match, alpha_unit)):
        yield


def _as_floats(xs, what: str) -> list[float]:
    try:
        out = [float(x) for x in xs]
    except TypeError:
        raise TypeError(f"{what} must be a sequence of numbers") from None
    if not out or not all(np.isfinite(out)):
        raise ValueError(f"{what} must be a non-empty sequence of finite numbers, got {xs!r}")
    return out


def _check_layer(persona: PersonaDirection, layer: Any, what: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {layer!r}")
    n = len(persona.layers)
    layer = int(layer) % n if -n <= int(layer) < n else int(layer)
    if layer not in persona.layers:
        raise ValueError(f"{what} {layer} out of range (layers {persona.layers[0]}..{persona.layers[-1]})")
    return layer


def _measure1(model, tokenizer, prompts: list[str], cfg: EvalConfig) -> dict:
    return measure(model, tokenizer, {"p": prompts}, cfg)["p"]


@dataclasses.dataclass
class SteeringSweepResult(JSONResult):
    """Refusal on harmful prompts while steering along the persona direction.

    Attributes:
        layers, alphas: the sweep axes.
        norm_match, alpha_unit: how ``alphas`` are scaled (see the module docstring).
        effective_alpha: ``[n_layers, n_alphas]`` the ``alpha`` passed to ``steer``.
        baseline_score / baseline_rate / baseline_degeneration: no intervention.
        refusal_score: ``[n_layers, n_alphas]`` mean refusal score.
        refusal_rate / degeneration: ``[n_layers, n_alphas]`` classifier refusal rate and
            degenerate-output rate (:func:`degeneration_rate`) with generation, else None.
    """

    layers: list[int]
    alphas: list[float]
    norm_match: bool
    alpha_unit: str
    effective_alpha: Any
    baseline_score: float
    baseline_rate: float | None
    baseline_degeneration: float | None
    refusal_score: Any
    refusal_rate: Any
    degeneration: Any
    n_prompts: int
    eval_config: dict


def steering_sweep(model, tokenizer, persona: PersonaDirection, harmful: Sequence[str],
                   layers: Sequence[int] | None = None, alphas: Sequence[float] | None = None, *,
                   norm_match: bool = False, alpha_unit: str = "direction",
                   cfg: EvalConfig | None = None) -> SteeringSweepResult:
    """Steer with the unit persona direction of each layer in ``layers`` (default: every layer
    where it is non-zero) at each ``alpha`` (default ``(0.5, 1, 2, 4)``, or ``(0.1, 0.25, 0.5, 1)``
    with ``norm_match``), one layer at a time; measure refusal (and degeneration with
    ``cfg.generate``) on ``harmful``. Cost: ``1 + n_layers * n_alphas`` evaluations."""
    cfg = cfg or EvalConfig()
    _check_mode(norm_match, alpha_unit)
    harmful = as_prompt_dict(harmful, "harmful")["harmful"]
    layers = persona.nonzero_layers() if layers is None else [_check_layer(persona, l, "layer") for l in layers]
    if not layers:
        raise ValueError("no layer to steer at")
    if alphas is None:
        alphas = (0.1, 0.25, 0.5, 1.0) if norm_match else (0.5, 1.0, 2.0, 4.0)
    alphas = _as_floats(alphas, "alphas")
    base = _measure1(model, tokenizer, harmful, cfg)
    shape = (len(layers), len(alphas))
    score, rate, degen, eff = nan_array(*shape), nan_array(*shape), nan_array(*shape), nan_array(*shape)
    for i, layer in enumerate(layers):
        persona.unit(layer)  # clear error for a zero direction before any work
        for j, a in enumerate(alphas):
            eff[i, j] = _effective_alpha(persona, layer, a, norm_match, alpha_unit)
            with _steering(model, persona, layer, a, norm_match, alpha_unit):
                r = _measure1(model, tokenizer, harmful, cfg)
            score[i, j] = r["score"]
            if cfg.generate:
                rate[i, j], degen[i, j] = r["rate"], r["degeneration"]
    return SteeringSweepResult(
        layers=layers, alphas=alphas, norm_match=norm_match, alpha_unit=alpha_unit, effective_alpha=eff,
        baseline_score=base["score"], baseline_rate=base["rate"], baseline_degeneration=base["degeneration"],
        refusal_score=score, refusal_rate=rate if cfg.generate else None,
        degeneration=degen if cfg.generate else None, n_prompts=len(harmful), eval_config=cfg.summary())


# --------------------------------------------------------------------------------------------
# late refusal re-add


def _recovered(score, steered: float, baseline: float):
    gap = baseline - steered
    if not np.isfinite(gap) or abs(gap) < 1e-9:
        return np.full_like(np.asarray(score, dtype=float), np.nan)
    return (np.asarray(score, dtype=float) - steered) / gap


@dataclasses.dataclass
class ReaddResult(JSONResult):
    """Refusal recovered by adding the refusal direction at a later layer while steering.

    Attributes:
        steer_layer, alpha, norm_match, alpha_unit: the steering applied throughout.
        add_layers, add_scales: re-add grid; the vector added at layer ``l`` is
            ``scale * refusal_direction[l]`` (or the single ``[d_model]`` direction, raw, not normalised).
        baseline_score: no intervention; steered_score: steering only.
        refusal_score: ``[n_add_layers, n_scales]`` steering + re-add.
        random_score / random_score_std: same with seeded random vectors of the same norm.
        recovered / random_recovered: ``(score - steered) / (baseline - steered)`` (NaN if steering changed nothing).
        *_rate: classifier rates with generation, else None.
    """

    steer_layer: int
    alpha: float
    norm_match: bool
    alpha_unit: str
    add_layers: list[int]
    add_scales: list[float]
    refusal_norms: list[float]
    baseline_score: float
    steered_score: float
    refusal_score: Any
    random_score: Any
    random_score_std: Any
    recovered: Any
    random_recovered: Any
    baseline_rate: float | None
    steered_rate: float | None
    refusal_rate: Any
    random_rate: Any
    n_random: int
    seed: int
    n_prompts: int
    eval_config: dict


def _later_layers(persona: PersonaDirection, steer_layer: int, n: int) -> list[int]:
    last = persona.layers[-1]
    if steer_layer >= last:
        raise ValueError(f"steer_layer {steer_layer} is the last layer; there is no later layer")
    k = min(n, last - steer_layer)
    return sorted({int(round(x)) for x in np.linspace(steer_layer + 1, last, k)})


def refusal_readd(model, tokenizer, persona: PersonaDirection, refusal_direction: torch.Tensor,
                  harmful: Sequence[str], steer_layer: int, alpha: float, *, add_layers: Sequence[int] | None = None,
                  add_scales: Sequence[float] = (1.0,), norm_match: bool = False, alpha_unit: str = "direction",
                  n_random: int = 1, seed: int = 0, cfg: EvalConfig | None = None) -> ReaddResult:
    """While steering (persona direction at ``steer_layer``, strength ``alpha``), add
    ``scale * refusal_direction`` at the input of a later layer and measure how much refusal
    returns, beside seeded random vectors of the same norm.

    Args:
        refusal_direction: ``[d_model]`` (e.g. the selected difference-in-means vector, added at
            its natural scale) or ``[n_layers, d_model]`` (row ``l`` added at layer ``l``).
        add_layers: default up to 4 layers evenly spaced after ``steer_layer``.
    """
    from ..interventions import add

    cfg = cfg or EvalConfig()
    _check_mode(norm_match, alpha_unit)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be an int >= 1, got {n_random!r}")
    harmful = as_prompt_dict(harmful, "harmful")["harmful"]
    steer_layer = _check_layer(persona, steer_layer, "steer_layer")
    alpha = _as_floats([alpha], "alpha")[0]
    rd = torch.as_tensor(refusal_direction).detach().to("cpu", torch.float64)
    if rd.dim() not in (1, 2) or (rd.dim() == 2 and rd.shape[0] != len(persona.layers)):
        raise ValueError(f"refusal_direction must be [d_model] or [n_layers={len(persona.layers)}, d_model], "
                         f"got shape {tuple(rd.shape)}")
    add_layers = (_later_layers(persona, steer_layer, 4) if add_layers is None
                  else [_check_layer(persona, l, "add layer") for l in add_layers])
    scales = _as_floats(add_scales, "add_scales")

    def vec(layer: int) -> torch.Tensor:
        return rd if rd.dim() == 1 else rd[persona.layers.index(layer)]

    base = _measure1(model, tokenizer, harmful, cfg)
    shape = (len(add_layers), len(scales))
    score, rate = nan_array(*shape), nan_array(*shape)
    rnd, rnd_rate = nan_array(len(add_layers), len(scales), n_random), nan_array(len(add_layers), len(scales), n_random)
    with _steering(model, persona, steer_layer, alpha, norm_match, alpha_unit):
        steered = _measure1(model, tokenizer, harmful, cfg)
        for i, layer in enumerate(add_layers):
            v = vec(layer)
            for j, s in enumerate(scales):
                with add(model, v, layers=[layer], alpha=s):
                    r = _measure1(model, tokenizer, harmful, cfg)
                score[i, j], rate[i, j] = r["score"], r["rate"] if cfg.generate else np.nan
                for k in range(n_random):
                    rv = random_like(v, derive_seed(seed, 4, layer, k))
                    with add(model, rv, layers=[layer], alpha=s):
                        r = _measure1(model, tokenizer, harmful, cfg)
                    rnd[i, j, k], rnd_rate[i, j, k] = r["score"], r["rate"] if cfg.generate else np.nan
    rs = rnd.mean(-1)
    gen = cfg.generate
    return ReaddResult(
        steer_layer=steer_layer, alpha=alpha, norm_match=norm_match, alpha_unit=alpha_unit, add_layers=add_layers,
        add_scales=scales, refusal_norms=[float(torch.linalg.vector_norm(vec(l))) for l in add_layers],
        baseline_score=base["score"], steered_score=steered["score"], refusal_score=score, random_score=rs,
        random_score_std=rnd.std(-1), recovered=_recovered(score, steered["score"], base["score"]),
        random_recovered=_recovered(rs, steered["score"], base["score"]),
        baseline_rate=base["rate"], steered_rate=steered["rate"], refusal_rate=rate if gen else None,
        random_rate=rnd_rate.mean(-1) if gen else None, n_random=n_random, seed=seed, n_prompts=len(harmful),
        eval_config=cfg.summary())


# --------------------------------------------------------------------------------------------
# window knockout


def default_windows(n_layers: int, steer_layer: int, width: int | None = None) -> list[list[int]]:
    """Contiguous windows of ``width`` (default ``max(1, round(n_layers / 3))``) layers after
    ``steer_layer``, tiled back from the last layer: the last one is the model's last ``width``
    layers ("late"), earlier ones are clipped at ``steer_layer + 1``. Earliest first."""
    if steer_layer >= n_layers - 1:
        raise ValueError(f"steer_layer {steer_layer} leaves no layer after it (model has {n_layers} layers)")
    width = max(1, round(n_layers / 3)) if width is None else int(width)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    out, end = [], n_layers
    while end > steer_layer + 1:
        start = max(steer_layer + 1, end - width)
        out.append(list(range(start, end)))
        end = start
    return out[::-1]


@dataclasses.dataclass
class KnockoutResult(JSONResult):
    """Steering with the persona direction projected out in layer windows.

    Attributes:
        windows / labels: layer windows (earliest first) and their labels ("layers a-b").
        basis: ``"layer"`` (each window layer's own persona direction) or ``"steer"`` (the steering vector).
        baseline_score: no intervention; steered_score: steering only.
        knockout_score: ``[n_windows]`` steering + persona knockout in the window.
        random_score / random_score_std: ``[n_windows]`` steering + knockout of seeded random unit
            directions (``n_random`` draws).
        knockout_only_score: ``[n_windows]`` persona knockout without steering (control).
        restored / random_restored: ``(score - steered) / (baseline - steered)``.
        *_rate: classifier rates with generation, else None.
    """

    steer_layer: int
    alpha: float
    norm_match: bool
    alpha_unit: str
    basis: str
    windows: list[list[int]]
    labels: list[str]
    baseline_score: float
    steered_score: float
    knockout_score: Any
    random_score: Any
    random_score_std: Any
    knockout_only_score: Any
    restored: Any
    random_restored: Any
    baseline_rate: float | None
    steered_rate: float | None
    knockout_rate: Any
    random_rate: Any
    n_random: int
    seed: int
    n_prompts: int
    eval_config: dict


@contextlib.contextmanager
def _knockout(model, vectors: dict[int, torch.Tensor]):
    """Ablate ``vectors[l]`` at layer ``l`` for each key (one ``ablate`` context per distinct vector)."""
    from ..interventions import ablate

    with contextlib.ExitStack() as stack:
        for layer, v in vectors.items():
            stack.enter_context(ablate(model, v, layers=[layer]))
        yield


def window_knockout(model, tokenizer, persona: PersonaDirection, harmful: Sequence[str], steer_layer: int,
                    alpha: float, *, windows: Sequence[Sequence[int]] | None = None, basis: str = "layer",
                    norm_match: bool = False, alpha_unit: str = "direction", n_random: int = 3, seed: int = 0,
                    cfg: EvalConfig | None = None) -> KnockoutResult:
    """While steering, project the persona direction out of a layer window (block inputs and
    attention/MLP outputs, via :func:`~refusal_fast.interventions.ablate`) and measure refusal;
    compare windows (default :func:`default_windows`: late third vs earlier ones) and seeded random
    unit directions knocked out in the same window.

    Args:
        basis: ``"layer"``: at each window layer ablate that layer's persona direction; ``"steer"``:
            ablate the steering vector (persona direction at ``steer_layer``) throughout the window.
    """
    cfg = cfg or EvalConfig()
    _check_mode(norm_match, alpha_unit)
    if basis not in ("layer", "steer"):
        raise ValueError(f'basis must be "layer" or "steer", got {basis!r}')
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be an int >= 1, got {n_random!r}")
    harmful = as_prompt_dict(harmful, "harmful")["harmful"]
    steer_layer = _check_layer(persona, steer_layer, "steer_layer")
    alpha = _as_floats([alpha], "alpha")[0]
    if windows is None:
        windows = default_windows(len(persona.layers), steer_layer)
    wins = [[_check_layer(persona, l, "window layer") for l in w] for w in windows]
    if not wins or any(not w for w in wins):
        raise ValueError("windows must be a non-empty list of non-empty layer lists")
    steer_unit = persona.unit(steer_layer)

    def persona_vecs(w: list[int]) -> dict[int, torch.Tensor]:
        return {l: (persona.unit(l) if basis == "layer" else steer_unit) for l in w}

    def random_vecs(wi: int, w: list[int], r: int) -> dict[int, torch.Tensor]:
        if basis == "steer":
            v = random_like(steer_unit, derive_seed(seed, 5, wi, r))
            return {l: v for l in w}
        return {l: random_like(persona.unit(l), derive_seed(seed, 5, wi, r, l)) for l in w}

    nw = len(wins)
    base = _measure1(model, tokenizer, harmful, cfg)
    ko, ko_rate, ko_only = nan_array(nw), nan_array(nw), nan_array(nw)
    rnd, rnd_rate = nan_array(nw, n_random), nan_array(nw, n_random)
    for wi, w in enumerate(wins):
        with _knockout(model, persona_vecs(w)):
            ko_only[wi] = _measure1(model, tokenizer, harmful, cfg)["score"]
    with _steering(model, persona, steer_layer, alpha, norm_match, alpha_unit):
        steered = _measure1(model, tokenizer, harmful, cfg)
        for wi, w in enumerate(wins):
            with _knockout(model, persona_vecs(w)):
                r = _measure1(model, tokenizer, harmful, cfg)
            ko[wi], ko_rate[wi] = r["score"], r["rate"] if cfg.generate else np.nan
            for k in range(n_random):
                with _knockout(model, random_vecs(wi, w, k)):
                    r = _measure1(model, tokenizer, harmful, cfg)
                rnd[wi, k], rnd_rate[wi, k] = r["score"], r["rate"] if cfg.generate else np.nan
    gen = cfg.generate
    rs = rnd.mean(-1)
    return KnockoutResult(
        steer_layer=steer_layer, alpha=alpha, norm_match=norm_match, alpha_unit=alpha_unit, basis=basis,
        windows=wins, labels=[f"layer {w[0]}" if len(w) == 1 else f"layers {w[0]}-{w[-1]}" for w in wins],
        baseline_score=base["score"], steered_score=steered["score"], knockout_score=ko, random_score=rs,
        random_score_std=rnd.std(-1), knockout_only_score=ko_only,
        restored=_recovered(ko, steered["score"], base["score"]),
        random_restored=_recovered(rs, steered["score"], base["score"]),
        baseline_rate=base["rate"], steered_rate=steered["rate"], knockout_rate=ko_rate if gen else None,
        random_rate=rnd_rate.mean(-1) if gen else None, n_random=n_random, seed=seed, n_prompts=len(harmful),
        eval_config=cfg.summary())
