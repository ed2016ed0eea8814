"""Validation and orthonormalisation of directions / subspace bases.

Directions live as float64 on the CPU "at rest"; interventions cast them to the model's dtype
and device once, when a context is entered.
"""
from __future__ import annotations

import torch

from .types import BasisLike, VectorLike

__all__ = ["orthonormalize", "unit_vector", "raw_vector", "as_float64_matrix", "check_width", "check_castable"]

#: A basis is rank-deficient when its smallest singular value is below RANK_RTOL times its largest.
RANK_RTOL = 1e-6
#: ``normalize=False`` accepts a basis when ``max |Q Q^T - I| <= ORTHO_TOL`` (float32/float64 input).
ORTHO_TOL = 1e-5


def as_float64_matrix(basis: BasisLike, what: str = "basis") -> torch.Tensor:
    """``[d]`` or ``[k, d]`` tensor / numpy array / nested list -> ``[k, d]`` float64 CPU tensor.

    Raises TypeError for non-real input and ValueError for a wrong rank, an empty basis or
    NaN/inf entries.
    """
    if isinstance(basis, torch.Tensor):
        t = basis.detach()
    else:
        try:
            t = torch.as_tensor(basis)
        except Exception as exc:  # noqa: BLE001 - re-raised as a clear TypeError
            raise TypeError(f"{what} must be a tensor, numpy array or nested list of numbers, "
                            f"got {type(basis).__name__}") from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be a real floating tensor, got dtype {t.dtype}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{what} must have shape [d] or [k, d], got shape {tuple(t.shape)}")
    k, d = t.shape
    if k == 0 or d == 0:
        raise ValueError(f"{what} is empty (shape [{k}, {d}])")
    t = t.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf")
    return t


def check_width(q: torch.Tensor, d_model: int, what: str = "basis") -> None:
    """Raise ValueError unless the last dimension of ``q`` is ``d_model``."""
    if q.shape[-1] != d_model:
        raise ValueError(f"{what} has width {q.shape[-1]} but the model's d_model is {d_model}")


def check_castable(t: torch.Tensor, dtype: torch.dtype, what: str = "vector") -> None:
    """Raise ValueError unless ``t`` (float64) stays finite in float32 (the kernels' math) and in ``dtype``.

    A vector that is finite in float64 but overflows the model's dtype would silently turn the
    residual stream into inf / NaN.
    """
    for dt in dict.fromkeys((torch.float32, dtype)):
        if dt.is_floating_point and not bool(torch.isfinite(t.to(dt)).all()):
            big = float(t.abs().max())
            raise ValueError(
                f"{what} has entries up to {big:.3g}, which overflow {str(dt).replace('torch.', '')} "
                f"(max {torch.finfo(dt).max:.3g}): the model would compute inf / NaN; use a smaller vector or alpha"
            )


def orthonormalize(basis: BasisLike, normalize: bool = True) -> torch.Tensor:
    """Orthonormal rows spanning ``basis``.

    Args:
        basis: ``[d]`` (one direction) or ``[k, d]`` (k directions), any dtype/device, torch or numpy.
        normalize: if True, orthonormalise with QR (row j of the result has a positive dot
            product with input row j; for k = 1 this is ``v / |v|``). If False, the basis must
            already be orthonormal (``max|Q Q^T - I| <= 1e-5``) and is returned unchanged.

    Returns:
        ``[k, d]`` float64 CPU tensor with orthonormal rows.

    Raises:
        ValueError: empty, wrong rank, NaN/inf, ``k > d``, rank-deficient (smallest singular value
            below ``1e-6`` times the largest), or not orthonormal with ``normalize=False``.
        TypeError: complex / bool / non-numeric input.
    """
    b = as_float64_matrix(basis)
    k, d = b.shape
    if k > d:
        raise ValueError(f"basis has k={k} directions but only d={d} dimensions; "
                         f"at most d independent directions exist")
    if not normalize:
        err = (b @ b.T - torch.eye(k, dtype=torch.float64)).abs().max().item()
        if err > ORTHO_TOL:
            raise ValueError(
                f"basis is not orthonormal (max |Q Q^T - I| = {err:.3g} > {ORTHO_TOL:g}); "
                "pass normalize=True to orthonormalise it"
            )
        return b.clone()
    s = torch.linalg.svdvals(b)
    if s[0] == 0:
        raise ValueError("basis is all zeros")
    if s[-1] <= RANK_RTOL * s[0]:
        rank = int((s > RANK_RTOL * s[0]).sum())
        raise ValueError(
            f"basis is rank-deficient: {k} directions span only {rank} dimension(s) "
            f"(singular value ratio {float(s[-1] / s[0]):.3g} <= {RANK_RTOL:g}); remove dependent directions"
        )
    q, r = torch.linalg.qr(b.T)  # b.T = q r, q [d, k]
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return (q * sign).T.contiguous()


def unit_vector(vector: VectorLike, d_model: int | None = None, what: str = "vector") -> torch.Tensor:
    """``[d]`` (or ``[1, d]``) direction -> ``[d]`` float64 CPU unit vector (ValueError if zero/NaN/wrong width)."""
    v = raw_vector(vector, d_model, what)
    n = torch.linalg.vector_norm(v)
    if n == 0:
        raise ValueError(f"{what} is the zero vector; it has no direction")
    return v / n


def raw_vector(vector: VectorLike, d_model: int | None = None, what: str = "vector") -> torch.Tensor:
    """``[d]`` (or ``[1, d]``) -> ``[d]`` float64 CPU tensor, validated (finite, right width)."""
    v = as_float64_matrix(vector, what)
    if v.shape[0] != 1:
        raise ValueError(f"{what} must have shape [d] (one vector), got {v.shape[0]} rows")
    v = v[0]
    if d_model is not None:
        check_width(v, d_model, what)
    return v
