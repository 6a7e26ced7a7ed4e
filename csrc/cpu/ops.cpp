// CPU kernels of the tropfast:: ops (schemas: tropfast/ops.py), OpenMP over (adapter, unit).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"
#include "../sorted.h"
#include "ista_x86.h"
#include "solve_simd.h"
#include "unit.h"

namespace tropfast {
namespace cpu {
namespace {

// Below this many scalar updates a parallel region costs more than it saves: waking the
// team is microseconds when the cores are idle but milliseconds when they are busy.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

int team_size(int64_t tasks, int64_t work_per_task) {
  // at::get_num_threads honours torch.set_num_threads; inside a parallel region stay serial.
  if (at::in_parallel_region() || tasks < 2 || tasks * work_per_task < kMinParallelWork) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), tasks));
}

template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<acc_t>(src[k]);
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(src[k]);
}

// ------------------------------------------------------------------------------------------
// The whole solves run each hidden unit in its own buffers (simd::UnitScratch).  A unit is a
// row of A and a column of B; B is stored by rows, so the units are taken kGroup at a time
// (one cache line of a row of B), and the group's columns are read and written in one pass
// over the rows of B instead of one strided pass per unit.
// ------------------------------------------------------------------------------------------
constexpr int64_t kGroup = 16;

// For every group of up to kGroup consecutive units of one adapter: load the group's rows of
// A and columns of B into its buffers, run `solve(l, u, buffers)` on each unit (which leaves
// Â, B̂ in buffers.ah / .bh), and store them.  Groups are spread over `threads` threads.
template <typename scalar_t, typename Solve>
void for_unit_groups(const scalar_t* A, const scalar_t* B, int64_t L, int64_t r, int64_t din, int64_t dout,
                     scalar_t* oA, scalar_t* oB, int threads, Solve&& solve) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (r + kGroup - 1) / kGroup;
