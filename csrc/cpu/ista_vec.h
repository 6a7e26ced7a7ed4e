// The ISTA and FISTA loops of one unit written with explicit vectors (docs/design.md §3).
// This file has no include guard on purpose: csrc/cpu/ista_x86.h includes it once per instruction set,
// inside a `#pragma GCC target` region and a namespace that defines `V`, the vector type of
// that set (V::T the scalar, V::R the register, V::kLanes scalars per register).  Defined
// there, these functions are compiled for that instruction set.
//
// A step is simd::ista's step operation by operation: the same fused multiply-adds, the soft
// threshold as z − min(max(z, −τ), τ) and the relu as max(0, x) (x86's max/min return their
// second operand for NaN and equal inputs, which is exactly the ternaries of soft3 and relu0),
// and sums kept in kPad = 16 lanes that are added in the tree of simd::lanes_sum.  The start
// point's sums are added in the same lanes and tree too (simd::ista takes them from unit.h's
// grad_stats, whose order the compiler picks per width).  So every instruction set gives
// bit-identical iterates.

constexpr int kRegs = static_cast<int>(simd::kPad) / V::kLanes;  // registers per kPad-element chunk

// The tree sum of kPad lanes held in kRegs registers: lane l + w is added to lane l for
// w = 8, 4, 2, 1, as simd::lanes_sum does.  The levels that span registers come first.
TROPFAST_INLINE typename V::T tree(typename V::R* acc) {
  for (int m = kRegs / 2; m >= 1; m /= 2) {
    for (int i = 0; i < m; ++i) acc[i] = V::add(acc[i], acc[i + m]);
  }
  return V::reduce(acc[0]);
}

// simd::soft3 on a register: z − min(max(z, −τ), τ), given −τ and τ
TROPFAST_INLINE typename V::R soft(typename V::R z, typename V::R neg_tau, typename V::R tau) {
  return V::sub(z, V::min(V::max(z, neg_tau), tau));
}

// â, c, β̂, s of the start point, summed in the same lanes and tree as the loop below.
TROPFAST_INLINE GradStats<typename V::T> start_stats(const typename V::T* a, const typename V::T* ah, int64_t pin,
                                                     const typename V::T* b, const typename V::T* bh, int64_t pout) {
  using R = typename V::R;
  const R zero = V::zero();
  R q[kRegs], c[kRegs], w[kRegs], s[kRegs];
  for (int i = 0; i < kRegs; ++i) q[i] = c[i] = w[i] = s[i] = zero;
  for (int64_t k0 = 0; k0 < pin; k0 += simd::kPad) {
    for (int i = 0; i < kRegs; ++i) {
      const R x = V::load(ah + k0 + i * V::kLanes);
      q[i] = V::fmadd(x, x, q[i]);
      c[i] = V::fmadd(V::load(a + k0 + i * V::kLanes), x, c[i]);
    }
  }
  for (int64_t j0 = 0; j0 < pout; j0 += simd::kPad) {
    for (int i = 0; i < kRegs; ++i) {
      const int64_t j = j0 + i * V::kLanes;
      const R x = V::load(bh + j);
      const R p = V::mul(V::load(b + j), x);
      w[i] = V::fmadd(x, x, w[i]);
      s[i] = V::add(s[i], V::max(zero, p));
    }
  }
  return {tree(q), tree(c), tree(w), tree(s)};
}

