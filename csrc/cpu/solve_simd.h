// The fused solve loops of one hidden unit (solve_fused on CPU).
//
// A unit's buffers (originals, iterate, previous iterate: 3·(d_in + d_out) numbers) stay in
// L1 for all T iterations, so these loops are compute-bound, not memory-bound.  So:
//   * one pass per iteration: the pass that writes the iterate also sums the statistics
//     the next iteration needs (â, c, β̂, s; FISTA: those of both possible extrapolation
//     points), so each element is touched once per step, not twice;
//   * few operations per element: the soft threshold is z − clamp(z, −τ, τ);
//   * vector loops (`omp simd`) that ops.cpp compiles for several SIMD widths;
//   * buffers padded with zeros and aligned: a zero original with a zero iterate stays zero
//     under every update below and adds nothing to any sum.
//   * sums kept per vector lane: a loop adds into kPad partial sums per statistic and the
//     lanes are added in a tree after it (`omp simd reduction` left GCC adding the lanes one by
//     one, 16 dependent additions per statistic and loop, as long as the loop itself at d = 384);
//   * the ISTA/FISTA gradient step in its affine form x·(1 − lr·β̂) + a·(lr·s): two operations
//     per element instead of four.
// The updates are those of torch_backend.py / unit.h; the ISTA/FISTA step rounds differently
// (the affine form) and the order of the summations differs.
// On x86-64 with GCC, ista() and fista() here are the specification: on CPUs with AVX2 or
// AVX-512, ops.cpp runs ista_x86.h's explicit-vector forms of them (without the generator
// penalty), which GCC cannot derive from these loops (it
// compiles the ternaries of soft3 and relu0 into compares and blends, not max and min).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "../cycle.h"
#include "unit.h"

namespace tropfast {
namespace cpu {
namespace simd {

// Buffers are padded to a multiple of this many elements (one 64-byte line of floats, two of doubles).
constexpr int64_t kPad = 16;

inline int64_t padded(int64_t n, int64_t trip) { return (n + trip - 1) / trip * trip; }

// Scratch of one unit: originals, iterate and previous iterate of Â (d_in) and B̂ (d_out),
// each padded with zeros to a multiple of kPad, each 64-byte aligned.
template <typename T>
class UnitScratch {
 public:
  UnitScratch(int64_t din, int64_t dout)
      : din_(din), dout_(dout), pin_(padded(din, kPad)), pout_(padded(dout, kPad)) {
    const int64_t n = 3 * (pin_ + pout_);
    base_ = static_cast<T*>(::operator new(sizeof(T) * std::max<int64_t>(n, 1), std::align_val_t(64)));
    std::fill(base_, base_ + n, T(0));
    a = base_;
    ah = a + pin_;
    ahp = ah + pin_;
    b = ahp + pin_;
    bh = b + pout_;
    bhp = bh + pout_;
  }
  ~UnitScratch() { ::operator delete(base_, std::align_val_t(64)); }
  UnitScratch(const UnitScratch&) = delete;
  UnitScratch& operator=(const UnitScratch&) = delete;

  // After a[0, din) and b[0, dout) were loaded: start from (Â, B̂) = (A, B) and make the
  // padding of every buffer zero again (a diverged solve may have left NaN there).
  void start() {
    clear_padding();
    std::copy(a, a + din_, ah);
    std::copy(b, b + dout_, bh);
  }

  // Zero the padding of every buffer (a diverged solve of an earlier unit may have left NaN).
  void clear_padding() {
    for (T* x : {a, ah, ahp}) std::fill(x + din_, x + pin_, T(0));
    for (T* x : {b, bh, bhp}) std::fill(x + dout_, x + pout_, T(0));
  }

  int64_t pin() const { return pin_; }
  int64_t pout() const { return pout_; }

  T *a, *ah, *ahp, *b, *bh, *bhp;

