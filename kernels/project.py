"""Fused rank-k projection kernel (Triton) and its float64 torch reference.

In place, over rows of ``x [n, d]`` (bf16/fp16/fp32, fp32 math)::

    h = x (+ residual)
    c = basis @ h                      # basis [k, d] float32, orthonormal rows, k = 0..64
    x = h - basis^T c + alpha * add    # add [d] float32 (optional)

One read (and one read of ``residual``) and one write per row when the padded row fits a
tile (d <= 16384); wider rows take a two-pass chunked path (x is read twice).
The tile helpers here are shared with ``project_rows.py``.
Under ``TRITON_INTERPRET=1`` the launchers accept CPU tensors.
"""
from __future__ import annotations

import torch

try:  # Triton is optional: the reference below must stay importable without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

MAX_TILE = 16384  # largest padded row (elements) processed in registers in one pass
CHUNK = 4096      # d-chunk of the two-pass path for wider rows


def project_reference(x: torch.Tensor, basis: torch.Tensor | None = None, add: torch.Tensor | None = None,
                      alpha: float = 1.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 reference, not in place: ``h - basis^T (basis h) + alpha*add`` with ``h = x (+ residual)``.

    x: ``[..., d]``; basis: ``[k, d]`` or None; add: ``[d]`` or None; residual like x. Returns float64 ``[..., d]``.
    """
    h = x.detach().to(torch.float64)
    if residual is not None:
        h = h + residual.detach().to(h.device, torch.float64)
    if basis is not None and basis.shape[0] > 0:
        q = basis.detach().to(h.device, torch.float64)
        h = h - (h @ q.T) @ q
    if add is not None:
        h = h + float(alpha) * add.detach().to(h.device, torch.float64)
    return h


if HAS_TRITON:

    @triton.jit
    def _load_tile(x_ptr, res_ptr, row_off, res_off, cols, m, HAS_RES: tl.constexpr):
        h = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(res_ptr + res_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        return h

    @triton.jit
    def _coeffs(h, basis_ptr, cols, cmask, d, ROWS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
        """c[r, j] = <basis_j, h_r> over the columns of this tile -> [ROWS, KP]."""
        kk = tl.arange(0, KP)
        c = tl.zeros([ROWS, KP], dtype=tl.float32)
        for j in tl.static_range(K):
            q = tl.load(basis_ptr + j * d + cols, mask=cmask, other=0.0).to(tl.float32)
            cj = tl.sum(h * q[None, :], axis=1)
            c = tl.where(kk[None, :] == j, cj[:, None], c)
        return c

    @triton.jit
    def _apply(h, c, basis_ptr, add_ptr, alpha, cols, cmask, d,
               K: tl.constexpr, KP: tl.constexpr, HAS_ADD: tl.constexpr):
        """h - sum_j c[:, j] basis_j + alpha * add over the columns of this tile."""
        kk = tl.arange(0, KP)
        out = h
        for j in tl.static_range(K):
            q = tl.load(basis_ptr + j * d + cols, mask=cmask, other=0.0).to(tl.float32)
            cj = tl.sum(tl.where(kk[None, :] == j, c, 0.0), axis=1)
            out = out - cj[:, None] * q[None, :]
        if HAS_ADD:
            a = tl.load(add_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            out = out + alpha * a[None, :]
        return out

    @triton.jit
    def _project_body(x_ptr, res_ptr, row_off, res_off, rmask, basis_ptr, add_ptr, alpha, d,
                      K: tl.constexpr, KP: tl.constexpr, HAS_RES: tl.constexpr, HAS_ADD: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
        """Project ROWS rows starting at element offsets ``row_off`` (int64) of x in place."""
        if ONE_TILE:
            cols = tl.arange(0, BLOCK_D)
            cmask = cols < d
            m = rmask[:, None] & cmask[None, :]
            h = _load_tile(x_ptr, res_ptr, row_off, res_off, cols, m, HAS_RES)
            c = _coeffs(h, basis_ptr, cols, cmask, d, ROWS, K, KP)
            out = _apply(h, c, basis_ptr, add_ptr, alpha, cols, cmask, d, K, KP, HAS_ADD)
            tl.store(x_ptr + row_off[:, None] + cols[None, :], out.to(x_ptr.dtype.element_ty), mask=m)
        else:
            c = tl.zeros([ROWS, KP], dtype=tl.float32)
            if K > 0:
                for d0 in range(0, d, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    cmask = cols < d
                    m = rmask[:, None] & cmask[None, :]
                    h = _load_tile(x_ptr, res_ptr, row_off, res_off, cols, m, HAS_RES)
                    c += _coeffs(h, basis_ptr, cols, cmask, d, ROWS, K, KP)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                cmask = cols < d
                m = rmask[:, None] & cmask[None, :]
                h = _load_tile(x_ptr, res_ptr, row_off, res_off, cols, m, HAS_RES)
                out = _apply(h, c, basis_ptr, add_ptr, alpha, cols, cmask, d, K, KP, HAS_ADD)
                tl.store(x_ptr + row_off[:, None] + cols[None, :], out.to(x_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _project_kernel(x_ptr, res_ptr, basis_ptr, add_ptr, n_rows, d, stride_x, stride_r, alpha,
                        K: tl.constexpr, KP: tl.constexpr, HAS_RES: tl.constexpr, HAS_ADD: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        r64 = rows.to(tl.int64)
        _project_body(x_ptr, res_ptr, r64 * stride_x, r64 * stride_r, rmask, basis_ptr, add_ptr, alpha, d,
                      K, KP, HAS_RES, HAS_ADD, ROWS, BLOCK_D, ONE_TILE)


def launch_config(d: int, n_rows: int, max_tile: int | None = None) -> dict:
    """Tile choice for a row width ``d`` and ``n_rows`` rows (per program group): ROWS, BLOCK_D, ONE_TILE, num_warps."""
    limit = int(max_tile or MAX_TILE)
    bd = triton.next_power_of_2(max(int(d), 16))
    if bd <= limit:
        one_tile = True
        rows = max(1, min(16, 8192 // bd, triton.next_power_of_2(max(int(n_rows), 1))))
    else:
        one_tile = False
        bd = min(CHUNK, triton.next_power_of_2(limit))
        rows = 1
    tile = rows * bd
    num_warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    return {"ROWS": rows, "BLOCK_D": bd, "ONE_TILE": one_tile, "num_warps": num_warps}


def kpad(k: int) -> int:
    """Padded (power of two, >= 1) size of the coefficient vector for rank k."""
    return triton.next_power_of_2(max(int(k), 1))


def project_triton(x2: torch.Tensor, basis: torch.Tensor | None, add: torch.Tensor | None, alpha: float,
                   res2: torch.Tensor | None, max_tile: int | None = None) -> torch.Tensor:
    """Launch on validated 2-D views: x2 ``[n, d]`` (last dim contiguous), basis ``[k, d]`` fp32 contiguous,
    add ``[d]`` fp32 contiguous, res2 ``[n, d]`` like x2. In place on x2."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    n, d = x2.shape
    if n == 0 or d == 0:
        return x2
    k = 0 if basis is None else int(basis.shape[0])
    cfg = launch_config(d, n, max_tile)
    grid = (triton.cdiv(n, cfg["ROWS"]),)
    _project_kernel[grid](
        x2, x2 if res2 is None else res2, x2 if basis is None else basis, x2 if add is None else add,
        n, d, x2.stride(0), 0 if res2 is None else res2.stride(0), float(alpha),
        K=k, KP=kpad(k), HAS_RES=res2 is not None, HAS_ADD=add is not None,
        ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"], ONE_TILE=cfg["ONE_TILE"], num_warps=cfg["num_warps"])
    return x2
