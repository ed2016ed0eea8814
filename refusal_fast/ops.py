"""Kernel entry points: one function per kernel, backend dispatch, torch.library registration.

Ops (all in place, fp32 math, bf16/fp16/fp32 activations)::

    group_accumulate_(acc [R, d] f32, x [n, d], index [n] i64 in [0, R), deterministic=False) -> acc
    project_(x [..., d], basis [k, d] | None, add [d] | None = None, alpha=1.0,
             residual [..., d] | None = None) -> x
        # h = x (+ residual); x <- h - basis^T (basis h) + alpha * add
    project_rows_(x [B, ..., d], bases [m, k, d], index [B] i64 in [-1, m), add [m, d] | None = None,
                  alpha=1.0) -> x        # batch row b uses bases[index[b]]; -1 = row untouched

Dispatch: CUDA tensors -> Triton kernels (``kernels/``); CPU tensors -> the C++ extension
``refusal_fast._C`` if built, else the pure-torch path. ``REFUSAL_FAST_BACKEND`` in
{torch, cpp, triton} (read at import) or :func:`set_backend` / :func:`use_backend` force one:
``torch`` applies everywhere; ``cpp`` forces the extension for CPU tensors (CUDA keeps Triton);
``triton`` forces Triton for CUDA tensors and, for CPU tensors, the Triton interpreter (needs
``TRITON_INTERPRET=1`` set before triton is imported; tests only).

Every input is validated here (types, dtypes, devices, shapes, strides, index ranges) before a
pointer reaches C++ or Triton. The ops are registered as ``torch.ops.refusal_fast.*`` custom ops
with fake implementations, so ``torch.compile(fullgraph=True)`` traces through them; in eager
mode the Python functions call the implementation directly (lower per-call latency).
When autograd is recording (grad enabled and an input requires grad), the pure-torch path is
used so autograd sees ordinary in-place ops.

Index ranges are checked with ``aminmax`` (one host sync on CUDA); the last index tensor that
passed is remembered (weakref + version counter), so reusing one index tensor across the layers
of a forward checks it once. The kernels additionally ignore out-of-range rows (memory safety).

Basis / add tensors are used as float32 contiguous; pass them that way (cache them) to avoid a
conversion per call. References (float64, not in place): ``ops.reference.accumulate``,
``ops.reference.project``, ``ops.reference.project_rows``.
"""
import contextlib
import importlib
import importlib.util
import os
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor

try:
    from . import _C
except ImportError:  # extension not built (REFUSAL_FAST_NO_EXT=1) -> torch fallback on CPU
    _C = None

__all__ = [
    "backend_info", "set_backend", "use_backend", "get_backend",
    "group_accumulate_", "project_", "project_rows_",
    "accumulate_bytes", "project_bytes", "project_rows_bytes", "reference", "MAX_K",
]

