"""Triton grouped-accumulation kernel (under TRITON_INTERPRET=1) vs its float64 reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import pytest
import torch

pytest.importorskip("triton")
from refusal_fast.kernels.accumulate import accumulate_reference, accumulate_triton  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(n, d, R, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randn(R, d, generator=g)
    x = torch.randn(n, d, generator=g).to(dtype)
    index = torch.randint(0, R, (n,), generator=g)
    return acc, x, index


def test_reference_matches_loop():
    acc, x, index = _case(7, 5, 3, torch.float32)
    ref = accumulate_reference(acc, x, index)
    want = acc.double().clone()
    for i in range(7):
        want[index[i]] += x[i].double()
    assert ref.dtype == torch.float64
    assert torch.allclose(ref, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,R", [(1, 80, 1), (13, 257, 5), (9, 1100, 3)])
def test_matches_reference(deterministic, dtype, n, d, R):
    acc, x, index = _case(n, d, R, dtype)
    ref = accumulate_reference(acc, x, index)
    out = accumulate_triton(acc, x, index, deterministic)
    assert out is acc
    torch.testing.assert_close(acc.double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_many_groups_with_empty_group_and_strided_rows(deterministic):
    R, d = 9, 80
    big = torch.randn(R, 2 * d)
    acc = big[:, :d]  # row stride 2d
    x = torch.randn(20, d).bfloat16()
    index = torch.randint(0, R, (20,))
    index[index == 4] = 5  # group 4 stays empty
    before4 = acc[4].clone()
    other_half = big[:, d:].clone()
    ref = accumulate_reference(acc, x, index)
    accumulate_triton(acc, x, index, deterministic)
    torch.testing.assert_close(acc.double(), ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(acc[4], before4)
    assert torch.equal(big[:, d:], other_half)  # columns outside the view are not written


@pytest.mark.parametrize("deterministic", [False, True])
def test_empty_batch_is_noop(deterministic):
    acc = torch.randn(3, 80)
    before = acc.clone()
    accumulate_triton(acc, torch.empty(0, 80, dtype=torch.bfloat16), torch.empty(0, dtype=torch.long), deterministic)
    assert torch.equal(acc, before)


def test_deterministic_is_bit_reproducible():
    # Many rows per group and mixed magnitudes so that summation order would show in the bits.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 257, generator=g) * torch.logspace(-3, 3, 64)[:, None]).float()
    index = torch.randint(0, 3, (64,), generator=g)
    outs = []
    for _ in range(2):
        acc = torch.zeros(3, 257)
        accumulate_triton(acc, x, index, deterministic=True)
        outs.append(acc)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].double(), accumulate_reference(torch.zeros(3, 257), x, index),
                               rtol=1e-5, atol=1e-3)


def test_out_of_range_rows_are_ignored_by_kernel():
    # ops.py rejects these; the kernels themselves must still never write out of bounds.
    acc = torch.zeros(2, 80)
    x = torch.ones(3, 80)
    index = torch.tensor([0, 5, -1])
    for det in (False, True):
        acc.zero_()
        accumulate_triton(acc, x, index, det)
        assert torch.equal(acc[0], torch.ones(80)) and torch.equal(acc[1], torch.zeros(80))