 private:
  int64_t din_, dout_, pin_, pout_;
  T* base_;
};

// sign(z)·max(|z| − tau, 0) as z − clamp(z, −tau, tau): the same values as unit.h's soft
// (z − tau and |z| − tau round alike; inside the band z − z is exactly 0) in two selects
// and a subtraction, against abs, subtract, max, two compares and a multiply.  A NaN z
// gives NaN whatever the clamp returns.
template <typename T>
TROPFAST_INLINE T soft3(T z, T tau) {
  const T lo = z > -tau ? z : -tau;
  const T c = lo < tau ? lo : tau;
  return z - c;
}

// The sum of kPad per-lane partial sums, added in a tree (v is overwritten).
template <typename T>
TROPFAST_INLINE T lanes_sum(T* v) {
  for (int w = static_cast<int>(kPad) / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) v[l] += v[l + w];
  }
  return v[0];
}

// relu written as max(0, x): NaN propagates, as in unit.h's relu.
template <typename T>
TROPFAST_INLINE T relu0(T x) {
  return T(0) > x ? T(0) : x;
}

// solver.dense_solve "ista" on one unit: `steps` prox steps, Â ← S(Â − lr(β̂Â − sA), lr λ1),
// B̂ ← S(B̂ − lr(âB̂ − c B·1[B B̂ > 0]), lr λ2), both from the statistics of the old point, the
// gradient step written as Â(1 − lr β̂) + A(lr s) and B̂(1 − lr â) + B·1[B B̂ > 0](lr c).
template <typename T>
TROPFAST_INLINE void ista(UnitScratch<T>& u, T lr, T lam1, T lam2, int64_t steps) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  T* __restrict__ ah = u.ah;
  T* __restrict__ bh = u.bh;
  const int64_t pin = u.pin(), pout = u.pout();
  const T thr_a = lr * lam1, thr_b = lr * lam2;
  GradStats<T> st = grad_stats(a, ah, pin, b, bh, pout);  // (â, c, β̂, s) at the start
  for (int64_t t = 0; t < steps; ++t) {
    const T ka = T(1) - lr * st.beta_hat, ga = lr * st.s;
    const T kb = T(1) - lr * st.a_hat, gb = lr * st.c;
    alignas(64) T q[kPad] = {}, c[kPad] = {}, w[kPad] = {}, s[kPad] = {};
    for (int64_t k0 = 0; k0 < pin; k0 += kPad) {
      const T* __restrict__ ak = a + k0;
      T* __restrict__ hk = ah + k0;
#pragma omp simd aligned(ak, hk, q, c : 64)
      for (int64_t l = 0; l < kPad; ++l) {
        const T x = soft3(ka * hk[l] + ga * ak[l], thr_a);
        hk[l] = x;
        q[l] += x * x;
        c[l] += ak[l] * x;
      }
    }
    for (int64_t j0 = 0; j0 < pout; j0 += kPad) {
      const T* __restrict__ bj = b + j0;
      T* __restrict__ hj = bh + j0;
#pragma omp simd aligned(bj, hj, w, s : 64)
      for (int64_t l = 0; l < kPad; ++l) {
        const T same = (bj[l] * hj[l]) > T(0) ? bj[l] : T(0);
        const T x = soft3(kb * hj[l] + gb * same, thr_b);
        hj[l] = x;
        w[l] += x * x;
        s[l] += relu0(bj[l] * x);
      }
    }
    st = {lanes_sum(q), lanes_sum(c), lanes_sum(w), lanes_sum(s)};
  }
}

// solver.fista_step on one unit (momentum and gradient restart are per unit), one pass per
// step: from x (iterate) and xp (previous iterate, overwritten by x⁺), y = x + w(x − xp) and
// x⁺ = S(y − lr·g(y)).  The pass sums the restart term ⟨y − x⁺, x⁺ − x⁺⟩ and the statistics of
// both possible next points, x⁺ (after a restart) and x⁺ + w'(x⁺ − x) (otherwise), from the
// elementwise values the next step recomputes.
template <typename T>
TROPFAST_INLINE void fista(UnitScratch<T>& u, T lr, T lam1, T lam2, int64_t steps) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  const int64_t pin = u.pin(), pout = u.pout();
  const T thr_a = lr * lam1, thr_b = lr * lam2;
  T* ah = u.ah;
  T* ahp = u.ahp;
  T* bh = u.bh;
  T* bhp = u.bhp;
  std::copy(ah, ah + pin, ahp);
  std::copy(bh, bh + pout, bhp);
  T mom = 1;
  T w = 0;  // this step's extrapolation weight (mom − 1) / mom_next; 0 at the start
  GradStats<T> st = grad_stats(a, ah, pin, b, bh, pout);  // at y = x
  for (int64_t t = 0; t < steps; ++t) {
    const T mom_next = (T(1) + std::sqrt(T(1) + T(4) * mom * mom)) / T(2);
    const T mom_next2 = (T(1) + std::sqrt(T(1) + T(4) * mom_next * mom_next)) / T(2);
    const T wn = (mom_next - T(1)) / mom_next2;  // next step's weight unless this one restarts
    const T ka = T(1) - lr * st.beta_hat, ga = lr * st.s;
    const T kb = T(1) - lr * st.a_hat, gb = lr * st.c;
    alignas(64) T upa[kPad] = {}, rq[kPad] = {}, rc[kPad] = {}, mq[kPad] = {}, mc[kPad] = {};
    alignas(64) T upb[kPad] = {}, rw[kPad] = {}, rs[kPad] = {}, mw[kPad] = {}, ms[kPad] = {};
    for (int64_t k0 = 0; k0 < pin; k0 += kPad) {
      const T* __restrict__ ak = a + k0;
      const T* __restrict__ x = ah + k0;
      T* __restrict__ xp = ahp + k0;
#pragma omp simd aligned(ak, x, xp, upa, rq, rc, mq, mc : 64)
      for (int64_t l = 0; l < kPad; ++l) {
        const T xk = x[l];
        const T y = xk + w * (xk - xp[l]);
        const T xn = soft3(ka * y + ga * ak[l], thr_a);
        xp[l] = xn;
        upa[l] += (y - xn) * (xn - xk);
        rq[l] += xn * xn;
        rc[l] += ak[l] * xn;
        const T ym = xn + wn * (xn - xk);
        mq[l] += ym * ym;
        mc[l] += ak[l] * ym;
      }
    }
    for (int64_t j0 = 0; j0 < pout; j0 += kPad) {
      const T* __restrict__ bj = b + j0;
      const T* __restrict__ x = bh + j0;
      T* __restrict__ xp = bhp + j0;
#pragma omp simd aligned(bj, x, xp, upb, rw, rs, mw, ms : 64)
      for (int64_t l = 0; l < kPad; ++l) {
        const T xk = x[l];
        const T y = xk + w * (xk - xp[l]);
        const T same = (bj[l] * y) > T(0) ? bj[l] : T(0);
        const T xn = soft3(kb * y + gb * same, thr_b);
        xp[l] = xn;
        upb[l] += (y - xn) * (xn - xk);
        rw[l] += xn * xn;
        rs[l] += relu0(bj[l] * xn);
        const T ym = xn + wn * (xn - xk);
        mw[l] += ym * ym;
        ms[l] += relu0(bj[l] * ym);
      }
    }
    const T up = lanes_sum(upa) + lanes_sum(upb);
    std::swap(ah, ahp);
    std::swap(bh, bhp);
    if (up > T(0)) {  // uphill: restart, the next y is x⁺ itself
      mom = T(1);
      w = T(0);
      st = {lanes_sum(rq), lanes_sum(rc), lanes_sum(rw), lanes_sum(rs)};
    } else {
      mom = mom_next;
      w = wn;
      st = {lanes_sum(mq), lanes_sum(mc), lanes_sum(mw), lanes_sum(ms)};
    }
  }
  u.ah = ah;
  u.ahp = ahp;
  u.bh = bh;
  u.bhp = bhp;
}

