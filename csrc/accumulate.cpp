// Grouped accumulation on the CPU: acc[index[i], :] += x[i, :] in float32.
//
// Always deterministic: every element of acc receives its rows in input order, whatever the
// thread count. Work is split over column chunks of d (each thread owns whole columns of every
// output row), never over input rows, so no atomics and no reduction-order changes.
#include <algorithm>

#include "common.h"

namespace rf {

void group_accumulate(float* acc, int64_t acc_stride, const void* x, int64_t x_stride, int dtype,
                      const int64_t* index, int64_t n, int64_t d, int num_threads) {
  if (n <= 0 || d <= 0) return;
  const int threads = resolve_threads(num_threads);
  const int64_t esize = dtype == kF32 ? 4 : 2;
  const char* xb = static_cast<const char*>(x);
  // Column chunk: big enough for the vector loop, small enough to give every thread work.
  int64_t chunk = (d + 4 * threads - 1) / (4 * threads);
  chunk = std::min<int64_t>(1024, std::max<int64_t>(64, (chunk + 15) / 16 * 16));
  const int64_t n_chunks = (d + chunk - 1) / chunk;
  const bool parallel = threads > 1 && n_chunks > 1 && n * d >= 65536;
#ifdef RF_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
#endif
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t c0 = c * chunk;
    const int64_t len = std::min(chunk, d - c0);
    for (int64_t i = 0; i < n; ++i) {
      add_row(dtype, xb + (i * x_stride + c0) * esize, acc + index[i] * acc_stride + c0, len);
    }
  }
  (void)parallel;
}

}  // namespace rf
