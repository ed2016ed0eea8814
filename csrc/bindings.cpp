// pybind11 module refusal_fast._C: raw-pointer entry points for the CPU kernels.
//
// Pointers are integers from Tensor.data_ptr(); strides are in elements. ALL validation
// (device, dtype, shapes, strides, index ranges) happens in refusal_fast/ops.py before these
// are called; these functions trust their arguments. Do not call them directly.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "common.h"

namespace py = pybind11;

namespace {

int check_dtype(int code) {
  if (code != rf::kF32 && code != rf::kBF16 && code != rf::kF16) throw py::value_error("unknown dtype code");
  return code;
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void group_accumulate(uintptr_t acc, int64_t acc_stride, uintptr_t x, int64_t x_stride, int dtype,
                      uintptr_t index, int64_t n, int64_t d, int num_threads) {
  rf::group_accumulate(ptr<float>(acc), acc_stride, ptr<const void>(x), x_stride, dtype,
                       ptr<const int64_t>(index), n, d, num_threads);
}

void project(uintptr_t x, int dtype, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
             int64_t stride_inner, int64_t d, uintptr_t res, int64_t res_stride_outer,
             int64_t res_stride_inner, uintptr_t basis, int64_t k, int64_t basis_stride_outer,
             uintptr_t add, int64_t add_stride_outer, float alpha, uintptr_t index, int num_threads) {
  rf::ProjectArgs a;
  a.x = ptr<void>(x);
  a.dtype = dtype;
  a.n_outer = n_outer;
  a.n_inner = n_inner;
  a.stride_outer = stride_outer;
  a.stride_inner = stride_inner;
  a.d = d;
  a.res = ptr<const void>(res);
  a.res_stride_outer = res_stride_outer;
  a.res_stride_inner = res_stride_inner;
  a.basis = ptr<const float>(basis);
  a.k = basis ? k : 0;
  a.basis_stride_outer = basis_stride_outer;
  a.add = ptr<const float>(add);
  a.add_stride_outer = add_stride_outer;
  a.alpha = alpha;
  a.index = ptr<const int64_t>(index);
  a.num_threads = num_threads;
  rf::project(a);
}

// Elementwise dtype conversion of n contiguous elements (used by the tests of the bit-level
// bf16/fp16 conversions).
void cast(uintptr_t src, int src_dtype, uintptr_t dst, int dst_dtype, int64_t n) {
  std::vector<float> tmp(static_cast<size_t>(n > 0 ? n : 0));
  rf::load_row(src_dtype, ptr<const void>(src), tmp.data(), n);
  rf::store_row(dst_dtype, tmp.data(), ptr<void>(dst), n);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "refusal-fast CPU kernels (raw-pointer API; use refusal_fast.ops instead)";
#ifdef RF_HAVE_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.attr("DTYPE_F32") = static_cast<int>(rf::kF32);
  m.attr("DTYPE_BF16") = static_cast<int>(rf::kBF16);
  m.attr("DTYPE_F16") = static_cast<int>(rf::kF16);

  m.def(
      "group_accumulate",
      [](uintptr_t acc, int64_t acc_stride, uintptr_t x, int64_t x_stride, int dtype, uintptr_t index,
         int64_t n, int64_t d, int num_threads) {
        check_dtype(dtype);
        py::gil_scoped_release nogil;
        group_accumulate(acc, acc_stride, x, x_stride, dtype, index, n, d, num_threads);
      },
      "acc[index[i]] += x[i] (fp32, deterministic). Raw pointers; validated by ops.py.");
  m.def(
      "project",
      [](uintptr_t x, int dtype, int64_t n_outer, int64_t n_inner, int64_t stride_outer, int64_t stride_inner,
         int64_t d, uintptr_t res, int64_t res_stride_outer, int64_t res_stride_inner, uintptr_t basis,
         int64_t k, int64_t basis_stride_outer, uintptr_t add, int64_t add_stride_outer, float alpha,
         uintptr_t index, int num_threads) {
        check_dtype(dtype);
        py::gil_scoped_release nogil;
        project(x, dtype, n_outer, n_inner, stride_outer, stride_inner, d, res, res_stride_outer,
                res_stride_inner, basis, k, basis_stride_outer, add, add_stride_outer, alpha, index,
                num_threads);
      },
      "In-place x = (x+res) - Q^T Q (x+res) + alpha*add over rows. Raw pointers; validated by ops.py.");
  m.def(
      "cast",
      [](uintptr_t src, int src_dtype, uintptr_t dst, int dst_dtype, int64_t n) {
        check_dtype(src_dtype);
        check_dtype(dst_dtype);
        py::gil_scoped_release nogil;
        cast(src, src_dtype, dst, dst_dtype, n);
      },
      "Convert n contiguous elements between dtype codes (tests only).");
}
