// Per-hidden-unit closed form (docs/design.md §2) on contiguous buffers of the compute type.
// Unit i touches only A_i, Â_i (d_in numbers) and B_{:,i}, B̂_{:,i} (d_out numbers); every
// function here works on one unit, so the callers parallelise over (adapter, unit) pairs.
// The arithmetic follows torch_backend.py operation by operation, so the native results
// differ from the closed form only by the order of the summations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

// The solve loops are inlined into callers compiled for wider SIMD (ops.cpp's clones).
#if defined(__GNUC__)
#define TROPFAST_INLINE inline __attribute__((always_inline))
#else
#define TROPFAST_INLINE inline
#endif

namespace tropfast {
namespace cpu {

// Written as `x < 0 ? 0 : x` so that NaN propagates as in torch.relu / clamp_min: a diverging
// solve then fails the same way on every backend.
template <typename T>
TROPFAST_INLINE T relu(T x) {
  return x < T(0) ? T(0) : x;
}

template <typename T>
TROPFAST_INLINE T clamp_min(T x, T lo) {
  return x < lo ? lo : x;
}

// sign(z) * max(|z| - tau, 0); multiplying by the sign (not branching) keeps it vectorisable.
template <typename T>
TROPFAST_INLINE T soft(T z, T tau) {
  const T m = relu(std::abs(z) - tau);
  const T sg = static_cast<T>(z > T(0)) - static_cast<T>(z < T(0));
  return sg * m;
}

template <typename T>
struct GradStats {
  T a_hat, c, beta_hat, s;
};

// â = ‖Â_i‖², c = ⟨A_i, Â_i⟩, β̂ = ‖B̂_{:,i}‖², s = Σ_j relu(B_ji B̂_ji).
template <typename T>
TROPFAST_INLINE GradStats<T> grad_stats(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout) {
  T a_hat = 0, c = 0, beta_hat = 0, s = 0;
#pragma omp simd reduction(+ : a_hat, c)
  for (int64_t k = 0; k < din; ++k) {
    a_hat += ah[k] * ah[k];
    c += a[k] * ah[k];
  }
#pragma omp simd reduction(+ : beta_hat, s)
  for (int64_t j = 0; j < dout; ++j) {
    beta_hat += bh[j] * bh[j];
    s += relu(b[j] * bh[j]);
  }
  return {a_hat, c, beta_hat, s};
}

// β‖E_i‖² + 2 q_i ⟨E_i, Â_i⟩ + δ_i â_i with E = A − Â (torch_backend._loss): twice the unit's
// share of the loss, summed from differences so nothing cancels near Â = A.
template <typename T>
TROPFAST_INLINE T unit_loss(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout, T a_hat) {
  T ee = 0, eah = 0;
#pragma omp simd reduction(+ : ee, eah)
  for (int64_t k = 0; k < din; ++k) {
    const T e = a[k] - ah[k];
    ee += e * e;
    eah += e * ah[k];
  }
  T beta = 0, q = 0, delta = 0;
#pragma omp simd reduction(+ : beta, q, delta)
  for (int64_t j = 0; j < dout; ++j) {
    const T bp = relu(b[j]), bn = relu(-b[j]);
    const T dp = bp - relu(bh[j]), dn = bn - relu(-bh[j]);
    beta += b[j] * b[j];
    q += bp * dp + bn * dn;
    delta += dp * dp + dn * dn;
  }
  return beta * ee + T(2) * q * eah + delta * a_hat;
}

template <typename T>
TROPFAST_INLINE T sq_norm(const T* x, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += x[k] * x[k];
  return acc;
}

// ∂/∂Â_i = β̂ Â_i − s A_i ;  ∂/∂B̂_ji = â B̂_ji − c B_ji 1[B_ji B̂_ji > 0].
template <typename T>
TROPFAST_INLINE void unit_grad(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout,
                      const GradStats<T>& st, T* ga, T* gb) {
#pragma omp simd
  for (int64_t k = 0; k < din; ++k) ga[k] = st.beta_hat * ah[k] - st.s * a[k];
#pragma omp simd
  for (int64_t j = 0; j < dout; ++j) {
    const T same = (b[j] * bh[j]) > T(0) ? b[j] : T(0);
    gb[j] = st.a_hat * bh[j] - st.c * same;
  }
}

// One proximal-gradient step from (ah, bh) with the gradient statistics `st` taken there;
// writes (na, nb), which may alias (ah, bh).
template <typename T>
TROPFAST_INLINE void unit_prox(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout,
                      const GradStats<T>& st, T lr, T thr_a, T thr_b, T* na, T* nb) {
#pragma omp simd
  for (int64_t k = 0; k < din; ++k) {
    const T g = st.beta_hat * ah[k] - st.s * a[k];
    na[k] = soft(ah[k] - lr * g, thr_a);
  }
#pragma omp simd
  for (int64_t j = 0; j < dout; ++j) {
    const T same = (b[j] * bh[j]) > T(0) ? b[j] : T(0);
    const T g = st.a_hat * bh[j] - st.c * same;
    nb[j] = soft(bh[j] - lr * g, thr_b);
  }
}

}  // namespace cpu
}  // namespace tropfast
