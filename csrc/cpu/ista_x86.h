// The ISTA and FISTA solve loops of one unit with explicit AVX-512 and AVX2 vectors, picked
// at run time (docs/design.md §3).
//
// Why: simd::ista and simd::fista are written as scalar code in `omp simd` loops.  GCC
// vectorises them but turns each of their ternaries (the clamp of the soft threshold, the
// relu) into compares and blends: for ISTA 25 vector operations per pair of entries where 18
// do.  These loops are bound by those operations (the unit stays in L1); written with max/min,
// solve_fused runs about 1.2x faster at the sizes of real adapters
// (benchmarks/results/README.md).  The two widths give bit-identical results
// (csrc/cpu/ista_vec.h says why), so the choice between them never changes an answer; they
// agree with the scalar loops to rounding.
//
// Only GCC on x86-64 Linux builds these (as ops.cpp's SIMD clones); elsewhere the scalar
// loops run.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../common.h"

#include "solve_simd.h"
#include "unit.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TROPFAST_X86_VEC 1
#include <immintrin.h>
#else
#define TROPFAST_X86_VEC 0
#endif

namespace tropfast {
namespace cpu {
namespace x86 {

// The vector widths of the ISTA and FISTA loops, widest last.  kGeneric: simd::ista / fista.
enum Level : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* level_name(int level) {
  return level == kAvx512 ? "avx512" : level == kAvx2 ? "avx2" : "generic";
}

// The widest level this CPU runs: x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) or x86-64-v3 (AVX2, FMA).
inline int detected_level() {
#if TROPFAST_X86_VEC
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kAvx2;
#endif
  return kGeneric;
}

// The level in use: the detected one unless set_level chose a narrower one (tests and
// benchmarks compare the levels on one machine).
inline std::atomic<int>& level_slot() {
  static std::atomic<int> slot{detected_level()};
  return slot;
}

inline int level() { return level_slot().load(std::memory_order_relaxed); }

// Use `want` (clamped to what the CPU runs); returns the level now in use.
inline int set_level(int want) {
  const int top = detected_level();
  const int use = want < kGeneric ? kGeneric : (want > top ? top : want);
  level_slot().store(use, std::memory_order_relaxed);
  return use;
}

#if TROPFAST_X86_VEC

// GCC 12 warns that the intrinsics' own "undefined" pass-through registers are uninitialised
// once they are inlined here; the warning is about the intrinsics, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace avx512 {
struct F32 {
  using T = float;
  using R = __m512;
  static constexpr int kLanes = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(T x) { return _mm512_set1_ps(x); }
  static R load(const T* p) { return _mm512_load_ps(p); }
  static void store(T* p, R x) { _mm512_store_ps(p, x); }
  static R add(R x, R y) { return _mm512_add_ps(x, y); }
  static R sub(R x, R y) { return _mm512_sub_ps(x, y); }
  static R mul(R x, R y) { return _mm512_mul_ps(x, y); }
  static R fmadd(R x, R y, R z) { return _mm512_fmadd_ps(x, y, z); }
  static R max(R x, R y) { return _mm512_max_ps(x, y); }
  static R min(R x, R y) { return _mm512_min_ps(x, y); }
  // p > 0 ? v : 0 per lane
  static R select_positive(R p, R v) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(p, zero(), _CMP_GT_OQ), v); }
  // lanes 0..15 added as l += l + 8, 4, 2, 1
  static T reduce(R v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
  }
};
struct F64 {
  using T = double;
  using R = __m512d;
  static constexpr int kLanes = 8;
  static R zero() { return _mm512_setzero_pd(); }
  static R set1(T x) { return _mm512_set1_pd(x); }
  static R load(const T* p) { return _mm512_load_pd(p); }
  static void store(T* p, R x) { _mm512_store_pd(p, x); }
  static R add(R x, R y) { return _mm512_add_pd(x, y); }
  static R sub(R x, R y) { return _mm512_sub_pd(x, y); }
  static R mul(R x, R y) { return _mm512_mul_pd(x, y); }
  static R fmadd(R x, R y, R z) { return _mm512_fmadd_pd(x, y, z); }
  static R max(R x, R y) { return _mm512_max_pd(x, y); }
  static R min(R x, R y) { return _mm512_min_pd(x, y); }
  static R select_positive(R p, R v) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(p, zero(), _CMP_GT_OQ), v); }
  // lanes 0..7 added as l += l + 4, 2, 1
  static T reduce(R v) {
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    const __m128d x = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
  }
};
namespace f32 {
using V = F32;
#include "ista_vec.h"
}  // namespace f32
namespace f64 {
using V = F64;
#include "ista_vec.h"
}  // namespace f64
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace avx2 {
struct F32 {
  using T = float;
  using R = __m256;
  static constexpr int kLanes = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(T x) { return _mm256_set1_ps(x); }
  static R load(const T* p) { return _mm256_load_ps(p); }
  static void store(T* p, R x) { _mm256_store_ps(p, x); }
  static R add(R x, R y) { return _mm256_add_ps(x, y); }
  static R sub(R x, R y) { return _mm256_sub_ps(x, y); }
  static R mul(R x, R y) { return _mm256_mul_ps(x, y); }
  static R fmadd(R x, R y, R z) { return _mm256_fmadd_ps(x, y, z); }
  static R max(R x, R y) { return _mm256_max_ps(x, y); }
  static R min(R x, R y) { return _mm256_min_ps(x, y); }
  static R select_positive(R p, R v) { return _mm256_and_ps(_mm256_cmp_ps(p, zero(), _CMP_GT_OQ), v); }
  // lanes 0..7 added as l += l + 4, 2, 1
  static T reduce(R v) {
    const __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
  }
};
struct F64 {
  using T = double;
  using R = __m256d;
  static constexpr int kLanes = 4;
  static R zero() { return _mm256_setzero_pd(); }
  static R set1(T x) { return _mm256_set1_pd(x); }
  static R load(const T* p) { return _mm256_load_pd(p); }
  static void store(T* p, R x) { _mm256_store_pd(p, x); }
  static R add(R x, R y) { return _mm256_add_pd(x, y); }
  static R sub(R x, R y) { return _mm256_sub_pd(x, y); }
  static R mul(R x, R y) { return _mm256_mul_pd(x, y); }
  static R fmadd(R x, R y, R z) { return _mm256_fmadd_pd(x, y, z); }
  static R max(R x, R y) { return _mm256_max_pd(x, y); }
  static R min(R x, R y) { return _mm256_min_pd(x, y); }
  static R select_positive(R p, R v) { return _mm256_and_pd(_mm256_cmp_pd(p, zero(), _CMP_GT_OQ), v); }
  // lanes 0..3 added as l += l + 2, 1
  static T reduce(R v) {
    const __m128d x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
  }
};
namespace f32 {
using V = F32;
#include "ista_vec.h"
}  // namespace f32
namespace f64 {
using V = F64;
#include "ista_vec.h"
}  // namespace f64
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC diagnostic pop

#endif  // TROPFAST_X86_VEC

// simd::ista or simd::fista (method kIsta or kFista, no generator penalty) at the level in
// use: true when a vector loop ran, false when the caller must run simd::solve itself.
template <typename T>
inline bool solve(simd::UnitScratch<T>& u, int method, T lr, T lam1, T lam2, int64_t steps) {
#if TROPFAST_X86_VEC
  if (method != kIsta && method != kFista) return false;
  const bool ista = method == kIsta;
  switch (level()) {
    case kAvx512:
      if constexpr (std::is_same_v<T, float>) {
        ista ? avx512::f32::ista(u, lr, lam1, lam2, steps) : avx512::f32::fista(u, lr, lam1, lam2, steps);
      } else {
        ista ? avx512::f64::ista(u, lr, lam1, lam2, steps) : avx512::f64::fista(u, lr, lam1, lam2, steps);
      }
      return true;
    case kAvx2:
      if constexpr (std::is_same_v<T, float>) {
        ista ? avx2::f32::ista(u, lr, lam1, lam2, steps) : avx2::f32::fista(u, lr, lam1, lam2, steps);
      } else {
        ista ? avx2::f64::ista(u, lr, lam1, lam2, steps) : avx2::f64::fista(u, lr, lam1, lam2, steps);
      }
      return true;
    default:
      return false;
  }
#else
  (void)u, (void)method, (void)lr, (void)lam1, (void)lam2, (void)steps;
  return false;
#endif
}

}  // namespace x86
}  // namespace cpu
}  // namespace tropfast