// The numbers that fix B̂_{:,i} after a sweep, and with it every later sweep: c and â (B̂'s
// magnitudes before the rescaling) and the rescaling.  The key of cycle.h's detector.
template <typename T>
struct DenseKey {
  T c, a_hat, sc;
  bool operator==(const DenseKey& o) const { return c == o.c && a_hat == o.a_hat && sc == o.sc; }
};

// dense.bcd_sweep on one unit: exact minimisation over Â_i, then B̂_{:,i}, then the free
// rescaling (tÂ_i, B̂_{:,i}/t).  Â is recomputed from A every sweep, so its rescaling is
// applied once, after the last sweep; B̂'s in the pass that sums the next sweep's statistics.
// With `early_exit` (docs/design.md §4), once the unit's state cycles only the sweeps up to the
// one that leaves what sweep `steps` leaves are run: the result is that of all `steps` sweeps,
// bit for bit (tests/backends/test_native_bcd_exit.py compiles both against each other).  Returns the
// sweeps run.
template <typename T>
TROPFAST_INLINE int64_t bcd(UnitScratch<T>& u, T lam1, T lam2, int64_t steps, T tiny, bool early_exit = true) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  T* __restrict__ ah = u.ah;
  T* __restrict__ bh = u.bh;
  const int64_t pin = u.pin(), pout = u.pout();
  T sc = 1;  // pending rescaling: Â ← sc·Â, B̂ ← B̂ / sc
  CycleDetector<DenseKey<T>> det(steps);
  int64_t t = 1;
  for (; t <= det.target; ++t) {
    T s = 0, beta_hat = 0;
    if (sc != T(1)) {
#pragma omp simd reduction(+ : s, beta_hat) aligned(b, bh : 64)
      for (int64_t j = 0; j < pout; ++j) {
        const T x = bh[j] / sc;
        bh[j] = x;
        s += relu0(b[j] * x);
        beta_hat += x * x;
      }
    } else {
#pragma omp simd reduction(+ : s, beta_hat) aligned(b, bh : 64)
      for (int64_t j = 0; j < pout; ++j) {
        s += relu0(b[j] * bh[j]);
        beta_hat += bh[j] * bh[j];
      }
    }
    sc = 1;
    // Â_i = S_λ1(s_i A_i) / β̂_i, zero when B̂_{:,i} = 0
    T c = 0, a_hat = 0, na = 0;
    if (beta_hat > T(0)) {
      const T den = clamp_min(beta_hat, tiny);
#pragma omp simd reduction(+ : c, a_hat, na) aligned(a, ah : 64)
      for (int64_t k = 0; k < pin; ++k) {
        const T x = soft3(s * a[k], lam1) / den;
        ah[k] = x;
        c += a[k] * x;
        a_hat += x * x;
        na += std::abs(x);
      }
    } else {
      std::fill(ah, ah + pin, T(0));
    }
    // B̂_ji = sign(B_ji) · max(c_i |B_ji| − λ2, 0) / â_i when c_i > 0, else 0
    T nb = 0;
    if (c > T(0) && a_hat > T(0)) {
      const T den = clamp_min(a_hat, tiny);
#pragma omp simd reduction(+ : nb) aligned(b, bh : 64)
      for (int64_t j = 0; j < pout; ++j) {
        const T sg = static_cast<T>(b[j] > T(0)) - static_cast<T>(b[j] < T(0));
        const T x = sg * (relu(c * std::abs(b[j]) - lam2) / den);
        bh[j] = x;
        nb += std::abs(x);
      }
    } else {
      std::fill(bh, bh + pout, T(0));
    }
    if (na > T(0) && nb > T(0) && lam1 > T(0) && lam2 > T(0)) {
      sc = std::sqrt((lam2 * nb) / clamp_min(lam1 * na, tiny));
    }
    if (early_exit) det.observe(t, DenseKey<T>{c, a_hat, sc});
  }
  if (sc != T(1)) {
#pragma omp simd aligned(ah : 64)
    for (int64_t k = 0; k < pin; ++k) ah[k] *= sc;
#pragma omp simd aligned(bh : 64)
    for (int64_t j = 0; j < pout; ++j) bh[j] /= sc;
  }
  return t - 1;
}