#pragma omp parallel num_threads(threads)
  {
    std::vector<std::unique_ptr<simd::UnitScratch<acc_t>>> ub;
    for (int64_t q = 0; q < std::min(kGroup, r); ++q) ub.push_back(std::make_unique<simd::UnitScratch<acc_t>>(din, dout));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < L * groups; ++task) {
      const int64_t l = task / groups, i0 = (task % groups) * kGroup, g = std::min(kGroup, r - i0);
      for (int64_t q = 0; q < g; ++q) load_row(A + (l * r + i0 + q) * din, din, ub[q]->a);
      for (int64_t j = 0; j < dout; ++j) {
        const scalar_t* row = B + (l * dout + j) * r + i0;
        for (int64_t q = 0; q < g; ++q) ub[q]->b[j] = static_cast<acc_t>(row[q]);
      }
      for (int64_t q = 0; q < g; ++q) solve(l, l * r + i0 + q, *ub[q]);
      for (int64_t q = 0; q < g; ++q) store_row(ub[q]->ah, din, oA + (l * r + i0 + q) * din);
      for (int64_t j = 0; j < dout; ++j) {
        scalar_t* row = oB + (l * dout + j) * r + i0;
        for (int64_t q = 0; q < g; ++q) row[q] = static_cast<scalar_t>(ub[q]->bh[j]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// generators: G1[l, j, i, :] = relu(B[l, j, i]) · A[l, i, :], G2 with relu(−B).
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
void generators_kernel(const scalar_t* A, const scalar_t* B, scalar_t* g1, scalar_t* g2, int64_t L, int64_t r,
                       int64_t din, int64_t dout) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = L * dout;
#pragma omp parallel for schedule(static) num_threads(team_size(rows, r * din))
  for (int64_t lj = 0; lj < rows; ++lj) {
    const int64_t l = lj / dout;
    for (int64_t i = 0; i < r; ++i) {
      const acc_t b = static_cast<acc_t>(B[lj * r + i]);
      const acc_t bp = relu(b), bn = relu(-b);
      const scalar_t* a = A + (l * r + i) * din;
      scalar_t* o1 = g1 + (lj * r + i) * din;
      scalar_t* o2 = g2 + (lj * r + i) * din;
#pragma omp simd
      for (int64_t k = 0; k < din; ++k) {
        const acc_t ak = static_cast<acc_t>(a[k]);
        o1[k] = static_cast<scalar_t>(bp * ak);
        o2[k] = static_cast<scalar_t>(bn * ak);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> generators_cpu(const at::Tensor& A_, const at::Tensor& B_) {
  Batch x = make_batch("generators", A_, B_);
  const int64_t L = x.L, r = x.r, din = x.d_in, dout = x.d_out;
  at::Tensor G1 = at::empty({L, dout, r, din}, x.A.options());
  at::Tensor G2 = at::empty({L, dout, r, din}, x.A.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.A.scalar_type(), "tropfast_generators_cpu", [&] {
    generators_kernel(x.A.data_ptr<scalar_t>(), x.B.data_ptr<scalar_t>(), G1.data_ptr<scalar_t>(),
                      G2.data_ptr<scalar_t>(), L, r, din, dout);
  });
  if (x.squeeze) return {G1.squeeze(0), G2.squeeze(0)};
  return {G1, G2};
}

// ------------------------------------------------------------------------------------------
// SIMD width.  The vector loops (the solve loops, which run T times over data in L1, and the
// streaming passes of hsd_loss / hsd_grad / prox_step / soft_threshold) are compiled three
// times with GCC on x86-64 (AVX-512, AVX2+FMA, baseline SSE2) and the loader picks the
// widest the CPU has (ifunc).  Elsewhere the baseline build runs.  A clone is a plain
// function called from inside a parallel loop (the loop bodies OpenMP outlines are not
// cloned themselves).
// ------------------------------------------------------------------------------------------
#if TROPFAST_X86_VEC  // GCC on x86-64 Linux (ista_x86.h)
#define TROPFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TROPFAST_SIMD_CLONES
#endif

// ------------------------------------------------------------------------------------------
// hsd_loss / hsd_grad / prox_step: three streaming passes over the weights in their storage
// order (docs/design.md §2), so every load is contiguous and vectorised across hidden units:
//   1. the rows of B, B̂ (each row holds one entry of every unit): the unit sums β̂, s
//      (and β, q, δ for the loss), accumulated per chunk of kRows rows;
//   2. the rows of A, Â (one unit each): â, c (and ‖E‖², ⟨E, Â⟩), then the row of ∂/∂Â or
//      of the new Â, which needs pass 1's sums;
//   3. the rows of B, B̂ again: the row of ∂/∂B̂ or of the new B̂, which needs pass 2's sums.
// Chunks are a fixed number of rows and are combined in order, so the results do not
// depend on the number of threads.  Weights are read twice (B) or once (A), written once.
// ------------------------------------------------------------------------------------------
enum class UnitOp { kLoss, kGrad, kProx };

constexpr int64_t kRows = 64;  // rows of B per chunk of pass 1

// Pointers of one pass; out_a / out_b / partial / params are null when OP does not use them.
template <typename scalar_t>
struct UnitPassArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *A, *B, *Ah, *Bh;
  scalar_t *out_a, *out_b;
  acc_t* partial;  // (L * r) per-unit loss terms
  const acc_t *lr, *lam1, *lam2;
  int64_t L, r, din, dout;
};

// Per-unit sums of the B side: β̂, s always; β, q, δ for the loss.
constexpr int kBSums = 5;
// Per-unit sums of the A side: â, c always; ‖E‖², ⟨E, Â⟩ for the loss.
constexpr int kASums = 4;

// Pass 1 on `rows` rows of B, B̂ (r entries each): the unit sums β̂, s (and β, q, δ) into
// out (nb·r numbers, zeroed here).
template <bool kWithLoss, typename scalar_t, typename acc_t>
TROPFAST_INLINE void b_sums(const scalar_t* B, const scalar_t* Bh, int64_t rows, int64_t r, acc_t* out) {
  std::fill(out, out + (kWithLoss ? kBSums : 2) * r, acc_t(0));
  acc_t *bh2 = out, *s = out + r, *beta = out + 2 * r, *q = out + 3 * r, *delta = out + 4 * r;
  for (int64_t j = 0; j < rows; ++j) {
    const scalar_t* bj = B + j * r;
    const scalar_t* hj = Bh + j * r;
#pragma omp simd
    for (int64_t i = 0; i < r; ++i) {
      const acc_t b = static_cast<acc_t>(bj[i]), bh = static_cast<acc_t>(hj[i]);
      bh2[i] += bh * bh;
      s[i] += relu(b * bh);
      if (kWithLoss) {
        const acc_t bp = relu(b), bn = relu(-b);
        const acc_t dp = bp - relu(bh), dn = bn - relu(-bh);
        beta[i] += b * b;
        q[i] += bp * dp + bn * dn;
        delta[i] += dp * dp + dn * dn;
      }
    }
  }
}

// Pass 2 on one unit: the sums of its rows a, â (â, c into sums[0..1]; the unit's loss term
// into *partial), then its row of ∂/∂Â or of the new Â into o.  bs: β̂, s, β, q, δ of the unit.
template <UnitOp OP, typename scalar_t, typename acc_t>
TROPFAST_INLINE void a_unit(const scalar_t* a, const scalar_t* ah, int64_t din, const acc_t* bs, acc_t lr, acc_t thr,
                            scalar_t* o, acc_t* sums, acc_t* partial) {
  constexpr bool kWithLoss = OP != UnitOp::kProx;
  const acc_t beta_hat = bs[0], s = bs[1];
  acc_t a_hat = 0, c = 0, ee = 0, eah = 0;
#pragma omp simd reduction(+ : a_hat, c, ee, eah)
  for (int64_t k = 0; k < din; ++k) {
    const acc_t x = static_cast<acc_t>(a[k]), xh = static_cast<acc_t>(ah[k]);
    a_hat += xh * xh;
    c += x * xh;
    if (kWithLoss) {
      const acc_t e = x - xh;
      ee += e * e;
      eah += e * xh;
    }
  }
  sums[0] = a_hat;
  sums[1] = c;
  // β‖E‖² + 2q⟨E, Â⟩ + δâ: twice the unit's share (closed_form._loss)
  if (kWithLoss) *partial = bs[2] * ee + acc_t(2) * bs[3] * eah + bs[4] * a_hat;
  if (OP == UnitOp::kGrad) {
#pragma omp simd
    for (int64_t k = 0; k < din; ++k) {
      o[k] = static_cast<scalar_t>(beta_hat * static_cast<acc_t>(ah[k]) - s * static_cast<acc_t>(a[k]));
    }
  } else if (OP == UnitOp::kProx) {
#pragma omp simd
    for (int64_t k = 0; k < din; ++k) {
      const acc_t xh = static_cast<acc_t>(ah[k]);
      const acc_t g = beta_hat * xh - s * static_cast<acc_t>(a[k]);
      o[k] = static_cast<scalar_t>(soft(xh - lr * g, thr));
    }
  }
}

// Pass 3 on `rows` rows of B, B̂: the rows of ∂/∂B̂ or of the new B̂ into o, from the
// adapter's â, c (r each).
template <UnitOp OP, typename scalar_t, typename acc_t>
TROPFAST_INLINE void b_rows(const scalar_t* B, const scalar_t* Bh, int64_t rows, int64_t r, const acc_t* a_hat,
                            const acc_t* c, acc_t lr, acc_t thr, scalar_t* o) {
  for (int64_t j = 0; j < rows; ++j) {
    const scalar_t* bj = B + j * r;
    const scalar_t* hj = Bh + j * r;
    scalar_t* oj = o + j * r;
    if (OP == UnitOp::kGrad) {
#pragma omp simd
      for (int64_t i = 0; i < r; ++i) {
        const acc_t b = static_cast<acc_t>(bj[i]), bh = static_cast<acc_t>(hj[i]);
        const acc_t same = (b * bh) > acc_t(0) ? b : acc_t(0);
        oj[i] = static_cast<scalar_t>(a_hat[i] * bh - c[i] * same);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < r; ++i) {
        const acc_t b = static_cast<acc_t>(bj[i]), bh = static_cast<acc_t>(hj[i]);
        const acc_t same = (b * bh) > acc_t(0) ? b : acc_t(0);
        const acc_t g = a_hat[i] * bh - c[i] * same;
        oj[i] = static_cast<scalar_t>(soft(bh - lr * g, thr));
      }
    }
  }
}

// The SIMD clones of the three passes for float and double, one per pass and type; the op
// is a runtime argument, switched on once per call, outside the vector loops.
#define TROPFAST_UNIT_PASS_CLONES(T, SUF)                                                                            \
  TROPFAST_SIMD_CLONES void b_sums_##SUF(UnitOp op, const T* B, const T* Bh, int64_t rows, int64_t r, T* out) {    \
    if (op == UnitOp::kProx) {                                                                                     \
      b_sums<false>(B, Bh, rows, r, out);                                                                          \
    } else {                                                                                                       \
      b_sums<true>(B, Bh, rows, r, out);                                                                           \
    }                                                                                                              \
  }                                                                                                                \
  TROPFAST_SIMD_CLONES void a_unit_##SUF(UnitOp op, const T* a, const T* ah, int64_t din, const T* bs, T lr, T thr, \
                                         T* o, T* sums, T* partial) {                                              \
    switch (op) {                                                                                                  \
      case UnitOp::kLoss: a_unit<UnitOp::kLoss>(a, ah, din, bs, lr, thr, o, sums, partial); break;                 \
      case UnitOp::kGrad: a_unit<UnitOp::kGrad>(a, ah, din, bs, lr, thr, o, sums, partial); break;                 \
      case UnitOp::kProx: a_unit<UnitOp::kProx>(a, ah, din, bs, lr, thr, o, sums, partial); break;                 \
    }                                                                                                              \
  }                                                                                                                \
  TROPFAST_SIMD_CLONES void b_rows_##SUF(UnitOp op, const T* B, const T* Bh, int64_t rows, int64_t r,              \
                                         const T* a_hat, const T* c, T lr, T thr, T* o) {                          \
    if (op == UnitOp::kGrad) {                                                                                     \
      b_rows<UnitOp::kGrad>(B, Bh, rows, r, a_hat, c, lr, thr, o);                                                 \
    } else {                                                                                                       \
      b_rows<UnitOp::kProx>(B, Bh, rows, r, a_hat, c, lr, thr, o);                                                 \
    }                                                                                                              \
  }

TROPFAST_UNIT_PASS_CLONES(float, f32)
TROPFAST_UNIT_PASS_CLONES(double, f64)
#undef TROPFAST_UNIT_PASS_CLONES

// soft_threshold's pass: one run of entries that share a threshold (elementwise, so every
// width gives the same bits; the clones run at about the speed of a copy, the baseline SSE2
// build at about half of it).
template <typename scalar_t, typename acc_t>
void soft_run(const scalar_t* px, acc_t t, int64_t n, scalar_t* po) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) po[k] = static_cast<scalar_t>(soft(static_cast<acc_t>(px[k]), t));
}

