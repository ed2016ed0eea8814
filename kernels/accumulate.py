"""Grouped accumulation kernel (Triton) and its float64 torch reference.

``acc[index[i], :] += x[i, :]`` with ``acc`` float32 ``[R, d]``, ``x`` ``[n, d]`` in
bf16/fp16/fp32 and ``index`` int64 ``[n]``. Two launch modes:

* atomic (default): a program per (row block, d block) adds its rows with ``tl.atomic_add``;
  fast, but the fp32 summation order depends on scheduling.
* deterministic: rows are stably sorted by group on the device and segment bounds found with
  ``searchsorted`` (no host sync); one program per (output row, d block) sums its segment in
  order and does a plain read-modify-write. Bit-reproducible run to run.

Rows whose index is outside ``[0, R)`` are ignored by both kernels (memory safety only;
``refusal_fast.ops`` rejects such input before launching).
Under ``TRITON_INTERPRET=1`` the launchers accept CPU tensors.
"""
from __future__ import annotations

import torch

try:  # Triton is optional: the reference below must stay importable without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None
    HAS_TRITON = False


def accumulate_reference(acc: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Float64 reference: returns ``acc + scatter_sum(x by index)`` as a new ``[R, d]`` float64 tensor."""
    out = acc.detach().to(torch.float64).clone()
    if x.shape[0]:
        out.index_add_(0, index.to(out.device), x.detach().to(out.device, torch.float64))
    return out


if HAS_TRITON:

    @triton.jit
    def _accumulate_atomic_kernel(acc_ptr, x_ptr, idx_ptr, n, d, R, stride_acc, stride_x,
                                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rmask = rows < n
        g = tl.load(idx_ptr + rows, mask=rmask, other=-1)
        ok = rmask & (g >= 0) & (g < R)
        m = ok[:, None] & (cols < d)[None, :]
        v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        tl.atomic_add(acc_ptr + g.to(tl.int64)[:, None] * stride_acc + cols[None, :],
                      v.to(tl.float32), mask=m)

    @triton.jit
    def _accumulate_segment_kernel(acc_ptr, x_ptr, perm_ptr, offs_ptr, d, stride_acc, stride_x,
                                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        grp = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < d
        start = tl.load(offs_ptr + grp)
        end = tl.load(offs_ptr + grp + 1)
        if end > start:
            part = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            for s in range(start, end, ROWS):
                r = s + tl.arange(0, ROWS)
                rm = r < end
                src = tl.load(perm_ptr + r, mask=rm, other=0)
                v = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x + cols[None, :],
                            mask=rm[:, None] & cmask[None, :], other=0.0)
                part += v.to(tl.float32)
            total = tl.sum(part, axis=0)
            ap = acc_ptr + grp.to(tl.int64) * stride_acc + cols
            a = tl.load(ap, mask=cmask, other=0.0)
            tl.store(ap, a + total, mask=cmask)


def _block_d(d: int) -> int:
    return min(1024, triton.next_power_of_2(max(int(d), 16)))


def accumulate_triton(acc: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                      deterministic: bool = False) -> torch.Tensor:
    """Launch the Triton kernel: ``acc[R, d] fp32 += x[n, d]`` grouped by ``index[n]`` (in place).

    Inputs must already be validated (same device, last dim contiguous, int64 index).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    n, d = x.shape
    R = acc.shape[0]
    if n == 0 or d == 0 or R == 0:
        return acc
    block_d = _block_d(d)
    n_dblk = triton.cdiv(d, block_d)
    if not deterministic:
        rows = 4
        _accumulate_atomic_kernel[(triton.cdiv(n, rows), n_dblk)](
            acc, x, index, n, d, R, acc.stride(0), x.stride(0),
            ROWS=rows, BLOCK_D=block_d, num_warps=4)
        return acc
    sorted_idx, perm = torch.sort(index, stable=True)
    bounds = torch.arange(R + 1, device=index.device, dtype=index.dtype)
    offs = torch.searchsorted(sorted_idx, bounds)  # offs[g]..offs[g+1]: rows of group g
    rows = 4
    _accumulate_segment_kernel[(R, n_dblk)](
        acc, x, perm, offs, d, acc.stride(0), x.stride(0),
        ROWS=rows, BLOCK_D=block_d, num_warps=4)
    return acc