// The unit's share of the whole solves' stats (common.h kStats), in two vector passes over
// its buffers: out[0] = F at the start (the fit term is zero there), out[1] = F at the end
// (½·fit with closed_form._loss's cancellation-free sum, plus the L1 terms), out[2] = the
// nonzeros of (Â, B̂) in the compute type.  The zero padding adds nothing to any sum.  lg > 0
// adds the generator penalty lg·‖Â_i‖₂‖B̂_i‖₁ (tropfast/ops.py GENERATOR_PENALTY) to both F.
template <typename T>
TROPFAST_INLINE void stats(const UnitScratch<T>& u, T lam1, T lam2, T lg, T* out) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ ah = u.ah;
  const T* __restrict__ b = u.b;
  const T* __restrict__ bh = u.bh;
  const int64_t pin = u.pin(), pout = u.pout();
  T l1a = 0, l1ah = 0, nz = 0, ee = 0, eah = 0, ahat = 0;
#pragma omp simd reduction(+ : l1a, l1ah, nz, ee, eah, ahat) aligned(a, ah : 64)
  for (int64_t k = 0; k < pin; ++k) {
    const T x = a[k], y = ah[k], e = x - y;
    l1a += std::abs(x);
    l1ah += std::abs(y);
    nz += y != T(0) ? T(1) : T(0);
    ee += e * e;
    eah += e * y;
    ahat += y * y;
  }
  T l1b = 0, l1bh = 0, beta = 0, q = 0, delta = 0;