TROPFAST_SIMD_CLONES void soft_run_f32(const float* px, float t, int64_t n, float* po) { soft_run(px, t, n, po); }
TROPFAST_SIMD_CLONES void soft_run_f64(const double* px, double t, int64_t n, double* po) { soft_run(px, t, n, po); }

// Half and bfloat16 run the float clones too (float is their compute type): each dispatcher
// widens the rows it is given into per-thread float buffers, exactly, and rounds its output
// rows back to nearest even, as c10's casts do.  So a half op returns the float op's result on
// the widened inputs, rounded once; the conversions inside the passes' own loops would not
// vectorise (10-35x a copy of the inputs, against 1-2x for float).
#if TROPFAST_X86_VEC
TROPFAST_SIMD_CLONES void widen_bf16(const at::BFloat16* s, int64_t n, float* d) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<float>(s[k]);  // the bits shifted: vectorises
}
// c10's round_to_nearest_even, branch-free: NaN -> 0x7FC0, else the bits rounded to 16
TROPFAST_SIMD_CLONES void narrow_bf16(const float* s, int64_t n, at::BFloat16* d) {
  uint16_t* out = reinterpret_cast<uint16_t*>(d);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u;
    std::memcpy(&u, s + k, sizeof(u));
    const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
    out[k] = (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}
// IEEE half through GCC's _Float16 (F16C in the wider clones): exact widening, rounding to
// nearest even, as c10's software conversion
TROPFAST_SIMD_CLONES void widen_f16(const at::Half* s, int64_t n, float* d) {
  const _Float16* in = reinterpret_cast<const _Float16*>(s);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<float>(in[k]);
}
TROPFAST_SIMD_CLONES void narrow_f16(const float* s, int64_t n, at::Half* d) {
  _Float16* out = reinterpret_cast<_Float16*>(d);
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<_Float16>(s[k]);
}
#endif

template <typename scalar_t>
void widen(const scalar_t* s, int64_t n, float* d) {
#if TROPFAST_X86_VEC
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return widen_bf16(s, n, d);
  if constexpr (std::is_same_v<scalar_t, at::Half>) return widen_f16(s, n, d);
#endif
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<float>(s[k]);
}

template <typename scalar_t>
void narrow(const float* s, int64_t n, scalar_t* d) {
#if TROPFAST_X86_VEC
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return narrow_bf16(s, n, d);
  if constexpr (std::is_same_v<scalar_t, at::Half>) return narrow_f16(s, n, d);
#endif
  for (int64_t k = 0; k < n; ++k) d[k] = static_cast<scalar_t>(s[k]);
}

// Per-thread float buffers for the widened rows: slot k holds at least n floats.
inline float* scratch(int k, int64_t n) {
  thread_local std::vector<float> bufs[3];
  if (static_cast<int64_t>(bufs[k].size()) < n) bufs[k].resize(static_cast<size_t>(n));
  return bufs[k].data();
}

// Widened copies of two runs of n entries, in buffers 0 and 1.
template <typename scalar_t>
std::pair<float*, float*> widened(const scalar_t* x, const scalar_t* y, int64_t n) {
  float *fx = scratch(0, n), *fy = scratch(1, n);
  widen(x, n, fx);
  widen(y, n, fy);
  return {fx, fy};
}

template <typename scalar_t>
constexpr bool kHalfType = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

template <UnitOp OP, typename scalar_t, typename acc_t>
void pass_b_sums(const scalar_t* B, const scalar_t* Bh, int64_t rows, int64_t r, acc_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    b_sums_f32(OP, B, Bh, rows, r, out);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    b_sums_f64(OP, B, Bh, rows, r, out);
  } else {
    static_assert(kHalfType<scalar_t>);
    const auto [b, bh] = widened(B, Bh, rows * r);
    b_sums_f32(OP, b, bh, rows, r, out);
  }
}

