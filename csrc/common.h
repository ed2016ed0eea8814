// Shared helpers for the refusal-fast CPU kernels.
//
// The kernels receive raw pointers from refusal_fast/ops.py, which has already validated
// device, dtype, shapes, strides and index ranges. Nothing here re-checks user input.
//
// Storage dtypes (codes shared with ops.py): 0 = float32, 1 = bfloat16, 2 = float16.
// All math is float32. bf16/fp16 are converted with exact bit-level routines
// (round-to-nearest-even on the way back, subnormals/inf/nan handled).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#ifdef RF_HAVE_OPENMP
#include <omp.h>
#endif

namespace rf {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Hot loops are compiled for several ISA levels; the loader picks the best one by CPU features
// (GCC ifunc). Note "arch=<cpu name>" clones would dispatch on the CPU *model* and miss unknown
// or virtualised CPUs, so feature levels are used.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define RF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RF_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RF_MULTIVERSION
#endif

static inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- bfloat16 -------------------------------------------------------------------------
// Written with selects instead of branches so the row loops vectorise.
static inline float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t x = f2u(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;  // RNE; overflow -> inf
  const uint32_t qnan = (x >> 16) | 0x40u;                           // keep NaN a (quiet) NaN
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? qnan : rounded);
}

// ---- float16 (IEEE binary16) ----------------------------------------------------------
static inline float f16_to_float(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent+mantissa at float position
  const uint32_t e = em & 0x0f800000u;
  const uint32_t normal = em + (112u << 23);                        // rebias 15 -> 127
  const uint32_t infnan = em + (224u << 23);                        // exponent 31 -> 255, payload kept
  // zero / subnormal: (2^-14 * (1 + m/1024)) - 2^-14 = m * 2^-24, exact
  const uint32_t sub = f2u(u2f(em + (113u << 23)) - u2f(113u << 23));
  const uint32_t r = e == 0x0f800000u ? infnan : (e == 0u ? sub : normal);
  return u2f(r | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

static inline uint16_t float_to_f16(float f) {
  // After F. Giesen's float_to_half_fast3_rtne (round to nearest even, exact for all inputs).
  uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  const uint32_t big = x > 0x7f800000u ? 0x7e00u : 0x7c00u;           // nan -> qnan, >= 65536 -> inf
  const uint32_t sub = f2u(u2f(x) + 0.5f) - 0x3f000000u;               // |f| < 2^-14: FP add rounds
  const uint32_t norm = (x + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((x >> 13) & 1u)) >> 13;
  const uint32_t o = x >= 0x47800000u ? big : (x < 0x38800000u ? sub : norm);
  return static_cast<uint16_t>(o | sign);
}

// ---- row load / store (storage -> float32 buffer and back) ----------------------------
// load_row: dst[i] = src[i]            store_row: dst[i] = round(src[i])
// add_row:  dst[i] += src[i]           (dst float32)
void load_row(int dtype, const void* src, float* dst, int64_t n);
void load_add_row(int dtype, const void* a, const void* b, float* dst, int64_t n);  // dst = a + b
void store_row(int dtype, const float* src, void* dst, int64_t n);
void add_row(int dtype, const void* src, float* dst, int64_t n);

// ---- float32 vector helpers -----------------------------------------------------------
// Rank-k projection of R rows h[r*hs .. +d] (R = 1 or 4) held in float32, in place:
//   c[r][j] = <q_j, h_r>;  h_r -= sum_j c[r][j] q_j;  h_r += alpha * add (if add)
// q: [k, d] float32 contiguous. c: scratch of R*k floats.
void project_rows1(const float* q, int64_t k, int64_t d, float* h, float* c, const float* add, float alpha);
void project_rows4(const float* q, int64_t k, int64_t d, float* h, int64_t hs, float* c, const float* add,
                   float alpha);

// ---- kernels (accumulate.cpp, project.cpp) ---------------------------------------------
// acc[index[i], :] += x[i, :]; strides in elements; index already range-checked.
void group_accumulate(float* acc, int64_t acc_stride, const void* x, int64_t x_stride, int dtype,
                      const int64_t* index, int64_t n, int64_t d, int num_threads);

// Rows are addressed as (outer o, inner s): row = x + o*stride_outer + s*stride_inner.
// For every row: h = x (+ res); c = basis h; x = h - basis^T c + alpha * add.
// If index != nullptr, outer o uses basis + index[o]*basis_stride_outer and
// add + index[o]*add_stride_outer, and is left untouched when index[o] < 0.
struct ProjectArgs {
  void* x = nullptr;
  int dtype = kF32;
  int64_t n_outer = 0, n_inner = 0, stride_outer = 0, stride_inner = 0, d = 0;
  const void* res = nullptr;
  int64_t res_stride_outer = 0, res_stride_inner = 0;
  const float* basis = nullptr;
  int64_t k = 0, basis_stride_outer = 0;
  const float* add = nullptr;
  int64_t add_stride_outer = 0;
  float alpha = 1.f;
  const int64_t* index = nullptr;
  int num_threads = 0;
};
void project(const ProjectArgs& a);

// ---- threading ------------------------------------------------------------------------
static inline int resolve_threads(int requested) {
#ifdef RF_HAVE_OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace rf
