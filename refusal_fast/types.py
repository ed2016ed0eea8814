"""Type aliases for what the public functions accept (used in signatures only; the functions
themselves validate their input and raise clear errors)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

import numpy as np
import torch

__all__ = ["VectorLike", "BasisLike", "BasesLike", "MeanLike", "LayersLike", "PositionsLike", "IndexLike"]

#: One direction ``[d_model]``: a tensor (any dtype / device), numpy array or list of numbers.
VectorLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float]
#: One direction ``[d_model]`` or a subspace basis ``[k, d_model]``.
BasisLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]
#: Several bases ``[m, k, d_model]`` (or ``[m, d_model]``: one direction each).
BasesLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]]
#: Affine-ablation target ``[d_model]``, ``[len(layers), d_model]`` or ``{layer: [d_model]}``; None: zero.
MeanLike: TypeAlias = BasisLike | Mapping[int, VectorLike] | None
#: Block indices: None (all blocks), one int or an iterable such as ``range(20, 28)``; negatives count from the end.
LayersLike: TypeAlias = int | Iterable[int] | None
#: Negative token offsets from the end of the prompt: None (the default), one int or an iterable of them.
PositionsLike: TypeAlias = int | Iterable[int] | None
#: ``[batch]`` integer index (``-1`` = no intervention on that row).
IndexLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[int]