template <UnitOp OP, typename scalar_t, typename acc_t>
void pass_a_unit(const scalar_t* a, const scalar_t* ah, int64_t din, const acc_t* bs, acc_t lr, acc_t thr, scalar_t* o,
                 acc_t* sums, acc_t* partial) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a_unit_f32(OP, a, ah, din, bs, lr, thr, o, sums, partial);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    a_unit_f64(OP, a, ah, din, bs, lr, thr, o, sums, partial);
  } else {
    static_assert(kHalfType<scalar_t>);
    const auto [fa, fah] = widened(a, ah, din);
    float* fo = o == nullptr ? nullptr : scratch(2, din);
    a_unit_f32(OP, fa, fah, din, bs, lr, thr, fo, sums, partial);
    if (o != nullptr) narrow(fo, din, o);
  }
}

template <UnitOp OP, typename scalar_t, typename acc_t>
void pass_b_rows(const scalar_t* B, const scalar_t* Bh, int64_t rows, int64_t r, const acc_t* a_hat, const acc_t* c,
                 acc_t lr, acc_t thr, scalar_t* o) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    b_rows_f32(OP, B, Bh, rows, r, a_hat, c, lr, thr, o);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    b_rows_f64(OP, B, Bh, rows, r, a_hat, c, lr, thr, o);
  } else {
    static_assert(kHalfType<scalar_t>);
    const int64_t n = rows * r;
    const auto [b, bh] = widened(B, Bh, n);
    float* fo = scratch(2, n);
    b_rows_f32(OP, b, bh, rows, r, a_hat, c, lr, thr, fo);
    narrow(fo, n, o);
  }
}

template <typename scalar_t, typename acc_t>
void pass_soft(const scalar_t* px, acc_t t, int64_t n, scalar_t* po) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    soft_run_f32(px, t, n, po);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    soft_run_f64(px, t, n, po);
  } else {
    static_assert(kHalfType<scalar_t>);
    float* x = scratch(0, n);
    widen(px, n, x);
    soft_run_f32(x, t, n, x);
    narrow(x, n, po);
  }
}

template <UnitOp OP, typename scalar_t>
void unit_pass_kernel(const UnitPassArgs<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = p.L, r = p.r, din = p.din, dout = p.dout;
  const int64_t chunks = (dout + kRows - 1) / kRows;
  constexpr bool kWithLoss = OP != UnitOp::kProx;  // hsd_loss and hsd_grad return the loss
  const int nb = kWithLoss ? kBSums : 2;
  // bsum[l][chunk][n][i] then, after the combine, bsum[l][0][n][i]; asum[l][n][i]
  std::vector<acc_t> bsum(static_cast<size_t>(L * chunks * nb * r));
  std::vector<acc_t> asum(static_cast<size_t>(L * kASums * r));
  const int64_t bytes = (din + dout) * 4;  // work per unit of a pass, for the team size
#pragma omp parallel num_threads(team_size(L * r, bytes))
  {
    // Pass 1: unit sums of the rows of B and B̂, one chunk of rows per task.
#pragma omp for schedule(static)
    for (int64_t task = 0; task < L * chunks; ++task) {
      const int64_t l = task / chunks, ch = task % chunks;
      const int64_t j0 = ch * kRows, j1 = std::min(dout, j0 + kRows);
      const int64_t off = (l * dout + j0) * r;
      pass_b_sums<OP>(p.B + off, p.Bh + off, j1 - j0, r, bsum.data() + task * nb * r);
    }
    // Combine the chunks of each adapter in order (into chunk 0).
#pragma omp for schedule(static)
    for (int64_t l = 0; l < L; ++l) {
      acc_t* first = bsum.data() + l * chunks * nb * r;
      for (int64_t ch = 1; ch < chunks; ++ch) {
        const acc_t* part = first + ch * nb * r;
#pragma omp simd
        for (int64_t n = 0; n < nb * r; ++n) first[n] += part[n];
      }
    }
    // Pass 2: the rows of A and Â: their sums, then the row of ∂/∂Â or the new Â.
#pragma omp for schedule(static)
    for (int64_t u = 0; u < L * r; ++u) {
      const int64_t l = u / r, i = u % r;
      const acc_t* bs = bsum.data() + l * chunks * nb * r;
      acc_t unit_b[kBSums];
      for (int n = 0; n < nb; ++n) unit_b[n] = bs[n * r + i];
      const acc_t lr = OP == UnitOp::kProx ? p.lr[l] : acc_t(0);
      const acc_t thr = OP == UnitOp::kProx ? lr * p.lam1[l] : acc_t(0);
      acc_t sums[2];
      acc_t* as = asum.data() + l * kASums * r;
      pass_a_unit<OP>(p.A + u * din, p.Ah + u * din, din, unit_b, lr, thr,
                      OP == UnitOp::kLoss ? nullptr : p.out_a + u * din, sums, kWithLoss ? p.partial + u : nullptr);
      as[i] = sums[0];
      as[r + i] = sums[1];
    }
    // Pass 3: the rows of B and B̂ again: the rows of ∂/∂B̂ or the new B̂, a chunk of rows per task.
    if (OP != UnitOp::kLoss) {
#pragma omp for schedule(static)
      for (int64_t task = 0; task < L * chunks; ++task) {
        const int64_t l = task / chunks, ch = task % chunks;
        const int64_t j0 = ch * kRows, j1 = std::min(dout, j0 + kRows);
        const int64_t off = (l * dout + j0) * r;
        const acc_t* as = asum.data() + l * kASums * r;
        const acc_t lr = OP == UnitOp::kProx ? p.lr[l] : acc_t(0);
        const acc_t thr = OP == UnitOp::kProx ? lr * p.lam2[l] : acc_t(0);
        pass_b_rows<OP>(p.B + off, p.Bh + off, j1 - j0, r, as, as + r, lr, thr, p.out_b + off);
      }
    }
  }
}

