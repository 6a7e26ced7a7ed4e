// Per-hidden-unit closed form (DESIGN.md §2) on contiguous buffers of the compute type.
// Unit i touches only A_i, Â_i (d_in numbers) and B_{:,i}, B̂_{:,i} (d_out numbers); every
// function here works on one unit, so the callers parallelise over (adapter, unit) pairs.
// The arithmetic follows torch_backend.py operation by operation, so the native results
// differ from the closed form only by the order of the summations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

namespace tropfast {
namespace cpu {

// Written as `x < 0 ? 0 : x` so that NaN propagates as in torch.relu / clamp_min: a diverging
// solve then fails the same way on every backend.
template <typename T>
inline T relu(T x) {
  return x < T(0) ? T(0) : x;
}

template <typename T>
inline T clamp_min(T x, T lo) {
  return x < lo ? lo : x;
}

// sign(z) * max(|z| - tau, 0); multiplying by the sign (not branching) keeps it vectorisable.
template <typename T>
inline T soft(T z, T tau) {
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
inline GradStats<T> grad_stats(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout) {
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
inline T unit_loss(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout, T a_hat) {
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
inline T sq_norm(const T* x, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += x[k] * x[k];
  return acc;
}

// ∂/∂Â_i = β̂ Â_i − s A_i ;  ∂/∂B̂_ji = â B̂_ji − c B_ji 1[B_ji B̂_ji > 0].
template <typename T>
inline void unit_grad(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout,
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
inline void unit_prox(const T* a, const T* ah, int64_t din, const T* b, const T* bh, int64_t dout,
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

// Scratch of one unit for the fused solver: originals, iterate, previous iterate and the
// FISTA extrapolation point, for Â (d_in each) and B̂ (d_out each).
template <typename T>
struct UnitBuffers {
  T *a, *ah, *ahp, *ya;
  T *b, *bh, *bhp, *yb;
  static int64_t size(int64_t din, int64_t dout) { return 4 * (din + dout); }
  UnitBuffers(T* base, int64_t din, int64_t dout)
      : a(base), ah(base + din), ahp(base + 2 * din), ya(base + 3 * din), b(base + 4 * din), bh(b + dout),
        bhp(b + 2 * dout), yb(b + 3 * dout) {}
};

// solver.dense_solve "ista" restricted to one unit: `steps` prox steps from (A_i, B_{:,i}).
template <typename T>
inline void unit_ista(UnitBuffers<T>& u, int64_t din, int64_t dout, T lr, T lam1, T lam2, int64_t steps) {
  const T thr_a = lr * lam1, thr_b = lr * lam2;
  for (int64_t t = 0; t < steps; ++t) {
    const GradStats<T> st = grad_stats(u.a, u.ah, din, u.b, u.bh, dout);
    unit_prox(u.a, u.ah, din, u.b, u.bh, dout, st, lr, thr_a, thr_b, u.ah, u.bh);
  }
}

// y = x + w (x − x_prev): the FISTA extrapolation point.
template <typename T>
inline void extrapolate(const T* __restrict__ x, const T* __restrict__ xp, T w, int64_t n, T* __restrict__ y) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] = x[k] + w * (x[k] - xp[k]);
}

// ⟨y − x⁺, x⁺ − x⟩ > 0 means the step went uphill (O'Donoghue & Candès gradient restart).
template <typename T>
inline T restart_term(const T* __restrict__ y, const T* __restrict__ xn, const T* __restrict__ x, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += (y[k] - xn[k]) * (xn[k] - x[k]);
  return acc;
}

// solver.fista_step on one unit: its momentum and its gradient restart are per unit already.
// The buffers are taken into local restrict pointers so the loops vectorise (through `u.`
// the compiler must assume a store can change the pointers themselves).
template <typename T>
inline void unit_fista(UnitBuffers<T>& u, int64_t din, int64_t dout, T lr, T lam1, T lam2, int64_t steps) {
  const T thr_a = lr * lam1, thr_b = lr * lam2;
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  T* __restrict__ ya = u.ya;
  T* __restrict__ yb = u.yb;
  T* ah = u.ah;
  T* ahp = u.ahp;
  T* bh = u.bh;
  T* bhp = u.bhp;
  std::copy(ah, ah + din, ahp);
  std::copy(bh, bh + dout, bhp);
  T mom = 1;
  for (int64_t t = 0; t < steps; ++t) {
    const T mom_next = (T(1) + std::sqrt(T(1) + T(4) * mom * mom)) / T(2);
    const T w = (mom - T(1)) / mom_next;
    extrapolate(ah, ahp, w, din, ya);
    extrapolate(bh, bhp, w, dout, yb);
    const GradStats<T> st = grad_stats(a, ya, din, b, yb, dout);
    // The new iterate overwrites the previous one (read only by the extrapolation above),
    // then the two buffers swap roles.
    unit_prox(a, ya, din, b, yb, dout, st, lr, thr_a, thr_b, ahp, bhp);
    const T up = restart_term(ya, ahp, ah, din) + restart_term(yb, bhp, bh, dout);
    std::swap(ah, ahp);
    std::swap(bh, bhp);
    mom = (up > T(0)) ? T(1) : mom_next;
  }
  u.ah = ah;
  u.ahp = ahp;
  u.bh = bh;
  u.bhp = bhp;
}

// solver._bcd_sweep on one unit: exact minimisation over Â_i, then B̂_{:,i}, then the free
// rescaling (tÂ_i, B̂_{:,i}/t).
template <typename T>
inline void unit_bcd(UnitBuffers<T>& u, int64_t din, int64_t dout, T lam1, T lam2, int64_t steps, T tiny) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  T* __restrict__ ah = u.ah;
  T* __restrict__ bh = u.bh;
  for (int64_t t = 0; t < steps; ++t) {
    T s = 0, beta_hat = 0;
#pragma omp simd reduction(+ : s, beta_hat)
    for (int64_t j = 0; j < dout; ++j) {
      s += relu(b[j] * bh[j]);
      beta_hat += bh[j] * bh[j];
    }
    // Â_i = S_λ1(s_i A_i) / β̂_i, zero when B̂_{:,i} = 0
    if (beta_hat > T(0)) {
      const T den_b = clamp_min(beta_hat, tiny);
#pragma omp simd
      for (int64_t k = 0; k < din; ++k) ah[k] = soft(s * a[k], lam1) / den_b;
    } else {
      std::fill(ah, ah + din, T(0));
    }
    T c = 0, a_hat = 0;
#pragma omp simd reduction(+ : c, a_hat)
    for (int64_t k = 0; k < din; ++k) {
      c += a[k] * ah[k];
      a_hat += ah[k] * ah[k];
    }
    // B̂_ji = sign(B_ji) · max(c_i |B_ji| − λ2, 0) / â_i when c_i > 0, else 0
    if (c > T(0) && a_hat > T(0)) {
      const T den = clamp_min(a_hat, tiny);
#pragma omp simd
      for (int64_t j = 0; j < dout; ++j) {
        const T sg = static_cast<T>(b[j] > T(0)) - static_cast<T>(b[j] < T(0));
        bh[j] = sg * (relu(c * std::abs(b[j]) - lam2) / den);
      }
    } else {
      std::fill(bh, bh + dout, T(0));
    }
    T na = 0, nb = 0;
#pragma omp simd reduction(+ : na)
    for (int64_t k = 0; k < din; ++k) na += std::abs(ah[k]);
#pragma omp simd reduction(+ : nb)
    for (int64_t j = 0; j < dout; ++j) nb += std::abs(bh[j]);
    if (na > T(0) && nb > T(0) && lam1 > T(0) && lam2 > T(0)) {
      const T sc = std::sqrt((lam2 * nb) / clamp_min(lam1 * na, tiny));
#pragma omp simd
      for (int64_t k = 0; k < din; ++k) ah[k] *= sc;
#pragma omp simd
      for (int64_t j = 0; j < dout; ++j) bh[j] /= sc;
    }
  }
}

}  // namespace cpu
}  // namespace tropfast