// simd::ista on one unit, from the current iterate (u.ah, u.bh).
//
// A step's A pass needs only the B statistics of the step before, and its B pass only the A
// ones, so the two passes may run in either order.  They alternate: the pass that starts a
// step is the one whose inputs were summed first (the A pass after an A-last step, the B pass
// after a B-last one), so a step never waits for the sums of the pass just finished.  The
// arithmetic of every pass is the same whichever order they run in.
inline void ista(simd::UnitScratch<typename V::T>& u, typename V::T lr, typename V::T lam1, typename V::T lam2,
                 int64_t steps) {
  using T = typename V::T;
  using R = typename V::R;
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  T* __restrict__ ah = u.ah;
  T* __restrict__ bh = u.bh;
  const int64_t pin = u.pin(), pout = u.pout();
  const R zero = V::zero();
  const R ta = V::set1(lr * lam1), nta = V::set1(-(lr * lam1));
  const R tb = V::set1(lr * lam2), ntb = V::set1(-(lr * lam2));
  const GradStats<T> st = start_stats(a, ah, pin, b, bh, pout);
  T a_hat = st.a_hat, c_ = st.c;         // of Â: what the B pass reads
  T beta_hat = st.beta_hat, s_ = st.s;  // of B̂: what the A pass reads
  // Â ← S(Â(1 − lr β̂) + A(lr s)); returns (â, c) of the new Â
  auto pass_a = [&](T bh_, T sv, T& out_a_hat, T& out_c) {
    const R ka = V::set1(T(1) - lr * bh_), ga = V::set1(lr * sv);
    R q[kRegs], c[kRegs];
    for (int i = 0; i < kRegs; ++i) q[i] = c[i] = zero;
    for (int64_t k0 = 0; k0 < pin; k0 += simd::kPad) {
      for (int i = 0; i < kRegs; ++i) {
        const int64_t k = k0 + i * V::kLanes;
        const R av = V::load(a + k);
        const R z = V::fmadd(ka, V::load(ah + k), V::mul(ga, av));
        const R x = soft(z, nta, ta);
        V::store(ah + k, x);
        q[i] = V::fmadd(x, x, q[i]);
        c[i] = V::fmadd(av, x, c[i]);
      }
    }
    out_a_hat = tree(q);
    out_c = tree(c);
  };
  // B̂ ← S(B̂(1 − lr â) + B·1[B B̂ > 0](lr c)); returns (β̂, s) of the new B̂
  auto pass_b = [&](T ah_, T cv, T& out_beta_hat, T& out_s) {
    const R kb = V::set1(T(1) - lr * ah_), gb = V::set1(lr * cv);
    R w[kRegs], s[kRegs];
    for (int i = 0; i < kRegs; ++i) w[i] = s[i] = zero;
    for (int64_t j0 = 0; j0 < pout; j0 += simd::kPad) {
      for (int i = 0; i < kRegs; ++i) {
        const int64_t j = j0 + i * V::kLanes;
        const R bv = V::load(b + j), hv = V::load(bh + j);
        const R same = V::select_positive(V::mul(bv, hv), bv);  // B·1[B B̂ > 0]
        const R z = V::fmadd(kb, hv, V::mul(same, gb));
        const R x = soft(z, ntb, tb);
        const R p = V::mul(bv, x);
        V::store(bh + j, x);
        w[i] = V::fmadd(x, x, w[i]);
        s[i] = V::add(s[i], V::max(zero, p));
      }
    }
    out_beta_hat = tree(w);
    out_s = tree(s);
  };
  for (int64_t t = 0; t < steps; ++t) {
    T na, nc, nb, ns;
    if ((t & 1) == 0) {
      pass_a(beta_hat, s_, na, nc);
      pass_b(a_hat, c_, nb, ns);
    } else {
      pass_b(a_hat, c_, nb, ns);
      pass_a(beta_hat, s_, na, nc);
    }
    a_hat = na, c_ = nc, beta_hat = nb, s_ = ns;
  }
}