// loss[l] = ½ Σ_i partial[l, i], summed in unit order whatever the thread count.
template <typename scalar_t>
void reduce_loss(const at::opmath_type<scalar_t>* partial, int64_t L, int64_t r, scalar_t* loss) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t l = 0; l < L; ++l) {
    acc_t sum = 0;
    for (int64_t i = 0; i < r; ++i) sum += partial[l * r + i];
    loss[l] = static_cast<scalar_t>(acc_t(0.5) * sum);
  }
}

struct UnitPassOut {
  at::Tensor loss, outA, outB;
};

template <UnitOp OP>
UnitPassOut unit_pass(const char* name, const Batch& x, const at::Tensor* lr_, const at::Tensor* lam1_,
                      const at::Tensor* lam2_) {
  const int64_t L = x.L, units = x.L * x.r;
  const at::ScalarType ct = compute_type(x.A.scalar_type());
  UnitPassOut res;
  at::Tensor partial, lr, lam1, lam2;
  if (OP != UnitOp::kProx) {
    res.loss = at::empty({L}, x.A.options());
    partial = at::empty({units}, x.A.options().dtype(ct));
  }
  if (OP != UnitOp::kLoss) {
    res.outA = at::empty_like(x.Ah);
    res.outB = at::empty_like(x.Bh);
  }
  if (OP == UnitOp::kProx) {
    lr = param_vector(*lr_, L, ct, at::kCPU, name, "lr");
    lam1 = param_vector(*lam1_, L, ct, at::kCPU, name, "lam1");
    lam2 = param_vector(*lam2_, L, ct, at::kCPU, name, "lam2");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.A.scalar_type(), "tropfast_unit_pass_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    UnitPassArgs<scalar_t> p;
    p.A = x.A.data_ptr<scalar_t>();
    p.B = x.B.data_ptr<scalar_t>();
    p.Ah = x.Ah.data_ptr<scalar_t>();
    p.Bh = x.Bh.data_ptr<scalar_t>();
    p.out_a = res.outA.defined() ? res.outA.data_ptr<scalar_t>() : nullptr;
    p.out_b = res.outB.defined() ? res.outB.data_ptr<scalar_t>() : nullptr;
    p.partial = partial.defined() ? partial.data_ptr<acc_t>() : nullptr;
    p.lr = lr.defined() ? lr.data_ptr<acc_t>() : nullptr;
    p.lam1 = lam1.defined() ? lam1.data_ptr<acc_t>() : nullptr;
    p.lam2 = lam2.defined() ? lam2.data_ptr<acc_t>() : nullptr;
    p.L = x.L;
    p.r = x.r;
    p.din = x.d_in;
    p.dout = x.d_out;
    unit_pass_kernel<OP, scalar_t>(p);
    if (OP != UnitOp::kProx) reduce_loss<scalar_t>(p.partial, x.L, x.r, res.loss.data_ptr<scalar_t>());
  });
  return res;
}

at::Tensor hsd_loss_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& Ah, const at::Tensor& Bh) {
  Batch x = make_batch("hsd_loss", A, B, &Ah, &Bh);
  UnitPassOut res = unit_pass<UnitOp::kLoss>("hsd_loss", x, nullptr, nullptr, nullptr);
  return x.squeeze ? res.loss.squeeze(0) : res.loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hsd_grad_cpu(const at::Tensor& A, const at::Tensor& B,
                                                            const at::Tensor& Ah, const at::Tensor& Bh) {
  Batch x = make_batch("hsd_grad", A, B, &Ah, &Bh);
  UnitPassOut res = unit_pass<UnitOp::kGrad>("hsd_grad", x, nullptr, nullptr, nullptr);
  return {x.squeeze ? res.loss.squeeze(0) : res.loss, finish(res.outA, x.squeeze, Ah),
          finish(res.outB, x.squeeze, Bh)};
}

std::tuple<at::Tensor, at::Tensor> prox_step_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& Ah,
                                                 const at::Tensor& Bh, const at::Tensor& lr, const at::Tensor& lam1,
                                                 const at::Tensor& lam2) {
  Batch x = make_batch("prox_step", A, B, &Ah, &Bh);
  UnitPassOut res = unit_pass<UnitOp::kProx>("prox_step", x, &lr, &lam1, &lam2);
  return {finish(res.outA, x.squeeze, Ah), finish(res.outB, x.squeeze, Bh)};
}

// ------------------------------------------------------------------------------------------
// soft_threshold: elementwise; a per-adapter tau (L,) applies to X[l] of a batched X.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
void soft_threshold_kernel(const scalar_t* px, const at::opmath_type<scalar_t>* pt, int64_t n, int64_t inner,
                           scalar_t* po) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(team_size(chunks, kChunk))
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
    for (int64_t start = lo; start < hi;) {
      const int64_t o = start / inner;
      const int64_t stop = std::min(hi, (o + 1) * inner);
      pass_soft(px + start, pt[o], stop - start, po + start);
      start = stop;
    }
  }
}

