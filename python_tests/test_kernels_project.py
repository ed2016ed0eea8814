"""Triton projection kernels (project, project_rows) under TRITON_INTERPRET=1 vs float64 references."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import pytest
import torch

pytest.importorskip("triton")
from refusal_fast.kernels.project import launch_config, project_reference, project_triton  # noqa: E402
from refusal_fast.kernels.project_rows import project_rows_reference, project_rows_triton  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# |out - ref| <= atol + rtol*|ref|: fp32 math error plus one rounding of the output to dtype.
# bf16 allows a full ulp (2^-7): the Triton *interpreter* truncates fp32->bf16 (GPUs round to
# nearest even, which the C++ tests in test_ops.py hold to half an ulp).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 ** -7 * 1.01, 1e-4), torch.float16: (2 ** -11 * 1.05, 1e-4)}


def orthonormal(k, d, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (d, k) if batch is None else (batch, d, k)
    q, _ = torch.linalg.qr(torch.randn(*shape, dtype=torch.float64, generator=g))
    return q.transpose(-1, -2).contiguous().float()


def check(out, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_reference_removes_subspace():
    q = orthonormal(3, 50)
    x = torch.randn(4, 50)
    out = project_reference(x, q)
    assert out.dtype == torch.float64
    assert (out @ q.double().T).abs().max() < 1e-6
    add = torch.randn(50)
    out2 = project_reference(x, q, add, 2.0, residual=x)
    h = 2 * x.double()
    torch.testing.assert_close(out2, h - (h @ q.double().T) @ q.double() + 2 * add.double())


@pytest.mark.parametrize("k,d,dtype", [
    (1, 80, torch.float32), (2, 257, torch.bfloat16), (3, 1000, torch.float16),
    (4, 80, torch.bfloat16), (5, 257, torch.float32), (8, 1000, torch.bfloat16),
    (16, 257, torch.float16), (16, 80, torch.float32), (6, 100, torch.bfloat16), (7, 96, torch.float32),
])
def test_project_matches_reference(k, d, dtype):
    q = orthonormal(k, d, seed=k)
    x = torch.randn(3, 5, d).to(dtype)
    ref = project_reference(x, q)
    x2 = x.view(-1, d)
    project_triton(x2, q, None, 1.0, None)
    check(x, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_fused_residual_and_add(dtype):
    d = 257
    q = orthonormal(2, d)
    x = torch.randn(6, d).to(dtype)
    res = torch.randn(6, d).to(dtype)
    add = torch.randn(d)
    ref = project_reference(x, q, add, -0.75, res)
    res_before = res.clone()
    project_triton(x, q, add, -0.75, res)
    check(x, ref, dtype)
    assert torch.equal(res, res_before)


def test_project_pure_add_k0_and_one_row():
    d = 80
    x = torch.randn(1, d).bfloat16()
    add = torch.randn(d)
    ref = project_reference(x, None, add, 3.0)
    project_triton(x, None, add, 3.0, None)
    check(x, ref, torch.bfloat16)


def test_project_strided_rows():
    d = 96
    base = torch.randn(4, 3 * d)
    x2 = base[:, d:2 * d]  # row stride 3d
    q = orthonormal(3, d)
    before = base.clone()
    ref = project_reference(x2, q)
    project_triton(x2, q, None, 1.0, None)
    check(x2, ref, torch.float32)
    assert torch.equal(base[:, :d], before[:, :d]) and torch.equal(base[:, 2 * d:], before[:, 2 * d:])


def test_project_chunked_path():
    # Force the two-pass path (rows wider than the tile) with a small tile.
    d = 200
    assert not launch_config(d, 3, max_tile=64)["ONE_TILE"]
    q = orthonormal(3, d)
    x = torch.randn(3, d).bfloat16()
    res = torch.randn(3, d).bfloat16()
    add = torch.randn(d)
    ref = project_reference(x, q, add, 0.5, res)
    project_triton(x, q, add, 0.5, res, max_tile=64)
    check(x, ref, torch.bfloat16)


def test_project_empty_is_noop():
    x = torch.empty(0, 80)
    project_triton(x, orthonormal(2, 80), None, 1.0, None)
    assert x.shape == (0, 80)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_add", [False, True])
def test_project_rows_matches_reference(dtype, with_add):
    B, S, d, m, k = 5, 3, 257, 3, 2
    bases = orthonormal(k, d, batch=m)
    add = torch.randn(m, d) if with_add else None
    x = torch.randn(B, S, d).to(dtype)
    index = torch.tensor([2, -1, 0, 1, -1])
    before = x.clone()
    ref = project_rows_reference(x, bases, index, add, 1.5)
    project_rows_triton(x, bases, index, add, 1.5)
    check(x, ref, dtype)
    assert torch.equal(x[1], before[1]) and torch.equal(x[4], before[4])  # -1 rows bitwise untouched


@pytest.mark.parametrize("k", [1, 16])
def test_project_rows_rank_and_chunked(k):
    B, S, d, m = 3, 2, 80, 2
    bases = orthonormal(k, d, batch=m, seed=k)
    x = torch.randn(B, S, d)
    index = torch.tensor([1, 0, 1])
    ref = project_rows_reference(x, bases, index)
    project_rows_triton(x, bases, index, None, 1.0, max_tile=32 if k == 1 else None)
    check(x, ref, torch.float32)


def test_project_rows_reference_is_per_row():
    bases = orthonormal(1, 10, batch=2)
    x = torch.randn(2, 10)
    out = project_rows_reference(x, bases, torch.tensor([1, -1]))
    torch.testing.assert_close(out[0], project_reference(x[0:1], bases[1])[0])
    torch.testing.assert_close(out[1], x[1].double())


def test_project_rows_out_of_range_index_untouched_by_kernel():
    bases = orthonormal(1, 80, batch=2)
    x = torch.randn(3, 1, 80)
    before = x.clone()
    project_rows_triton(x, bases, torch.tensor([5, -3, 0]), None, 1.0)
    assert torch.equal(x[:2], before[:2])
    assert not torch.equal(x[2], before[2])