// simd::fista on one unit (momentum and gradient restart per unit), from the current iterate:
// y = x + w(x − xp), x⁺ = S(y − lr·g(y)), one pass per step that also sums the restart term
// ⟨y − x⁺, x⁺ − x⟩ and the statistics of both possible next points.  The previous iterate
// lives in u.ahp / u.bhp, which the step overwrites with x⁺ before the buffers swap.
inline void fista(simd::UnitScratch<typename V::T>& u, typename V::T lr, typename V::T lam1, typename V::T lam2,
                  int64_t steps) {
  using T = typename V::T;
  using R = typename V::R;
  const T* __restrict__ a = u.a;
  const T* __restrict__ b = u.b;
  const int64_t pin = u.pin(), pout = u.pout();
  T* ah = u.ah;
  T* ahp = u.ahp;
  T* bh = u.bh;
  T* bhp = u.bhp;
  std::copy(ah, ah + pin, ahp);
  std::copy(bh, bh + pout, bhp);
  const R zero = V::zero();
  const R ta = V::set1(lr * lam1), nta = V::set1(-(lr * lam1));
  const R tb = V::set1(lr * lam2), ntb = V::set1(-(lr * lam2));
  T mom = 1;
  T wt = 0;  // this step's extrapolation weight; 0 at the start
  GradStats<T> st = start_stats(a, ah, pin, b, bh, pout);  // at y = x
  for (int64_t t = 0; t < steps; ++t) {
    const T mom_next = (T(1) + std::sqrt(T(1) + T(4) * mom * mom)) / T(2);
    const T mom_next2 = (T(1) + std::sqrt(T(1) + T(4) * mom_next * mom_next)) / T(2);
    const T wn = (mom_next - T(1)) / mom_next2;  // the next step's weight unless this one restarts
    const R ka = V::set1(T(1) - lr * st.beta_hat), ga = V::set1(lr * st.s);
    const R kb = V::set1(T(1) - lr * st.a_hat), gb = V::set1(lr * st.c);
    const R w = V::set1(wt), wnv = V::set1(wn);
    R upa[kRegs], rq[kRegs], rc[kRegs], mq[kRegs], mc[kRegs];
    R upb[kRegs], rw[kRegs], rs[kRegs], mw[kRegs], ms[kRegs];
    for (int i = 0; i < kRegs; ++i) {
      upa[i] = rq[i] = rc[i] = mq[i] = mc[i] = zero;
      upb[i] = rw[i] = rs[i] = mw[i] = ms[i] = zero;
    }
    for (int64_t k0 = 0; k0 < pin; k0 += simd::kPad) {
      for (int i = 0; i < kRegs; ++i) {
        const int64_t k = k0 + i * V::kLanes;
        const R av = V::load(a + k), xk = V::load(ah + k);
        const R y = V::fmadd(w, V::sub(xk, V::load(ahp + k)), xk);
        const R z = V::fmadd(ka, y, V::mul(ga, av));
        const R xn = soft(z, nta, ta);
        V::store(ahp + k, xn);
        const R dx = V::sub(xn, xk);
        upa[i] = V::fmadd(V::sub(y, xn), dx, upa[i]);
        rq[i] = V::fmadd(xn, xn, rq[i]);
        rc[i] = V::fmadd(av, xn, rc[i]);
        const R ym = V::fmadd(wnv, dx, xn);
        mq[i] = V::fmadd(ym, ym, mq[i]);
        mc[i] = V::fmadd(av, ym, mc[i]);
      }
    }
    for (int64_t j0 = 0; j0 < pout; j0 += simd::kPad) {
      for (int i = 0; i < kRegs; ++i) {
        const int64_t j = j0 + i * V::kLanes;
        const R bv = V::load(b + j), xk = V::load(bh + j);
        const R y = V::fmadd(w, V::sub(xk, V::load(bhp + j)), xk);
        const R same = V::select_positive(V::mul(bv, y), bv);  // B·1[B y > 0]
        const R z = V::fmadd(kb, y, V::mul(same, gb));
        const R xn = soft(z, ntb, tb);
        V::store(bhp + j, xn);
        const R dx = V::sub(xn, xk);
        upb[i] = V::fmadd(V::sub(y, xn), dx, upb[i]);
        rw[i] = V::fmadd(xn, xn, rw[i]);
        rs[i] = V::add(rs[i], V::max(zero, V::mul(bv, xn)));
        const R ym = V::fmadd(wnv, dx, xn);
        mw[i] = V::fmadd(ym, ym, mw[i]);
        ms[i] = V::add(ms[i], V::max(zero, V::mul(bv, ym)));
      }
    }
    const T up = tree(upa) + tree(upb);
    std::swap(ah, ahp);
    std::swap(bh, bhp);
    if (up > T(0)) {  // uphill: restart, the next y is x⁺ itself
      mom = T(1);
      wt = T(0);
      st = {tree(rq), tree(rc), tree(rw), tree(rs)};
    } else {
      mom = mom_next;
      wt = wn;
      st = {tree(mq), tree(mc), tree(mw), tree(ms)};
    }
  }
  u.ah = ah;
  u.ahp = ahp;
  u.bh = bh;
  u.bhp = bhp;
}