at::Tensor soft_threshold_cpu(const at::Tensor& X_, const at::Tensor& tau_) {
  check_dtype(X_, "soft_threshold", "X");
  const bool per_adapter = tau_.numel() != 1;
  TORCH_CHECK(tau_.dim() <= 1, "soft_threshold: tau must have shape () or (L,), got ", tau_.sizes());
  TORCH_CHECK(!per_adapter || (X_.dim() == 3 && tau_.numel() == X_.size(0)), "soft_threshold: a per-adapter tau of shape ",
              tau_.sizes(), " needs a batched X of shape (L, m, n) with L = ", tau_.numel(), ", got X ", X_.sizes());
  const at::ScalarType ct = compute_type(X_.scalar_type());
  const int64_t outer = per_adapter ? X_.size(0) : 1;
  at::Tensor tau = param_vector(tau_, outer, ct, at::kCPU, "soft_threshold", "tau");
  at::Tensor X = X_.contiguous();
  at::Tensor out = at::empty_like(X);
  const int64_t n = X.numel();
  const int64_t inner = outer > 0 ? n / outer : 0;
  if (n == 0) return finish(out, false, X_);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "tropfast_soft_threshold_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    soft_threshold_kernel<scalar_t>(X.data_ptr<scalar_t>(), tau.data_ptr<acc_t>(), n, inner,
                                    out.data_ptr<scalar_t>());
  });
  return finish(out, false, X_);
}


TROPFAST_SIMD_CLONES void solve_unit_f32(simd::UnitScratch<float>& u, int method, float lr, float lam1, float lam2,
                                         int64_t steps, float tiny, float lg) {
  simd::solve(u, method, lr, lam1, lam2, steps, tiny, lg);
}

TROPFAST_SIMD_CLONES void solve_unit_f64(simd::UnitScratch<double>& u, int method, double lr, double lam1,
                                         double lam2, int64_t steps, double tiny, double lg) {
  simd::solve(u, method, lr, lam1, lam2, steps, tiny, lg);
}

TROPFAST_SIMD_CLONES void stats_unit_f32(const simd::UnitScratch<float>& u, float lam1, float lam2, float lg,
                                         float* out) {
  simd::stats(u, lam1, lam2, lg, out);
}

TROPFAST_SIMD_CLONES void stats_unit_f64(const simd::UnitScratch<double>& u, double lam1, double lam2, double lg,
                                         double* out) {
  simd::stats(u, lam1, lam2, lg, out);
}

// The unit's stats (simd::stats); for half precision the nonzeros are those of the values as
// stored, rounded to the input dtype, so they are counted again from the rounded values.  lg:
// the generator penalty, which F includes (0: none).
template <typename scalar_t, typename acc_t>
void unit_stats(const simd::UnitScratch<acc_t>& u, int64_t din, int64_t dout, acc_t lam1, acc_t lam2, acc_t lg,
                acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    stats_unit_f32(u, lam1, lam2, lg, out);
  } else {
    stats_unit_f64(u, lam1, lam2, lg, out);
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    int64_t nnz = 0;
    for (int64_t k = 0; k < din; ++k) nnz += static_cast<acc_t>(static_cast<scalar_t>(u.ah[k])) != acc_t(0);
    for (int64_t j = 0; j < dout; ++j) nnz += static_cast<acc_t>(static_cast<scalar_t>(u.bh[j])) != acc_t(0);
    out[2] = static_cast<acc_t>(nnz);
  }
}

// ISTA and FISTA without the generator penalty run the explicit-vector loops of the CPU's
// width (ista_x86.h); everything else the SIMD clones above.
inline void solve_unit(simd::UnitScratch<float>& u, int method, float lr, float lam1, float lam2, int64_t steps,
                       float tiny, float lg = 0.0f) {
  if (!(lg > 0.0f) && x86::solve(u, method, lr, lam1, lam2, steps)) return;
  solve_unit_f32(u, method, lr, lam1, lam2, steps, tiny, lg);
}

inline void solve_unit(simd::UnitScratch<double>& u, int method, double lr, double lam1, double lam2, int64_t steps,
                       double tiny, double lg = 0.0) {
  if (!(lg > 0.0) && x86::solve(u, method, lr, lam1, lam2, steps)) return;
  solve_unit_f64(u, method, lr, lam1, lam2, steps, tiny, lg);
}

