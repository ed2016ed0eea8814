"""refusal_fast.ops: every backend (C++, torch, Triton-interpreted) vs the float64 references,
input validation, determinism, torch.library / torch.compile integration, C++ dtype conversions."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import importlib.util

import pytest
import torch

from refusal_fast import ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = (["cpp"] if ops.backend_info()["cpp"] else []) + ["torch"] + (["triton"] if HAS_TRITON else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype, backend):
    # fp32 math error + one rounding of the output; the Triton interpreter truncates to bf16.
    if dtype == torch.float32:
        return 1e-5, 1e-5
    if dtype == torch.float16:
        return 2 ** -11 * 1.05, 1e-4
    return (2 ** -7 if backend == "triton" else 2 ** -8) * 1.01, 1e-4


def check(out, ref, dtype, backend):
    rtol, atol = _tol(dtype, backend)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def orthonormal(k, d, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (d, k) if batch is None else (batch, d, k)
    q, _ = torch.linalg.qr(torch.randn(*shape, dtype=torch.float64, generator=g))
    return q.transpose(-1, -2).contiguous().float()


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------
# project_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,d,dtype", [
    (1, 80, torch.bfloat16), (2, 257, torch.float32), (3, 1000, torch.float16), (5, 96, torch.bfloat16),
    (8, 257, torch.bfloat16), (16, 80, torch.float32), (16, 257, torch.bfloat16),
])
def test_project_matches_reference(backend, k, d, dtype):
    q = orthonormal(k, d, seed=k)
    x = torch.randn(2, 3, d).to(dtype)
    ref = ops.reference.project(x, q)
    assert ops.project_(x, q) is x
    check(x, ref, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_residual_add_alpha(backend, dtype):
    d = 257
    q = orthonormal(3, d)
    x = torch.randn(2, 4, d).to(dtype)
    res = torch.randn(2, 4, d).to(dtype)
    add = torch.randn(d)
    ref = ops.reference.project(x, q, add, 0.3, res)
    ops.project_(x, q, add, alpha=0.3, residual=res)
    check(x, ref, dtype, backend)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_project_all_ranks_cpp_and_torch(k):
    for name in [b for b in BACKENDS if b != "triton"]:
        with ops.use_backend(name):
            q = orthonormal(k, 100, seed=k)
            x = torch.randn(5, 100).bfloat16()
            ref = ops.reference.project(x, q)
            ops.project_(x, q)
            check(x, ref, torch.bfloat16, name)


def test_project_pure_add_and_k0(backend):
    d = 80
    x = torch.randn(1, 1, d)  # one token
    add = torch.randn(d)
    ref = ops.reference.project(x, None, add, 2.0)
    ops.project_(x, None, add, 2.0)
    check(x, ref, torch.float32, backend)
    y = torch.randn(3, d).bfloat16()
    ref = ops.reference.project(y, None, add, -1.0)
    ops.project_(y, torch.empty(0, d), add, -1.0)
    check(y, ref, torch.bfloat16, backend)


def test_project_noop_and_empty(backend):
    x = torch.randn(2, 80)
    before = x.clone()
    ops.project_(x, None)  # nothing to do
    assert torch.equal(x, before)
    e = torch.empty(0, 5, 80, dtype=torch.bfloat16)
    assert ops.project_(e, orthonormal(2, 80)) is e


def test_project_views_update_the_base_tensor(backend):
    d = 96
    q = orthonormal(2, d)
    h = torch.randn(3, 4, d).bfloat16()
    want = ops.reference.project(h[:, -1], q)
    before = h.clone()
    ops.project_(h[:, -1], q)  # mergeable strided rows (stride 4d)
    check(h[:, -1], want, torch.bfloat16, backend)
    assert torch.equal(h[:, :-1], before[:, :-1])

    t = torch.randn(4, 3, d)  # [T, B, d] -> [B, T, d] view: leading dims not mergeable
    v = t.transpose(0, 1)
    want = ops.reference.project(v, q)
    ops.project_(v, q)
    check(t.transpose(0, 1), want, torch.float32, backend)


def test_project_strided_last_dim_and_strided_residual(backend):
    d = 96
    q = orthonormal(2, d)
    base = torch.randn(3, 2 * d)
    w = base[:, ::2]
    r = torch.randn(3, 3 * d)[:, d:2 * d]
    want = ops.reference.project(w, q, None, 1.0, r)
    ops.project_(w, q, residual=r)
    check(base[:, ::2], want, torch.float32, backend)


def test_project_basis_dtype_converted(backend):
    q64 = orthonormal(2, 80).double()
    x = torch.randn(4, 80)
    ref = ops.reference.project(x, q64)
    ops.project_(x, q64)
    check(x, ref, torch.float32, backend)


def test_project_autograd_path_matches_reference_grad():
    q = orthonormal(2, 40)
    a = torch.randn(3, 40, dtype=torch.float32, requires_grad=True)
    x = a * 1.0  # non-leaf: in-place allowed
    ops.project_(x, q)
    x.sum().backward()
    b = a.detach().clone().requires_grad_(True)
    (b - (b @ q.T) @ q).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# project_rows_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_rows_matches_reference(backend, dtype):
    B, S, d, m, k = 4, 3, 257, 3, 2
    bases = orthonormal(k, d, batch=m)
    add = torch.randn(m, d)
    x = torch.randn(B, S, d).to(dtype)
    index = torch.tensor([2, -1, 0, 1])
    before = x.clone()
    ref = ops.reference.project_rows(x, bases, index, add, 0.5)
    assert ops.project_rows_(x, bases, index, add, 0.5) is x
    check(x, ref, dtype, backend)
    assert torch.equal(x[1], before[1])  # -1: bitwise untouched


@pytest.mark.parametrize("shape", [(3, 80), (3, 2, 2, 80), (1, 1, 80)])
def test_project_rows_shapes(backend, shape):
    bases = orthonormal(16, 80, batch=2)
    x = torch.randn(*shape).bfloat16()
    index = torch.tensor([1, -1, 0][: shape[0]])
    ref = ops.reference.project_rows(x, bases, index)
    ops.project_rows_(x, bases, index)
    check(x, ref, torch.bfloat16, backend)


def test_project_rows_transposed_view(backend):
    bases = orthonormal(1, 80, batch=2)
    t = torch.randn(5, 3, 80)  # [T, B, d]
    v = t.transpose(0, 1)
    index = torch.tensor([0, -1, 1])
    ref = ops.reference.project_rows(v, bases, index)
    ops.project_rows_(v, bases, index)
    check(t.transpose(0, 1), ref, torch.float32, backend)


# ---------------------------------------------------------------------------------------------
# group_accumulate_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_matches_reference(backend, dtype, deterministic):
    R, d = 7, 257
    acc = torch.randn(R, d)
    x = torch.randn(19, d).to(dtype)
    index = torch.randint(0, R, (19,))
    index[index == 3] = 2  # an empty group
    before3 = acc[3].clone()
    ref = ops.reference.accumulate(acc, x, index)
    assert ops.group_accumulate_(acc, x, index, deterministic) is acc
    torch.testing.assert_close(acc.double(), ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(acc[3], before3)


def test_accumulate_one_row_empty_and_strided(backend):
    big = torch.zeros(4, 200)
    acc = big[:, :80]
    x = torch.randn(1, 80).bfloat16()
    ops.group_accumulate_(acc, x, torch.tensor([2]))
    assert torch.equal(acc[2], x[0].float()) and big[:, 80:].abs().sum() == 0
    before = acc.clone()
    ops.group_accumulate_(acc, torch.empty(0, 80), torch.empty(0, dtype=torch.long), deterministic=True)
    assert torch.equal(acc, before)


def test_accumulate_cpp_deterministic_across_thread_counts():
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 1000, generator=g) * torch.logspace(-4, 4, 300)[:, None]
    index = torch.randint(0, 5, (300,), generator=g)
    outs = []
    prev = torch.get_num_threads()
    try:
        with ops.use_backend("cpp"):
            for threads in (1, 2, 1):
                torch.set_num_threads(threads)
                acc = torch.zeros(5, 1000)
                ops.group_accumulate_(acc, x, index, deterministic=True)
                outs.append(acc)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_accumulate_triton_deterministic_repeatable():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 130, generator=g) * torch.logspace(-3, 3, 40)[:, None]
    index = torch.randint(0, 3, (40,), generator=g)
    with ops.use_backend("triton"):
        a, b = torch.zeros(3, 130), torch.zeros(3, 130)
        ops.group_accumulate_(a, x, index, deterministic=True)
        ops.group_accumulate_(b, x, index, deterministic=True)
    assert torch.equal(a, b)


def test_project_cpp_thread_count_invariant():
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    q = orthonormal(4, 512)
    x0 = torch.randn(64, 512).bfloat16()
    outs = []
    prev = torch.get_num_threads()
    try:
        with ops.use_backend("cpp"):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                x = x0.clone()
                ops.project_(x, q)
                outs.append(x)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _bad_project_calls():
    d = 16
    x = torch.randn(2, d)
    q = orthonormal(1, d)
    return [
        (TypeError, lambda: ops.project_([1.0] * d, q)),
        (TypeError, lambda: ops.project_(torch.ones(2, d, dtype=torch.int32), q)),
        (TypeError, lambda: ops.project_(x.double(), q)),
        (ValueError, lambda: ops.project_(x, orthonormal(1, d + 1))),
        (ValueError, lambda: ops.project_(x, q[0])),
        (ValueError, lambda: ops.project_(x, torch.randn(ops.MAX_K + 1, d))),
        (TypeError, lambda: ops.project_(x, q.int())),
        (ValueError, lambda: ops.project_(x, q, torch.randn(d + 1))),
        (ValueError, lambda: ops.project_(x, q, torch.randn(1, d))),
        (TypeError, lambda: ops.project_(x, q, residual=x.bfloat16())),
        (ValueError, lambda: ops.project_(x, q, residual=torch.randn(3, d))),
        (TypeError, lambda: ops.project_(x, q, torch.randn(d), alpha=torch.tensor(1.0))),
        (ValueError, lambda: ops.project_(x, q.to("meta"))),
        (ValueError, lambda: ops.project_(torch.randn(1, d).expand(3, d), q)),
    ]


@pytest.mark.parametrize("i", range(14))
def test_project_bad_input(i):
    exc, call = _bad_project_calls()[i]
    with pytest.raises(exc):
        call()


def test_accumulate_bad_input():
    acc = torch.zeros(3, 8)
    x = torch.randn(4, 8)
    idx = torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match="acc"):
        ops.group_accumulate_(acc.bfloat16(), x, idx)
    with pytest.raises(ValueError, match="width"):
        ops.group_accumulate_(acc, torch.randn(4, 9), idx)
    with pytest.raises(TypeError, match="int64"):
        ops.group_accumulate_(acc, x, idx.int())
    with pytest.raises(ValueError, match="shape"):
        ops.group_accumulate_(acc, x, idx[:3])
    with pytest.raises(TypeError, match="x must be"):
        ops.group_accumulate_(acc, x.long(), idx)
    for bad in (3, -1):
        with pytest.raises(ValueError, match="outside"):
            ops.group_accumulate_(acc, x, torch.tensor([0, 1, bad, 0]))
    assert acc.abs().sum() == 0  # nothing was written by the rejected calls


def test_project_rows_bad_input():
    bases = orthonormal(2, 8, batch=3)
    x = torch.randn(2, 4, 8)
    before = x.clone()
    with pytest.raises(ValueError, match="outside"):
        ops.project_rows_(x, bases, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="outside"):
        ops.project_rows_(x, bases, torch.tensor([-2, 0]))
    with pytest.raises(TypeError, match="int64"):
        ops.project_rows_(x, bases, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        ops.project_rows_(x, bases, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="bases"):
        ops.project_rows_(x, bases[:, :, :7], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="add"):
        ops.project_rows_(x, bases, torch.tensor([0, 1]), torch.randn(2, 8))
    with pytest.raises(ValueError):
        ops.project_rows_(torch.randn(8), bases, torch.tensor([0]))
    assert torch.equal(x, before)


def test_index_range_cache_sees_in_place_changes():
    bases = orthonormal(1, 8, batch=2)
    x = torch.randn(2, 8)
    index = torch.tensor([0, 1])
    ops.project_rows_(x, bases, index)
    ops.project_rows_(x, bases, index)  # cached check
    index[1] = 2  # bumps the version counter -> must be re-checked
    with pytest.raises(ValueError, match="outside"):
        ops.project_rows_(x, bases, index)


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------
def test_backend_info_and_selection(monkeypatch):
    info = ops.backend_info()
    for key in ("cpp", "openmp", "triton", "cuda"):
        assert isinstance(info[key], bool)
    assert info["cpu_backend"] in ("cpp", "torch")
    assert info["cuda_backend"] in ("triton", "torch")
    with ops.use_backend("torch"):
        assert ops.backend_info()["cpu_backend"] == "torch"
        assert ops.get_backend() == "torch"
    assert ops.get_backend() == info["forced"]
    with pytest.raises(ValueError):
        ops.set_backend("cuda-magic")
    monkeypatch.setenv("REFUSAL_FAST_BACKEND", "TORCH")
    assert ops._read_env_backend() == "torch"
    monkeypatch.setenv("REFUSAL_FAST_BACKEND", "auto")
    assert ops._read_env_backend() is None
    monkeypatch.setenv("REFUSAL_FAST_BACKEND", "fortran")
    with pytest.raises(ValueError, match="REFUSAL_FAST_BACKEND"):
        ops._read_env_backend()


def test_triton_on_cpu_requires_interpreter(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.project_(torch.randn(2, 8), orthonormal(1, 8))


def test_bytes_helpers():
    assert ops.project_bytes(10, 4096, 1, torch.bfloat16) == 10 * 4096 * 2 * 2 + 4096 * 4
    assert ops.project_bytes(10, 64, 2, torch.float32, add=True, residual=True) == 10 * 64 * 4 * 3 + 2 * 64 * 4 + 64 * 4
    assert ops.accumulate_bytes(8, 64, torch.float16, groups_touched=2) == 8 * 64 * 2 + 8 * 8 + 2 * 2 * 64 * 4
    assert ops.project_rows_bytes(4, 64, 1, torch.bfloat16, bases_used=2, batch=4) == 4 * 64 * 2 * 2 + 2 * 64 * 4 + 32


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck_registered_ops():
    d = 24
    q = orthonormal(2, d)
    x = torch.randn(2, 3, d)
    for args in [(x.clone(), q, torch.randn(d), 0.5, None), (x.clone().bfloat16(), q, None, 1.0, x.bfloat16())]:
        torch.library.opcheck(torch.ops.refusal_fast.project_.default, args)
    torch.library.opcheck(torch.ops.refusal_fast.project_rows_.default,
                          (x.clone(), torch.stack([q, q]), torch.tensor([1, -1]), None, 1.0))
    torch.library.opcheck(torch.ops.refusal_fast.group_accumulate_.default,
                          (torch.zeros(3, d), x[0].clone(), torch.tensor([0, 2, 2]), True))


def test_compile_fullgraph_aot_eager_with_surrounding_ops():
    d = 40
    q = orthonormal(2, d)
    add = torch.randn(d)

    def f(h, q, add, idx, bases):
        h = h * 2
        ops.project_(h, q, add, 0.5)
        ops.project_rows_(h, bases, idx)
        return h + 1

    bases = orthonormal(1, d, batch=2)
    idx = torch.tensor([1, -1])
    x = torch.randn(2, 3, d)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, q, add, idx, bases)
    want = ops.reference.project_rows(ops.reference.project(2 * x, q, add, 0.5), bases, idx) + 1
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_inductor_cpu():
    d = 40
    q = orthonormal(3, d)

    def f(h, q):
        ops.project_(h, q)
        return h

    x = torch.randn(2, 3, d)
    want = ops.reference.project(x, q)
    y = x.clone()
    out = torch.compile(f, fullgraph=True)(y, q)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)  # mutation reached the input
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# C++ bf16 / fp16 conversions (bit-exact vs torch)
# ---------------------------------------------------------------------------------------------
def _cast(src, dst_dtype):
    from refusal_fast import _C

    src = src.contiguous()
    out = torch.empty(src.shape, dtype=dst_dtype)
    _C.cast(src.data_ptr(), ops._DTYPE_CODE[src.dtype], out.data_ptr(), ops._DTYPE_CODE[dst_dtype], src.numel())
    return out


def _same_bits(a, b):
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32)
    assert torch.equal(ia[~nan], ib[~nan])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_cpp_conversions_bit_exact(half):
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(half)  # all 65536 patterns
    _same_bits(_cast(every, torch.float32), every.float())
    _same_bits(_cast(every.float(), half), every)  # exact round trip
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(20000, generator=g) * torch.logspace(-12, 6, 20000).float()
    hb = every[torch.isfinite(every)].float()
    mids = (hb[:-1] + hb[1:]) / 2  # exact ties between neighbours (sorted by bits within each sign)
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 3.4e38, float("inf"), -float("inf"),
                             float("nan"), 6e-8, 2.98e-8, 2.9802322e-08, 1e-45, 6.1e-5, -6.1e-5])
    for v in (vals, -vals, mids, specials):
        _same_bits(_cast(v, half), v.to(half))