#pragma omp simd reduction(+ : l1b, l1bh, nz, beta, q, delta) aligned(b, bh : 64)
  for (int64_t j = 0; j < pout; ++j) {
    const T x = b[j], y = bh[j];
    const T bp = relu0(x), bn = relu0(-x);
    const T dp = bp - relu0(y), dn = bn - relu0(-y);
    l1b += std::abs(x);
    l1bh += std::abs(y);
    nz += y != T(0) ? T(1) : T(0);
    beta += x * x;
    q += bp * dp + bn * dn;
    delta += dp * dp + dn * dn;
  }
  const T fit = beta * ee + T(2) * q * eah + delta * ahat;
  out[0] = lam1 * l1a + lam2 * l1b;
  out[1] = T(0.5) * fit + lam1 * l1ah + lam2 * l1bh;
  out[2] = nz;
  if (lg > T(0)) {
    T aa = 0;
#pragma omp simd reduction(+ : aa) aligned(a : 64)
    for (int64_t k = 0; k < pin; ++k) aa += a[k] * a[k];
    out[0] += lg * std::sqrt(aa) * l1b;
    out[1] += lg * std::sqrt(ahat) * l1bh;
  }
}

// ------------------------------------------------------------------------------------------
// The same three solvers with the generator penalty lg·Σ_i ‖Â_i‖₂‖B̂_{:,i}‖₁ (lg > 0; see
// tropfast/ops.py GENERATOR_PENALTY): the Â step ends with the group shrink of the
// sparse-group-lasso prox, the B̂ threshold grows by lg‖Â_i‖₂.  Written plainly (a pass more
// per step than the loops above), so the loops without the penalty stay exactly as they are.
// ------------------------------------------------------------------------------------------
template <typename T>
TROPFAST_INLINE T l1_norm(const T* x, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += std::abs(x[k]);
  return acc;
}

// max(0, 1 − tg/‖x‖₂) for ‖x‖² = sq (the group shrink; 0 when x = 0)
template <typename T>
TROPFAST_INLINE T group_shrink(T tg, T sq, T tiny) {
  const T g = T(1) - tg / clamp_min(std::sqrt(sq), tiny);
  return g > T(0) ? g : T(0);
}

