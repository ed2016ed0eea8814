"""Per-row-basis projection kernel (Triton) and its float64 torch reference.

``x [B, S, d]`` (bf16/fp16/fp32), ``bases [m, k, d]`` float32, ``index [B]`` int64,
``add [m, d]`` float32 (optional). Batch row b with ``g = index[b] >= 0`` becomes, at each of
its S positions, ``h - bases[g]^T (bases[g] h) + alpha * add[g]`` (fp32 math, in place); rows
with ``index[b] == -1`` are not read or written. Lets one batch evaluate many candidate
directions at once. Indices outside ``[-1, m)`` are treated as -1 by the kernel (memory safety
only; ``refusal_fast.ops`` rejects them before launching).
"""
from __future__ import annotations

import torch

from .project import HAS_TRITON, kpad, launch_config

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .project import _project_body


def project_rows_reference(x: torch.Tensor, bases: torch.Tensor, index: torch.Tensor,
                           add: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """Float64 reference, not in place. x ``[B, ..., d]``, bases ``[m, k, d]``, index ``[B]`` (-1 = untouched),
    add ``[m, d]`` or None. Returns float64 ``[B, ..., d]``."""
    out = x.detach().to(torch.float64).clone()
    for b in range(x.shape[0]):
        g = int(index[b])
        if g < 0:
            continue
        h = out[b]
        q = bases[g].detach().to(out.device, torch.float64)
        h = h - (h @ q.T) @ q
        if add is not None:
            h = h + float(alpha) * add[g].detach().to(out.device, torch.float64)
        out[b] = h
    return out


if HAS_TRITON:

    @triton.jit
    def _project_rows_kernel(x_ptr, bases_ptr, add_ptr, idx_ptr, S, m, d, stride_b, stride_s, alpha,
                             K: tl.constexpr, KP: tl.constexpr, HAS_ADD: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr):
        b = tl.program_id(1)
        g = tl.load(idx_ptr + b)
        if (g >= 0) & (g < m):
            s = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
            rmask = s < S
            off = b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s
            g64 = g.to(tl.int64)
            _project_body(x_ptr, x_ptr, off, off, rmask, bases_ptr + g64 * K * d, add_ptr + g64 * d, alpha, d,
                          K, KP, False, HAS_ADD, ROWS, BLOCK_D, ONE_TILE)


def project_rows_triton(x3: torch.Tensor, bases: torch.Tensor, index: torch.Tensor, add: torch.Tensor | None,
                        alpha: float, max_tile: int | None = None) -> torch.Tensor:
    """Launch on validated inputs: x3 ``[B, S, d]`` (last dim contiguous), bases ``[m, k, d]`` fp32 contiguous,
    index ``[B]`` int64, add ``[m, d]`` fp32 contiguous or None. In place on x3."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    B, S, d = x3.shape
    m, k = int(bases.shape[0]), int(bases.shape[1])
    if B == 0 or S == 0 or d == 0 or m == 0:
        return x3
    cfg = launch_config(d, S, max_tile)
    grid = (triton.cdiv(S, cfg["ROWS"]), B)
    _project_rows_kernel[grid](
        x3, bases, x3 if add is None else add, index, S, m, d, x3.stride(0), x3.stride(1), float(alpha),
        K=k, KP=kpad(k), HAS_ADD=add is not None,
        ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"], ONE_TILE=cfg["ONE_TILE"], num_warps=cfg["num_warps"])
    return x3