MAX_K = 64  # largest supported rank (Triton unrolls over k)
BACKENDS = ("torch", "cpp", "triton")
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _read_env_backend() -> str | None:
    value = os.environ.get("REFUSAL_FAST_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"REFUSAL_FAST_BACKEND={value!r} is not one of {BACKENDS} (or 'auto')")
    return value


_forced: str | None = _read_env_backend()


# ----------------------------------------------------------------------------------------------
# backend selection
# ----------------------------------------------------------------------------------------------
def set_backend(name: str | None) -> None:
    """Force a backend ("torch", "cpp", "triton") for all ops; None restores automatic dispatch."""
    global _forced
    if name is not None:
        name = str(name).lower()
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
        if name == "cpp" and _C is None:
            raise RuntimeError("backend 'cpp' requested but the C++ extension refusal_fast._C is not built")
        if name == "triton" and not _HAS_TRITON:
            raise RuntimeError("backend 'triton' requested but triton is not installed")
    _forced = name


def get_backend() -> str | None:
    """The forced backend name, or None for automatic dispatch."""
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager: force ``name`` inside the block, restore the previous setting after."""
    prev = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backend_for(t: Tensor) -> str:
    """Backend for tensors on ``t``'s device (see module docstring)."""
    forced = _forced
    if t.is_cuda:
        if forced == "torch":
            return "torch"
        if _HAS_TRITON:
            return "triton"
        if forced == "triton":
            raise RuntimeError("backend 'triton' forced but triton is not installed")
        return "torch"
    if t.is_cpu:
        if forced is None:
            return "cpp" if _C is not None else "torch"
        if forced == "cpp":
            if _C is None:
                raise RuntimeError("backend 'cpp' forced but refusal_fast._C is not built")
            return "cpp"
        if forced == "triton":
            if not (_HAS_TRITON and _interpret()):
                raise RuntimeError("backend 'triton' on CPU tensors needs triton and TRITON_INTERPRET=1 "
                                   "(set before triton is imported)")
            return "triton"
        return "torch"
    return "torch"  # other devices (mps, xpu, ...): pure torch


def backend_info() -> dict:
    """Which backends exist and which are active.

    Returns ``{"cpp", "openmp", "triton", "cuda": bool, "cpu_backend": "cpp"|"torch"|"triton",
    "cuda_backend": "triton"|"torch", "forced": str|None, "triton_interpret": bool}``.
    """
    cuda = torch.cuda.is_available()
    try:
        cpu_backend = _backend_for(torch.empty(0))
    except RuntimeError:
        cpu_backend = "torch"
    return {
        "cpp": _C is not None,
        "openmp": bool(getattr(_C, "has_openmp", False)),
        "triton": _HAS_TRITON,
        "cuda": cuda,
        "cpu_backend": cpu_backend,
        "cuda_backend": "triton" if (_HAS_TRITON and _forced != "torch") else "torch",
        "forced": _forced,
        "triton_interpret": _interpret(),
    }


_KMODS: dict = {}


def _kernel(name: str):
    mod = _KMODS.get(name)
    if mod is None:
        mod = importlib.import_module(f"refusal_fast.kernels.{name}")
        _KMODS[name] = mod
    return mod


# ----------------------------------------------------------------------------------------------
# validation helpers (shape/dtype checks are shared with the fake implementations)
# ----------------------------------------------------------------------------------------------
def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_act(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_float(t, name: str) -> None:
    _check_tensor(t, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")


def _check_device(t: Tensor, ref: Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a Python number, got {type(alpha).__name__}")
    return float(alpha)


def _check_index_meta(index, n, name: str, ref: Tensor) -> None:
    _check_tensor(index, name)
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {index.dtype}")
    if index.dim() != 1 or index.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(index.shape)}")
    _check_device(index, ref, name)


def _check_expanded(t: Tensor, name: str) -> None:
    for size, stride in zip(t.shape, t.stride()):
        if stride == 0 and size > 1:
            raise ValueError(f"{name} has overlapping memory (expanded/broadcast view); pass a real tensor")


class _RangeCache:
    """Remembers the last index tensor that passed a range check (weakref + version counter),
    so repeated calls with the same index (every layer of a forward) check it only once."""

    __slots__ = ("ref", "version", "lo", "hi")

    def __init__(self):
        self.ref, self.version, self.lo, self.hi = None, -1, 0, 0

    def check(self, index: Tensor, lo: int, hi: int, name: str) -> None:
        if index.numel() == 0:
            return
        tracked = not index.is_inference()
        if tracked and self.ref is not None and self.ref() is index and self.version == index._version \
                and self.lo == lo and self.hi == hi:
            return
        mn, mx = map(int, torch.aminmax(index))
        if mn < lo or mx >= hi:
            bad = mn if mn < lo else mx
            raise ValueError(f"{name} contains {bad}, outside the valid range [{lo}, {hi - 1}]")
        if tracked:
            self.ref, self.version, self.lo, self.hi = weakref.ref(index), index._version, lo, hi


_ACC_RANGE = _RangeCache()
_ROWS_RANGE = _RangeCache()


def _f32c(t: Tensor) -> Tensor:
    if t.dtype is not torch.float32:
        t = t.to(torch.float32)
    return t if t.is_contiguous() else t.contiguous()


def _needs_autograd(*ts) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in ts)


def _row_layout(shape, stride):
    """Rows of a ``[..., d]`` tensor with this shape/stride as ``(n_rows, row_stride)``
    (row r at base + r*row_stride, unit column stride).

    Returns None when the leading dims cannot be merged into one strided dim or the last dim is
    strided (callers then work on a contiguous copy). Raises for overlapping rows (expanded views).
    """
    d = shape[-1]
    if d > 1 and stride[-1] != 1:
        return None
    n, row_stride, expected = 1, None, 0
    for i in range(len(shape) - 2, -1, -1):
        size = shape[i]
        if size == 1:
            continue
        if row_stride is None:
            row_stride = stride[i]
        elif stride[i] != expected:
            return None
        expected = stride[i] * size
        n *= size
    if row_stride is None:
        row_stride = d
    elif row_stride < d:
        raise ValueError("tensor has overlapping rows (expanded/broadcast view); pass a real tensor")
    return n, row_stride


def _as_rows(t: Tensor, layout) -> Tensor:
    n, row_stride = layout
    return t.as_strided((n, t.shape[-1]), (row_stride, 1))


# ----------------------------------------------------------------------------------------------
# group_accumulate_
# ----------------------------------------------------------------------------------------------
def _accumulate_meta(acc, x, index) -> None:
    _check_tensor(acc, "acc")
    if acc.dtype != torch.float32:
        raise TypeError(f"acc must be float32, got {acc.dtype}")
    if acc.dim() != 2:
        raise ValueError(f"acc must be 2-D [R, d], got shape {list(acc.shape)}")
    _check_act(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {list(x.shape)}")
    if x.shape[1] != acc.shape[1]:
        raise ValueError(f"x has width {x.shape[1]} but acc has width {acc.shape[1]}")
    _check_device(x, acc, "x")
    _check_index_meta(index, x.shape[0], "index", acc)


def _group_accumulate_impl(acc: Tensor, x: Tensor, index: Tensor, deterministic: bool) -> None:
    _accumulate_meta(acc, x, index)
    n, d = x.shape
    R = acc.shape[0]
    if n == 0 or d == 0:
        return
    if acc.shape[1] > 1 and acc.stride(1) != 1:
        raise ValueError("acc must have a contiguous last dim (stride 1)")
    _check_expanded(acc, "acc")
    _ACC_RANGE.check(index, 0, R, "index")
    backend = "torch" if _needs_autograd(acc, x) else _backend_for(acc)
    if backend == "torch":
        _accumulate_torch(acc, x, index, deterministic)
        return
    if d > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if not index.is_contiguous():
        index = index.contiguous()
    if backend == "cpp":
        _C.group_accumulate(acc.data_ptr(), acc.stride(0), x.data_ptr(), x.stride(0), _DTYPE_CODE[x.dtype],
                            index.data_ptr(), n, d, 0)
    else:
        _kernel("accumulate").accumulate_triton(acc, x, index, bool(deterministic))


def _accumulate_torch(acc: Tensor, x: Tensor, index: Tensor, deterministic: bool) -> None:
    src = x.to(torch.float32)
    if deterministic and acc.device.type != "cpu" and not torch.are_deterministic_algorithms_enabled():
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            acc.index_add_(0, index, src)
        finally:
            torch.use_deterministic_algorithms(False, warn_only=warn_only)
    else:
        acc.index_add_(0, index, src)


@torch.library.custom_op("refusal_fast::group_accumulate_", mutates_args={"acc"},
                         schema="(Tensor(a!) acc, Tensor x, Tensor index, bool deterministic) -> ()")
def _group_accumulate_op(acc: Tensor, x: Tensor, index: Tensor, deterministic: bool) -> None:
    _group_accumulate_impl(acc, x, index, deterministic)


@_group_accumulate_op.register_fake
def _group_accumulate_fake(acc, x, index, deterministic) -> None:
    _accumulate_meta(acc, x, index)


def group_accumulate_(acc: Tensor, x: Tensor, index: Tensor, deterministic: bool = False) -> Tensor:
    """In place ``acc[index[i], :] += x[i, :]`` in fp32; returns ``acc``.

    acc: ``[R, d]`` float32 (last dim contiguous); x: ``[n, d]`` bf16/fp16/fp32; index: ``[n]`` int64
    in ``[0, R)``. ``deterministic=True`` gives a fixed summation order (bit-reproducible); the C++
    CPU path is always deterministic. ``n == 0`` is a no-op. On CUDA the index range check costs one
    host sync per new index tensor.
    """
    if torch.compiler.is_compiling():
        torch.ops.refusal_fast.group_accumulate_(acc, x, index, bool(deterministic))
    else:
        _group_accumulate_impl(acc, x, index, deterministic)
    return acc


# ----------------------------------------------------------------------------------------------
# project_
# ----------------------------------------------------------------------------------------------
def _project_meta(x, basis, add, residual) -> None:
    _check_act(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., d]")
    d = x.shape[-1]
    if basis is not None:
        _check_float(basis, "basis")
        if basis.dim() != 2 or basis.shape[1] != d:
            raise ValueError(f"basis must have shape [k, {d}] (k <= {MAX_K}), got {list(basis.shape)}")
        if basis.shape[0] > MAX_K:
            raise ValueError(f"basis rank k={basis.shape[0]} exceeds the supported maximum {MAX_K}")
        _check_device(basis, x, "basis")
    if add is not None:
        _check_float(add, "add")
        if add.dim() != 1 or add.shape[0] != d:
            raise ValueError(f"add must have shape [{d}], got {list(add.shape)}")
        _check_device(add, x, "add")
    if residual is not None:
        _check_act(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {list(residual.shape)} != x shape {list(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")
        _check_device(residual, x, "residual")


def _project_impl(x: Tensor, basis: Tensor | None, add: Tensor | None, alpha: float,
                  residual: Tensor | None) -> None:
    _project_meta(x, basis, add, residual)
    alpha = _check_alpha(alpha)
    if x.numel() == 0:
        return
    if basis is not None and basis.shape[0] == 0:
        basis = None
    if basis is None and add is None and residual is None:
        return
    layout = _row_layout(x.shape, x.stride())
    if _needs_autograd(x, basis, add, residual):
        _project_torch(x, basis, add, alpha, residual)
        return
    backend = _backend_for(x)
    if backend == "torch":
        _project_torch(x, basis, add, alpha, residual)
        return
    if basis is not None:
        basis = _f32c(basis)
    if add is not None:
        add = _f32c(add)
    target = None
    if layout is None:  # leading dims not mergeable into rows, or strided last dim: use a copy
        target, x = x, x.contiguous()
        layout = (x.numel() // x.shape[-1], x.shape[-1])
    r_layout = (0, 0)  # (n_rows, row_stride) of residual; unused when residual is None
    if residual is not None:
        r_layout = _row_layout(residual.shape, residual.stride())
        if r_layout is None:
            residual = residual.contiguous()
            r_layout = layout[0], x.shape[-1]
    if backend == "cpp":
        _C.project(x.data_ptr(), _DTYPE_CODE[x.dtype], 1, layout[0], 0, layout[1], x.shape[-1],
                   0 if residual is None else residual.data_ptr(), 0, 0 if residual is None else r_layout[1],
                   0 if basis is None else basis.data_ptr(), 0 if basis is None else basis.shape[0], 0,
                   0 if add is None else add.data_ptr(), 0, alpha, 0, 0)
    else:
        _kernel("project").project_triton(
            _as_rows(x, layout), basis, add, alpha, None if residual is None else _as_rows(residual, r_layout))
    if target is not None:
        target.copy_(x)


def _project_torch(x: Tensor, basis: Tensor | None, add: Tensor | None, alpha: float,
                   residual: Tensor | None) -> None:
    h = x.to(torch.float32)
    if residual is not None:
        h = h + residual.to(torch.float32)
    if basis is not None and basis.shape[0] > 0:
        q = basis.to(torch.float32)
        h = h - (h @ q.T) @ q
    if add is not None:
        h = h + alpha * add.to(torch.float32)
    if h is not x:
        x.copy_(h)


@torch.library.custom_op(
    "refusal_fast::project_", mutates_args={"x"},
    schema="(Tensor(a!) x, Tensor? basis, Tensor? add, float alpha, Tensor? residual) -> ()")
def _project_op(x: Tensor, basis: Tensor | None, add: Tensor | None, alpha: float,
                residual: Tensor | None) -> None:
    _project_impl(x, basis, add, alpha, residual)


@_project_op.register_fake
def _project_fake(x, basis, add, alpha, residual) -> None:
    _project_meta(x, basis, add, residual)


def project_(x: Tensor, basis: Tensor | None, add: Tensor | None = None, alpha: float = 1.0,
             residual: Tensor | None = None) -> Tensor:
    """In place on ``x [..., d]``: ``h = x (+ residual)``; ``x <- h - basis^T (basis h) + alpha * add``.

    basis: ``[k, d]`` orthonormal rows (k = 0..64) or None (pure add); add: ``[d]`` or None;
    residual: same shape/dtype as x or None. fp32 math, one read and one write per row. Returns x.
    """
    if torch.compiler.is_compiling():
        torch.ops.refusal_fast.project_(x, basis, add, float(alpha), residual)
    else:
        _project_impl(x, basis, add, alpha, residual)
    return x


# ----------------------------------------------------------------------------------------------
# project_rows_
# ----------------------------------------------------------------------------------------------
def _project_rows_meta(x, bases, index, add) -> None:
    _check_act(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B, ..., d], got {list(x.shape)}")
    d = x.shape[-1]
    _check_float(bases, "bases")
    if bases.dim() != 3 or bases.shape[2] != d:
        raise ValueError(f"bases must have shape [m, k, {d}], got {list(bases.shape)}")
    if bases.shape[1] > MAX_K:
        raise ValueError(f"bases rank k={bases.shape[1]} exceeds the supported maximum {MAX_K}")
    _check_device(bases, x, "bases")
    _check_index_meta(index, x.shape[0], "index", x)
    if add is not None:
        _check_float(add, "add")
        if add.dim() != 2 or add.shape[0] != bases.shape[0] or add.shape[1] != d:
            raise ValueError(f"add must have shape [{bases.shape[0]}, {d}], got {list(add.shape)}")
        _check_device(add, x, "add")


def _project_rows_impl(x: Tensor, bases: Tensor, index: Tensor, add: Tensor | None, alpha: float) -> None:
    _project_rows_meta(x, bases, index, add)
    alpha = _check_alpha(alpha)
    m = bases.shape[0]
    _ROWS_RANGE.check(index, -1, m, "index")
    if x.numel() == 0 or m == 0:
        return
    if _needs_autograd(x, bases, add):
        _project_rows_torch(x, bases, index, add, alpha)
        return
    backend = _backend_for(x)
    if backend == "torch":
        _project_rows_torch(x, bases, index, add, alpha)
        return
    B, d = x.shape[0], x.shape[-1]
    bases = _f32c(bases)
    if add is not None:
        add = _f32c(add)
    if not index.is_contiguous():
        index = index.contiguous()
    shape, stride = x.shape, x.stride()
    inner = _row_layout(shape[1:], stride[1:])
    target = None
    if inner is None:  # inner dims not mergeable, or strided last dim: use a copy
        target, x = x, x.contiguous()
        shape, stride = x.shape, x.stride()
        inner = _row_layout(shape[1:], stride[1:])
    S, stride_s = inner
    stride_b = stride[0]
    if B > 1 and stride_b == 0:
        raise ValueError("x has overlapping rows (expanded/broadcast view); pass a real tensor")
    if backend == "cpp":
        k = bases.shape[1]
        _C.project(x.data_ptr(), _DTYPE_CODE[x.dtype], B, S, stride_b, stride_s, d,
                   0, 0, 0, bases.data_ptr(), k, k * d,
                   0 if add is None else add.data_ptr(), d, alpha, index.data_ptr(), 0)
    else:
        x3 = x.as_strided((B, S, d), (stride_b, stride_s, 1))
        _kernel("project_rows").project_rows_triton(x3, bases, index, add, alpha)
    if target is not None:
        target.copy_(x)


def _project_rows_torch(x: Tensor, bases: Tensor, index: Tensor, add: Tensor | None, alpha: float) -> None:
    B, d = x.shape[0], x.shape[-1]
    h = x.reshape(B, -1, d).to(torch.float32)
    sel = index >= 0
    g = index.clamp(min=0)
    q = bases.to(torch.float32)[g]                                      # [B, k, d]
    out = h - torch.bmm(torch.bmm(h, q.transpose(1, 2)), q)
    if add is not None:
        out = out + alpha * add.to(torch.float32)[g][:, None, :]
    out = torch.where(sel[:, None, None], out, h)
    x.copy_(out.view(x.shape))


@torch.library.custom_op(
    "refusal_fast::project_rows_", mutates_args={"x"},
    schema="(Tensor(a!) x, Tensor bases, Tensor index, Tensor? add, float alpha) -> ()")
def _project_rows_op(x: Tensor, bases: Tensor, index: Tensor, add: Tensor | None, alpha: float) -> None:
    _project_rows_impl(x, bases, index, add, alpha)


@_project_rows_op.register_fake
def _project_rows_fake(x, bases, index, add, alpha) -> None:
    _project_rows_meta(x, bases, index, add)


def project_rows_(x: Tensor, bases: Tensor, index: Tensor, add: Tensor | None = None,
                  alpha: float = 1.0) -> Tensor:
    """In place on ``x [B, ..., d]``: batch row b gets ``h - Q_g^T (Q_g h) + alpha * add[g]`` with
    ``g = index[b]``, ``Q_g = bases[g]`` (``bases [m, k, d]``, ``add [m, d]`` or None); rows with
    ``index[b] == -1`` are left untouched (not rewritten). index: ``[B]`` int64 in ``[-1, m)``. Returns x.
    """
    if torch.compiler.is_compiling():
        torch.ops.refusal_fast.project_rows_(x, bases, index, add, float(alpha))
    else:
        _project_rows_impl(x, bases, index, add, alpha)
    return x


# ----------------------------------------------------------------------------------------------
# bytes moved (for benchmarks: achieved GB/s = bytes / seconds)
# ----------------------------------------------------------------------------------------------
def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def accumulate_bytes(n: int, d: int, dtype: torch.dtype = torch.float32, groups_touched: int | None = None) -> int:
    """Minimum DRAM bytes of one group_accumulate_: read x ``[n, d]`` and index, read+write each touched acc row."""
    g = n if groups_touched is None else min(groups_touched, n)
    return n * d * _esize(dtype) + n * 8 + 2 * g * d * 4


def project_bytes(n_rows: int, d: int, k: int = 1, dtype: torch.dtype = torch.float32,
                  add: bool = False, residual: bool = False) -> int:
    """Minimum DRAM bytes of one project_ over ``n_rows`` rows: read+write x, read residual,
    basis ``[k, d]`` f32, add."""
    e = _esize(dtype)
    return n_rows * d * e * (3 if residual else 2) + k * d * 4 + (d * 4 if add else 0)


def project_rows_bytes(n_rows_touched: int, d: int, k: int = 1, dtype: torch.dtype = torch.float32,
                       bases_used: int = 1, add: bool = False, batch: int = 0) -> int:
    """Minimum DRAM bytes of one project_rows_: read+write touched rows, the used bases (and add rows), index."""
    e = _esize(dtype)
    return n_rows_touched * d * e * 2 + bases_used * (k * d * 4 + (d * 4 if add else 0)) + batch * 8


# ----------------------------------------------------------------------------------------------
# float64 references (lazy: importing kernels/ imports triton)
# ----------------------------------------------------------------------------------------------
class _References:
    """``ops.reference.accumulate(acc, x, index)``, ``.project(x, basis, add, alpha, residual)``,
    ``.project_rows(x, bases, index, add, alpha)``: float64 results, not in place."""

    @property
    def accumulate(self):
        return _kernel("accumulate").accumulate_reference

    @property
    def project(self):
        return _kernel("project").project_reference

    @property
    def project_rows(self):
        return _kernel("project_rows").project_rows_reference


reference = _References()