// dense.step "ista" with lam_gen (closed_form.gen_prox): both proxes at the old point.
template <typename T>
TROPFAST_INLINE void ista_gen(UnitScratch<T>& u, T lr, T lam1, T lam2, T lg, int64_t steps, T tiny) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  T* __restrict__ ah = u.ah;
  T* __restrict__ bh = u.bh;
  const int64_t pin = u.pin(), pout = u.pout();
  const T thr_a = lr * lam1;
  GradStats<T> st = grad_stats(a, ah, pin, b, bh, pout);
  T nb_old = l1_norm(bh, pout);
  for (int64_t t = 0; t < steps; ++t) {
    const T bhs = st.beta_hat, ss = st.s, ahs = st.a_hat, cs = st.c;
    const T thr_b = lr * (lam2 + lg * std::sqrt(ahs));
    T q = 0;
#pragma omp simd reduction(+ : q) aligned(a, ah : 64)
    for (int64_t k = 0; k < pin; ++k) {
      const T x = soft3(ah[k] - lr * (bhs * ah[k] - ss * a[k]), thr_a);
      ah[k] = x;
      q += x * x;
    }
    const T g = group_shrink(lr * lg * nb_old, q, tiny);
    T q2 = 0, c = 0;
#pragma omp simd reduction(+ : q2, c) aligned(a, ah : 64)
    for (int64_t k = 0; k < pin; ++k) {
      const T x = ah[k] * g;
      ah[k] = x;
      q2 += x * x;
      c += a[k] * x;
    }
    T w = 0, s = 0, nb = 0;
#pragma omp simd reduction(+ : w, s, nb) aligned(b, bh : 64)
    for (int64_t j = 0; j < pout; ++j) {
      const T same = (b[j] * bh[j]) > T(0) ? b[j] : T(0);
      const T x = soft3(bh[j] - lr * (ahs * bh[j] - cs * same), thr_b);
      bh[j] = x;
      w += x * x;
      s += relu0(b[j] * x);
      nb += std::abs(x);
    }
    st = {q2, c, w, s};
    nb_old = nb;
  }
}

// dense.fista_step with lam_gen: the ISTA step with the generator penalty from the
// extrapolated point y, momentum and gradient restart per unit as in fista().
template <typename T>
TROPFAST_INLINE void fista_gen(UnitScratch<T>& u, T lr, T lam1, T lam2, T lg, int64_t steps, T tiny) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  const int64_t pin = u.pin(), pout = u.pout();
  const T thr_a = lr * lam1;
  T* ah = u.ah;
  T* ahp = u.ahp;
  T* bh = u.bh;
  T* bhp = u.bhp;
  std::copy(ah, ah + pin, ahp);
  std::copy(bh, bh + pout, bhp);
  std::vector<T> ya_buf(static_cast<size_t>(pin)), yb_buf(static_cast<size_t>(pout));
  T* __restrict__ ya = ya_buf.data();
  T* __restrict__ yb = yb_buf.data();
  T mom = 1;
  for (int64_t t = 0; t < steps; ++t) {
    const T mom_next = (T(1) + std::sqrt(T(1) + T(4) * mom * mom)) / T(2);
    const T w = (mom - T(1)) / mom_next;
    T yq = 0, yc = 0, yw = 0, ys = 0, ynb = 0;
    for (int64_t k = 0; k < pin; ++k) {
      const T y = ah[k] + w * (ah[k] - ahp[k]);
      ya[k] = y;
      yq += y * y;
      yc += a[k] * y;
    }
    for (int64_t j = 0; j < pout; ++j) {
      const T y = bh[j] + w * (bh[j] - bhp[j]);
      yb[j] = y;
      yw += y * y;
      ys += relu0(b[j] * y);
      ynb += std::abs(y);
    }
    const T thr_b = lr * (lam2 + lg * std::sqrt(yq));
    // the new iterate overwrites the previous one (no longer needed), then the roles swap
    T uq = 0;
    for (int64_t k = 0; k < pin; ++k) {
      const T x = soft3(ya[k] - lr * (yw * ya[k] - ys * a[k]), thr_a);
      ahp[k] = x;
      uq += x * x;
    }
    const T g = group_shrink(lr * lg * ynb, uq, tiny);
    T up = 0;
    for (int64_t k = 0; k < pin; ++k) {
      const T x = ahp[k] * g;
      ahp[k] = x;
      up += (ya[k] - x) * (x - ah[k]);
    }
    for (int64_t j = 0; j < pout; ++j) {
      const T same = (b[j] * yb[j]) > T(0) ? b[j] : T(0);
      const T x = soft3(yb[j] - lr * (yq * yb[j] - yc * same), thr_b);
      bhp[j] = x;
      up += (yb[j] - x) * (x - bh[j]);
    }
    std::swap(ah, ahp);
    std::swap(bh, bhp);
    mom = up > T(0) ? T(1) : mom_next;
  }
  u.ah = ah;
  u.ahp = ahp;
  u.bh = bh;
  u.bhp = bhp;
}

