// In-place rank-k projection (+ steering add, + fused residual add) on the CPU.
//
// For each row (one read, one write of the row; fp32 math in a per-thread buffer):
//   h = x (+ res);  c_j = <q_j, h>  (j < k);  x = h - sum_j c_j q_j + alpha * add
// Rows are processed in fixed blocks of 4 consecutive rows of one outer index (one pass over each
// basis vector serves the block); blocks are independent, so the loop over blocks is parallel
// (OpenMP) and the result does not depend on the thread count.
#include <algorithm>
#include <vector>

#include "common.h"

namespace rf {

void project(const ProjectArgs& a) {
  const int64_t d = a.d;
  if (a.n_outer <= 0 || a.n_inner <= 0 || d <= 0) return;
  constexpr int64_t RB = 4;  // rows per block (share one pass over each basis vector)
  const int64_t nb = (a.n_inner + RB - 1) / RB;
  const int64_t items = a.n_outer * nb;
  const int threads = resolve_threads(a.num_threads);
  const bool parallel = threads > 1 && items > 1 && a.n_outer * a.n_inner * d >= 32768;
  const int64_t esize = a.dtype == kF32 ? 4 : 2;
  char* xb = static_cast<char*>(a.x);
  const char* rb = static_cast<const char*>(a.res);
#ifdef RF_HAVE_OPENMP
#pragma omp parallel num_threads(threads) if (parallel)
#endif
  {
    thread_local std::vector<float> buf;
    thread_local std::vector<float> coef;
    buf.resize(static_cast<size_t>(RB * d));
    coef.resize(static_cast<size_t>(RB * (a.k > 0 ? a.k : 1)));
    float* h = buf.data();
    float* c = coef.data();
#ifdef RF_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t w = 0; w < items; ++w) {
      const int64_t o = w / nb;
      const int64_t s0 = (w - o * nb) * RB;
      const int64_t rows = std::min<int64_t>(RB, a.n_inner - s0);
      const float* basis = a.basis;
      const float* add = a.add;
      if (a.index != nullptr) {
        const int64_t g = a.index[o];
        if (g < 0) continue;  // rows left untouched (not even rewritten)
        if (basis != nullptr) basis += g * a.basis_stride_outer;
        if (add != nullptr) add += g * a.add_stride_outer;
      }
      const int64_t k = basis != nullptr ? a.k : 0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t s = s0 + r;
        const char* row = xb + (o * a.stride_outer + s * a.stride_inner) * esize;
        if (rb != nullptr) {
          const char* rrow = rb + (o * a.res_stride_outer + s * a.res_stride_inner) * esize;
          load_add_row(a.dtype, row, rrow, h + r * d, d);
        } else {
          load_row(a.dtype, row, h + r * d, d);
        }
      }
      if (rows == RB) {
        project_rows4(basis, k, d, h, d, c, add, a.alpha);
      } else {
        for (int64_t r = 0; r < rows; ++r) project_rows1(basis, k, d, h + r * d, c, add, a.alpha);
      }
      for (int64_t r = 0; r < rows; ++r) {
        char* row = xb + (o * a.stride_outer + (s0 + r) * a.stride_inner) * esize;
        store_row(a.dtype, h + r * d, row, d);
      }
    }
  }
  (void)parallel;
}

}  // namespace rf