// ------------------------------------------------------------------------------------------
// solve_fused: every iteration of a unit in thread-local buffers; one read and one write of
// the weights whatever the number of steps.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
void solve_fused_kernel(const scalar_t* A, const scalar_t* B, const at::opmath_type<scalar_t>* lam1,
                        const at::opmath_type<scalar_t>* lam2, const at::opmath_type<scalar_t>* lr, Method method,
                        int64_t steps, int64_t L, int64_t r, int64_t din, int64_t dout, scalar_t* oA, scalar_t* oB,
                        at::opmath_type<scalar_t>* stats, const at::opmath_type<scalar_t>* lam_gen = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tiny = std::numeric_limits<acc_t>::min();  // torch.finfo(dtype).tiny
  const int64_t groups = L * ((r + kGroup - 1) / kGroup);
  const int threads = team_size(groups, kGroup * (din + dout) * std::max<int64_t>(steps, 1));
  for_unit_groups(A, B, L, r, din, dout, oA, oB, threads, [&](int64_t l, int64_t u, simd::UnitScratch<acc_t>& ub) {
    ub.start();
    const acc_t lg = lam_gen != nullptr ? lam_gen[l] : acc_t(0);
    solve_unit(ub, static_cast<int>(method), lr[l], lam1[l], lam2[l], steps, tiny, lg);
    unit_stats<scalar_t>(ub, din, dout, lam1[l], lam2[l], lg, stats + kStats * u);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_fused_cpu(const at::Tensor& A_, const at::Tensor& B_,
                                                               const at::Tensor& lam1_, const at::Tensor& lam2_,
                                                               const at::Tensor& lr_, c10::string_view method_,
                                                               int64_t steps,
                                                               const c10::optional<at::Tensor>& lam_gen_) {
  const SolveInput in = solve_input("solve_fused", A_, B_, lam1_, lam2_, lr_, method_, steps, at::kCPU, lam_gen_);
  const Batch& x = in.x;
  const Method method = in.method;
  const at::Tensor &lam1 = in.lam1, &lam2 = in.lam2, &lr = in.lr;
  const int64_t L = x.L;
  at::Tensor outA = at::empty_like(x.A);
  at::Tensor outB = at::empty_like(x.B);
  at::Tensor per_unit = at::zeros({L * x.r, kStats}, x.A.options().dtype(compute_type(x.A.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.A.scalar_type(), "tropfast_solve_fused_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    solve_fused_kernel<scalar_t>(x.A.data_ptr<scalar_t>(), x.B.data_ptr<scalar_t>(), lam1.data_ptr<acc_t>(),
                                 lam2.data_ptr<acc_t>(), lr.data_ptr<acc_t>(), method, steps, L, x.r, x.d_in,
                                 x.d_out, outA.data_ptr<scalar_t>(), outB.data_ptr<scalar_t>(),
                                 per_unit.data_ptr<acc_t>(), in.gen ? in.lam_gen.data_ptr<acc_t>() : nullptr);
  });
  return {finish(outA, x.squeeze, A_), finish(outB, x.squeeze, B_), adapter_stats(per_unit, L, x.r, x.squeeze)};
}

// ------------------------------------------------------------------------------------------
// solve_sorted: per unit, sort |A_i| and |B_{:,i}| once, run the scalar recurrences of
// sorted.h, and write the iterate straight from the unit's final state.  A unit whose ISTA
// iterate leaves the sorted form runs the dense loop (the same iterates: units are independent).
// ------------------------------------------------------------------------------------------
// Magnitudes sorted by an LSD radix sort on their bit patterns (for x >= 0 the IEEE bits,
// read as an unsigned integer, are ordered as the values), a byte per pass, skipping the
// bytes every key shares: a few passes over d numbers instead of d log d comparisons.
template <typename S>
struct SortedBuffer {
  using K = std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>;
  std::vector<K> keys, tmp;
  std::vector<S> x;
  std::vector<double> p1, p2;
  explicit SortedBuffer(int64_t n) : keys(n), tmp(n), x(n), p1(n + 1), p2(n + 1) {}
  int64_t capacity() const { return static_cast<int64_t>(keys.size()); }

  // |v| sorted descending with its prefix sums, summed from the largest entry down.  One
  // pass counts every byte of every key; then one scatter pass per byte that the keys do
  // not all share.  The magnitudes of one unit have few distinct exponents, so consecutive
  // keys often share their high bytes: counting into two tables and scattering two keys a
  // step keep those from serialising on one counter.
  sorted::Sorted<S> build(const S* v, int64_t n) {
    constexpr int kBytes = static_cast<int>(sizeof(K));
    uint32_t count[2][kBytes][256];
    std::memset(count, 0, sizeof(count));
    for (int64_t k = 0; k < n; ++k) {
      const S a = std::abs(v[k]);
      K key;
      std::memcpy(&key, &a, sizeof(S));
      keys[k] = key;
      uint32_t(*c)[256] = count[k & 1];
      for (int b = 0; b < kBytes; ++b) ++c[b][(key >> (8 * b)) & 0xff];
    }
    K* src = keys.data();
    K* dst = tmp.data();
    for (int b = 0; b < kBytes && n > 0; ++b) {
      const int shift = 8 * b;
      uint32_t c[256];
      uint32_t start = 0;
      bool shared = false;
      for (int d = 0; d < 256; ++d) {
        const uint32_t here = count[0][b][d] + count[1][b][d];
        shared |= here == static_cast<uint32_t>(n);
        c[d] = start;
        start += here;
      }
      if (shared) continue;  // a byte all keys share
      int64_t k = 0;
      for (; k + 1 < n; k += 2) {
        const K s0 = src[k], s1 = src[k + 1];
        const uint32_t d0 = (s0 >> shift) & 0xff, d1 = (s1 >> shift) & 0xff;
        const uint32_t q0 = c[d0];
        const uint32_t q1 = d0 == d1 ? q0 + 1 : c[d1];
        dst[q0] = s0;
        dst[q1] = s1;
        c[d0] = q0 + 1;
        c[d1] = q1 + 1;
      }
      if (k < n) dst[c[(src[k] >> shift) & 0xff]++] = src[k];
      std::swap(src, dst);
    }
    // The prefix sums in two chains (the larger half, then the smaller half from zero, which
    // then gets the first half's total): half the latency of one chain of additions.
    const int64_t h = n / 2;
    p1[0] = p2[0] = 0;
    double s1 = 0, s2 = 0, t1 = 0, t2 = 0;
    for (int64_t k = 0; k < h; ++k) {
      std::memcpy(&x[k], &src[n - 1 - k], sizeof(S));  // ascending keys, read backwards
      std::memcpy(&x[h + k], &src[n - 1 - h - k], sizeof(S));
      const double u = static_cast<double>(x[k]), w = static_cast<double>(x[h + k]);
      s1 += u;
      s2 += u * u;
      t1 += w;
      t2 += w * w;
      p1[k + 1] = s1;
      p2[k + 1] = s2;
      p1[h + k + 1] = t1;
      p2[h + k + 1] = t2;
    }
    if (n > 2 * h) {  // an odd count: the last, smallest entry
      std::memcpy(&x[n - 1], &src[0], sizeof(S));
      const double w = static_cast<double>(x[n - 1]);
      p1[n] = t1 + w;
      p2[n] = t2 + w * w;
    }
    for (int64_t k = h + 1; k <= n; ++k) {
      p1[k] += s1;
      p2[k] += s2;
    }
    return {x.data(), p1.data(), p2.data(), n};
  }
};

template <typename scalar_t>
void solve_sorted_kernel(const scalar_t* A, const scalar_t* B, const at::opmath_type<scalar_t>* lam1,
                         const at::opmath_type<scalar_t>* lam2, const at::opmath_type<scalar_t>* lr, Method method,
                         int64_t steps, int64_t L, int64_t r, int64_t din, int64_t dout, scalar_t* oA, scalar_t* oB,
                         at::opmath_type<scalar_t>* stats, const at::opmath_type<scalar_t>* lam_gen = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  const int64_t groups = L * ((r + kGroup - 1) / kGroup);
  // the sort dominates: a few passes per unit, whatever the number of steps
  const int threads = team_size(groups, kGroup * (din + dout) * 16);
  for_unit_groups(A, B, L, r, din, dout, oA, oB, threads, [&](int64_t l, int64_t u, simd::UnitScratch<acc_t>& ub) {
    thread_local std::unique_ptr<SortedBuffer<acc_t>> sa, sb;
    if (!sa || sa->capacity() < din) sa = std::make_unique<SortedBuffer<acc_t>>(din);
    if (!sb || sb->capacity() < dout) sb = std::make_unique<SortedBuffer<acc_t>>(dout);
    ub.clear_padding();
    const sorted::Sorted<acc_t> SA = sa->build(ub.a, din);
    const sorted::Sorted<acc_t> SB = sb->build(ub.b, dout);
    const double l1 = lam1[l], l2 = lam2[l];
    const acc_t lg = lam_gen != nullptr ? lam_gen[l] : acc_t(0);
    if (method == kBcd) {
      sorted::BcdState<acc_t> st;
      sorted::bcd_unit(SA, SB, l1, l2, steps, &st, true, static_cast<double>(lg));
      const double loA = sorted::smallest_kept(SA, st.jA), loB = sorted::smallest_kept(SB, st.jB);
      for (int64_t k = 0; k < din; ++k) ub.ah[k] = sorted::piece_value(ub.a[k], st.kA, st.mA, loA);
      for (int64_t j = 0; j < dout; ++j) ub.bh[j] = sorted::piece_value(ub.b[j], st.kB, st.mB, loB);
    } else {
      sorted::IstaState st;
      sorted::ista_unit(SA, SB, l1, l2, static_cast<double>(lr[l]), steps, &st, static_cast<double>(lg));
      if (st.bad) {
        ub.start();
        solve_unit(ub, kIsta, lr[l], lam1[l], lam2[l], steps, tiny, lg);
      } else {
        const double loB = sorted::smallest_kept(SB, st.jB);
        const sorted::Pieces pieces(SA, st);
        for (int64_t k = 0; k < din; ++k) ub.ah[k] = static_cast<acc_t>(pieces.value(ub.a[k]));
        for (int64_t j = 0; j < dout; ++j) {
          ub.bh[j] = static_cast<acc_t>(sorted::piece_value<double>(ub.b[j], st.kB, st.mB, loB));
        }
      }
    }
    unit_stats<scalar_t>(ub, din, dout, lam1[l], lam2[l], lg, stats + kStats * u);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_sorted_cpu(const at::Tensor& A_, const at::Tensor& B_,
                                                    const at::Tensor& lam1_, const at::Tensor& lam2_,
                                                    const at::Tensor& lr_, c10::string_view method_, int64_t steps,
                                                    const c10::optional<at::Tensor>& lam_gen_) {
  const SolveInput in = solve_input("solve_sorted", A_, B_, lam1_, lam2_, lr_, method_, steps, at::kCPU, lam_gen_);
  // fista has no sorted form; steps = 0 leaves nothing to sort
  if (in.method == kFista || steps == 0) return solve_fused_cpu(A_, B_, lam1_, lam2_, lr_, method_, steps, lam_gen_);
  const Batch& x = in.x;
  const Method method = in.method;
  const at::Tensor &lam1 = in.lam1, &lam2 = in.lam2, &lr = in.lr;
  const int64_t L = x.L;
  at::Tensor outA = at::empty_like(x.A);
  at::Tensor outB = at::empty_like(x.B);
  at::Tensor per_unit = at::zeros({L * x.r, kStats}, x.A.options().dtype(compute_type(x.A.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.A.scalar_type(), "tropfast_solve_sorted_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    solve_sorted_kernel<scalar_t>(x.A.data_ptr<scalar_t>(), x.B.data_ptr<scalar_t>(), lam1.data_ptr<acc_t>(),
                                  lam2.data_ptr<acc_t>(), lr.data_ptr<acc_t>(), method, steps, L, x.r, x.d_in,
                                  x.d_out, outA.data_ptr<scalar_t>(), outB.data_ptr<scalar_t>(),
                                  per_unit.data_ptr<acc_t>(), in.gen ? in.lam_gen.data_ptr<acc_t>() : nullptr);
  });
  return {finish(outA, x.squeeze, A_), finish(outB, x.squeeze, B_), adapter_stats(per_unit, L, x.r, x.squeeze)};
}

}  // namespace

std::string simd_level() { return x86::level_name(x86::level()); }

std::string set_simd_level(const std::string& name) {
  int want = -1;
  for (int l : {x86::kGeneric, x86::kAvx2, x86::kAvx512}) {
    if (name == x86::level_name(l)) want = l;
  }
  TORCH_CHECK_VALUE(want >= 0, "set_simd_level: unknown level '", name, "'; the levels are generic, avx2 and avx512");
  return x86::level_name(x86::set_level(want));
}

TORCH_LIBRARY_IMPL(tropfast, CPU, m) {
  m.impl("generators", &generators_cpu);
  m.impl("hsd_loss", &hsd_loss_cpu);
  m.impl("hsd_grad", &hsd_grad_cpu);
  m.impl("soft_threshold", &soft_threshold_cpu);
  m.impl("prox_step", &prox_step_cpu);
  m.impl("solve_fused", &solve_fused_cpu);
  m.impl("solve_sorted", &solve_sorted_cpu);
}

}  // namespace cpu
}  // namespace tropfast
