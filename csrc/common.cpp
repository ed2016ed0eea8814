// Vectorisable row conversion and float32 vector helpers (see common.h).
#include "common.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vector helpers are always inlined

namespace rf {

namespace {

RF_MULTIVERSION void load_f32(const float* s, float* d, int64_t n) { std::memcpy(d, s, sizeof(float) * n); }
RF_MULTIVERSION void load_bf16(const uint16_t* s, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(s[i]);
}
RF_MULTIVERSION void load_f16(const uint16_t* s, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = f16_to_float(s[i]);
}

RF_MULTIVERSION void load_add_f32(const float* a, const float* b, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = a[i] + b[i];
}
RF_MULTIVERSION void load_add_bf16(const uint16_t* a, const uint16_t* b, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(a[i]) + bf16_to_float(b[i]);
}
RF_MULTIVERSION void load_add_f16(const uint16_t* a, const uint16_t* b, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = f16_to_float(a[i]) + f16_to_float(b[i]);
}

RF_MULTIVERSION void store_bf16(const float* s, uint16_t* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(s[i]);
}
RF_MULTIVERSION void store_f16(const float* s, uint16_t* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_f16(s[i]);
}

RF_MULTIVERSION void add_f32(const float* s, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] += s[i];
}
RF_MULTIVERSION void add_bf16(const uint16_t* s, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] += bf16_to_float(s[i]);
}
RF_MULTIVERSION void add_f16(const uint16_t* s, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] += f16_to_float(s[i]);
}

}  // namespace

void load_row(int dtype, const void* src, float* dst, int64_t n) {
  switch (dtype) {
    case kF32: load_f32(static_cast<const float*>(src), dst, n); break;
    case kBF16: load_bf16(static_cast<const uint16_t*>(src), dst, n); break;
    default: load_f16(static_cast<const uint16_t*>(src), dst, n); break;
  }
}

void load_add_row(int dtype, const void* a, const void* b, float* dst, int64_t n) {
  switch (dtype) {
    case kF32: load_add_f32(static_cast<const float*>(a), static_cast<const float*>(b), dst, n); break;
    case kBF16: load_add_bf16(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), dst, n); break;
    default: load_add_f16(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), dst, n); break;
  }
}

void store_row(int dtype, const float* src, void* dst, int64_t n) {
  switch (dtype) {
    case kF32: std::memcpy(dst, src, sizeof(float) * n); break;
    case kBF16: store_bf16(src, static_cast<uint16_t*>(dst), n); break;
    default: store_f16(src, static_cast<uint16_t*>(dst), n); break;
  }
}

void add_row(int dtype, const void* src, float* dst, int64_t n) {
  switch (dtype) {
    case kF32: add_f32(static_cast<const float*>(src), dst, n); break;
    case kBF16: add_bf16(static_cast<const uint16_t*>(src), dst, n); break;
    default: add_f16(static_cast<const uint16_t*>(src), dst, n); break;
  }
}

namespace {
// 16-float generic vectors: one zmm on AVX-512, two ymm on AVX2, four xmm otherwise. Explicit
// partial sums give a fixed summation order (deterministic) without -ffast-math.
typedef float vf __attribute__((vector_size(64)));
constexpr int64_t kV = 16;

__attribute__((always_inline)) inline vf ld(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(vf));
  return v;
}
__attribute__((always_inline)) inline void st(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(vf)); }
__attribute__((always_inline)) inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < kV; ++l) s += v[l];
  return s;
}
}  // namespace

RF_MULTIVERSION void project_rows1(const float* q, int64_t k, int64_t d, float* h, float* c, const float* add,
                                   float alpha) {
  const int64_t dv = d - d % kV;
  for (int64_t j = 0; j < k; ++j) {
    const float* qj = q + j * d;
    vf a0 = {}, a1 = {};
    int64_t i = 0;
    for (; i + 2 * kV <= dv; i += 2 * kV) {
      a0 += ld(qj + i) * ld(h + i);
      a1 += ld(qj + i + kV) * ld(h + i + kV);
    }
    if (i < dv) a0 += ld(qj + i) * ld(h + i);
    float s = hsum(a0 + a1);
    for (i = dv; i < d; ++i) s += qj[i] * h[i];
    c[j] = s;
  }
  for (int64_t i = 0; i < dv; i += kV) {
    vf v = ld(h + i);
    for (int64_t j = 0; j < k; ++j) v -= c[j] * ld(q + j * d + i);
    if (add != nullptr) v += alpha * ld(add + i);
    st(h + i, v);
  }
  for (int64_t i = dv; i < d; ++i) {
    float v = h[i];
    for (int64_t j = 0; j < k; ++j) v -= c[j] * q[j * d + i];
    if (add != nullptr) v += alpha * add[i];
    h[i] = v;
  }
}

RF_MULTIVERSION void project_rows4(const float* q, int64_t k, int64_t d, float* h, int64_t hs, float* c,
                                   const float* add, float alpha) {
  float* h0 = h;
  float* h1 = h + hs;
  float* h2 = h + 2 * hs;
  float* h3 = h + 3 * hs;
  float* c0 = c;
  float* c1 = c + k;
  float* c2 = c + 2 * k;
  float* c3 = c + 3 * k;
  const int64_t dv = d - d % kV;
  for (int64_t j = 0; j < k; ++j) {  // one pass over q_j serves four rows
    const float* qj = q + j * d;
    vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t i = 0; i < dv; i += kV) {
      const vf qv = ld(qj + i);
      a0 += qv * ld(h0 + i);
      a1 += qv * ld(h1 + i);
      a2 += qv * ld(h2 + i);
      a3 += qv * ld(h3 + i);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int64_t i = dv; i < d; ++i) {
      const float qv = qj[i];
      s0 += qv * h0[i];
      s1 += qv * h1[i];
      s2 += qv * h2[i];
      s3 += qv * h3[i];
    }
    c0[j] = s0;
    c1[j] = s1;
    c2[j] = s2;
    c3[j] = s3;
  }
  for (int64_t i = 0; i < dv; i += kV) {  // rows stay in registers across the k basis vectors
    vf v0 = ld(h0 + i), v1 = ld(h1 + i), v2 = ld(h2 + i), v3 = ld(h3 + i);
    for (int64_t j = 0; j < k; ++j) {
      const vf qv = ld(q + j * d + i);
      v0 -= c0[j] * qv;
      v1 -= c1[j] * qv;
      v2 -= c2[j] * qv;
      v3 -= c3[j] * qv;
    }
    if (add != nullptr) {
      const vf av = alpha * ld(add + i);
      v0 += av;
      v1 += av;
      v2 += av;
      v3 += av;
    }
    st(h0 + i, v0);
    st(h1 + i, v1);
    st(h2 + i, v2);
    st(h3 + i, v3);
  }
  for (int64_t i = dv; i < d; ++i) {
    float v0 = h0[i], v1 = h1[i], v2 = h2[i], v3 = h3[i];
    for (int64_t j = 0; j < k; ++j) {
      const float qv = q[j * d + i];
      v0 -= c0[j] * qv;
      v1 -= c1[j] * qv;
      v2 -= c2[j] * qv;
      v3 -= c3[j] * qv;
    }
    if (add != nullptr) {
      const float av = alpha * add[i];
      v0 += av;
      v1 += av;
      v2 += av;
      v3 += av;
    }
    h0[i] = v0;
    h1[i] = v1;
    h2[i] = v2;
    h3[i] = v3;
  }
}

}  // namespace rf
