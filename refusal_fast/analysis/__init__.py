"""Analyses built on the public extraction / intervention / evaluation functions.

- :mod:`.categories`: per-category refusal directions, cosine geometry, PCA, cross-category
  and rank-k subspace ablation (each with a seeded random-direction null).
- :mod:`.persona`: persona direction, steering sweep, late refusal re-add, window knockout.
- :mod:`.outliers`: massive-activation coordinates (match them in random-direction controls).
- :mod:`.plots`: matplotlib (Agg) figures of every result.

Every result is a dataclass with ``to_dict()`` / ``to_json(path)`` (NaN -> null).
"""
from ._common import (
                      EvalConfig,
                      JSONResult,
                      degeneration_rate,
                      degeneration_stats,
                      derive_seed,
                      random_basis,
                      random_like,
)
from .categories import (
                      GLOBAL,
                      CategoryDirections,
                      CosineResult,
                      CrossAblationResult,
                      PCAResult,
                      SubspaceAblationResult,
                      category_directions,
                      category_pca,
                      cosine_similarity,
                      cross_ablation,
                      default_layer,
                      split_prompts,
                      subspace_ablation,
)
from .outliers import MassiveActivations, massive_activation_dims
from .persona import (
                      DEFAULT_PERSONA_PROMPTS,
                      KnockoutResult,
                      PersonaDirection,
                      ReaddResult,
                      SteeringSweepResult,
                      default_windows,
                      load_persona_prompts,
                      persona_direction,
                      refusal_readd,
                      steering_sweep,
                      window_knockout,
)

__all__ = [
    "EvalConfig", "JSONResult", "degeneration_rate", "degeneration_stats", "derive_seed", "random_like",
    "random_basis", "MassiveActivations", "massive_activation_dims",
    "GLOBAL", "CategoryDirections", "CosineResult", "PCAResult", "CrossAblationResult", "SubspaceAblationResult",
    "category_directions", "cosine_similarity", "category_pca", "cross_ablation", "subspace_ablation",
    "default_layer", "split_prompts",
    "DEFAULT_PERSONA_PROMPTS", "load_persona_prompts", "PersonaDirection", "persona_direction",
    "SteeringSweepResult", "steering_sweep", "ReaddResult", "refusal_readd", "KnockoutResult", "window_knockout",
    "default_windows",
]