// dense.bcd_sweep with lam_gen: Â_i = max(0, 1 − lg‖B̂_i‖₁/‖Z‖₂)·Z/β̂_i with Z = S_λ1(s_i A_i),
// then B̂ with the threshold λ2 + lg‖Â_i‖₂, then the same rescaling and early exit as bcd()
// (the threshold is a function of â, so the key is the same).
template <typename T>
TROPFAST_INLINE int64_t bcd_gen(UnitScratch<T>& u, T lam1, T lam2, T lg, int64_t steps, T tiny,
                                bool early_exit = true) {
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  T* __restrict__ ah = u.ah;
  T* __restrict__ bh = u.bh;
  const int64_t pin = u.pin(), pout = u.pout();
  T sc = 1;  // pending rescaling: Â ← sc·Â, B̂ ← B̂ / sc
  CycleDetector<DenseKey<T>> det(steps);
  int64_t t = 1;
  for (; t <= det.target; ++t) {
    T s = 0, beta_hat = 0, nbo = 0;
    for (int64_t j = 0; j < pout; ++j) {
      const T x = sc != T(1) ? bh[j] / sc : bh[j];
      bh[j] = x;
      s += relu0(b[j] * x);
      beta_hat += x * x;
      nbo += std::abs(x);
    }
    sc = 1;
    T c = 0, a_hat = 0, na = 0;
    if (beta_hat > T(0)) {
      const T den = clamp_min(beta_hat, tiny);
      T zz = 0;
      for (int64_t k = 0; k < pin; ++k) {
        const T z = soft3(s * a[k], lam1);
        ah[k] = z;
        zz += z * z;
      }
      const T g = group_shrink(lg * nbo, zz, tiny);
      for (int64_t k = 0; k < pin; ++k) {
        const T x = (ah[k] * g) / den;
        ah[k] = x;
        c += a[k] * x;
        a_hat += x * x;
        na += std::abs(x);
      }
    } else {
      std::fill(ah, ah + pin, T(0));
    }
    T nb = 0;
    if (c > T(0) && a_hat > T(0)) {
      const T den = clamp_min(a_hat, tiny);
      const T thr = lam2 + lg * std::sqrt(a_hat);
      for (int64_t j = 0; j < pout; ++j) {
        const T sg = static_cast<T>(b[j] > T(0)) - static_cast<T>(b[j] < T(0));
        const T x = sg * (relu(c * std::abs(b[j]) - thr) / den);
        bh[j] = x;
        nb += std::abs(x);
      }
    } else {
      std::fill(bh, bh + pout, T(0));
    }
    if (na > T(0) && nb > T(0) && lam1 > T(0) && lam2 > T(0)) {
      sc = std::sqrt((lam2 * nb) / clamp_min(lam1 * na, tiny));
    }
    if (early_exit) det.observe(t, DenseKey<T>{c, a_hat, sc});
  }
  if (sc != T(1)) {
    for (int64_t k = 0; k < pin; ++k) ah[k] *= sc;
    for (int64_t j = 0; j < pout; ++j) bh[j] /= sc;
  }
  return t - 1;
}

// The whole solve of one unit (method: common.h's Method), from (Â, B̂) = (A, B); lg > 0 adds
// the generator penalty.
template <typename T>
TROPFAST_INLINE void solve(UnitScratch<T>& u, int method, T lr, T lam1, T lam2, int64_t steps, T tiny, T lg = T(0)) {
  if (lg > T(0)) {
    if (method == 0) {
      ista_gen(u, lr, lam1, lam2, lg, steps, tiny);
    } else if (method == 1) {
      fista_gen(u, lr, lam1, lam2, lg, steps, tiny);
    } else {
      bcd_gen(u, lam1, lam2, lg, steps, tiny);
    }
    return;
  }
  if (method == 0) {
    ista(u, lr, lam1, lam2, steps);
  } else if (method == 1) {
    fista(u, lr, lam1, lam2, steps);
  } else {
    bcd(u, lam1, lam2, steps, tiny);
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace tropfast
