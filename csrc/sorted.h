// The sorted-path solvers of one hidden unit (docs/design.md §4; the PyTorch form in
// tropfast/backends/torch/sorted.py is the specification), shared by the CPU kernels (one
// OpenMP task per unit) and the CUDA kernels (one thread per unit).
//
// Every BCD half-step, and every ISTA step, maps a unit to soft-thresholded, rescaled
// magnitudes of its *original* weights, so a unit's state is a few scalars: B̂ is
// sign(B)·(k|B| − m) on the jB largest |B|; under BCD Â is one such piece, under ISTA up to
// kMaxPieces pieces, each an index range of the sorted row.  With |A_i| and |B_{:,i}|
// sorted descending and prefix sums of x and x² (fp64), every statistic a step needs is a
// binary search and a few loads: O(log d) per unit per step, whatever d is.
//
// Input of a unit (`Sorted`): x, its magnitudes sorted descending (n values of the compute
// type S), and p1, p2 (n + 1 doubles): p1[j] = Σ_{i<j} x_i, p2[j] = Σ_{i<j} x_i², summed
// from the largest entry down.  Sums run in double; the BCD state is rounded to S after
// each sweep (as sorted.py does), the ISTA state stays in double.
#pragma once

#include <cmath>
#include <cstdint>

#include "cycle.h"

namespace tropfast {
namespace sorted {

constexpr int kWindow = 4;       // smallest kept entries summed from their values (affine_sums)
constexpr int kMaxPieces = 16;   // ISTA pieces per unit before the unit falls back to dense
constexpr double kTiny = 2.2250738585072014e-308;  // torch.finfo(torch.float64).tiny

template <typename S>
struct Sorted {
  const S* x;
  const double* p1;
  const double* p2;
  int64_t n;
};

// Number of entries strictly greater than tau (tau = +inf: none), given that it lies in
// [lo, hi] (the whole row by default).
template <typename S>
TROPFAST_HD int64_t count_above(const Sorted<S>& u, double tau, int64_t lo = 0, int64_t hi = -1) {
  if (hi < 0) hi = u.n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<double>(u.x[mid]) > tau) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

struct Sums {
  double xv, v1, vv;  // Σ x·v, Σ v, Σ v²  for v = k·x − m
};

// (Σ x·v, Σ v, Σ v²) for v = k·x − m over the j largest entries.  From the prefix sums
// Σ v² = k²Σx² − 2kmΣx + m²Σ1 cancels for entries just above the threshold, so the
// kWindow smallest kept entries are summed from their values (sorted.SortedUnits.affine_sums).
template <typename S>
TROPFAST_HD Sums affine_sums(const Sorted<S>& u, double k, double m, int64_t j) {
  const int64_t j0 = j > kWindow ? j - kWindow : 0;
  const double g0 = static_cast<double>(j0), g1 = u.p1[j0], g2 = u.p2[j0];
  const double pxv = k * g2 - m * g1;
  const double pv1 = k * g1 - m * g0;
  const double pvv = k * pxv - m * pv1;
  double wxv = 0, wv1 = 0, wvv = 0;
  for (int64_t i = j0; i < j; ++i) {
    const double x = static_cast<double>(u.x[i]);
    const double v = k * x - m;
    wxv += x * v;
    wv1 += v;
    wvv += v * v;
  }
  return {pxv + wxv, pv1 + wv1, pvv + wvv};
}

// The smallest of the j largest entries (+inf for j = 0): entries >= it are the kept ones.
template <typename S>
TROPFAST_HD double smallest_kept(const Sorted<S>& u, int64_t j) {
  return j > 0 ? static_cast<double>(u.x[j - 1]) : INFINITY;
}

// ------------------------------------------------------------------------------------------
// BCD with rescaling (dense.bcd_sweep): both blocks are one affine piece.
// ------------------------------------------------------------------------------------------
template <typename S>
struct BcdState {
  S kA, mA, kB, mB;
  int64_t jA, jB;
};

// One sweep from B̂ = (kB, mB) on the jB largest |B| (sorted._bcd_sweep_sorted).  lg > 0: the
// generator penalty (tropfast/ops.py GENERATOR_PENALTY) scales Â's (k, m) by the group shrink
// g = max(0, 1 − lg‖B̂‖₁/‖S_λ1(sA)‖₂) and raises B̂'s threshold to λ2 + lg‖Â‖₂; lg = 0 runs
// exactly the arithmetic without it.
template <typename S>
TROPFAST_HD BcdState<S> bcd_sweep(const Sorted<S>& A, const Sorted<S>& B, double l1, double l2, S kB0, S mB0,
                                  int64_t jB0, double lg = 0.0) {
  // Â | B̂:  Â_i = S_λ1(s_i A_i) / β̂_i: k = s/β̂, m = λ1/β̂ above τ = λ1/s.
  const Sums sb = affine_sums(B, static_cast<double>(kB0), static_cast<double>(mB0), jB0);
  const bool hasB = jB0 > 0;
  const double s = sb.xv;
  const double bh = sb.vv > kTiny ? sb.vv : kTiny;
  double kA = hasB ? s / bh : 0.0;
  double mA = hasB ? l1 / bh : 0.0;
  int64_t jA = count_above(A, hasB ? l1 / (s > kTiny ? s : kTiny) : INFINITY);
  if (lg > 0) {
    const double zz = affine_sums(A, s, l1, jA).vv;  // ‖S_λ1(sA)‖²
    const double zn = sqrt(zz > 0 ? zz : 0.0);
    double g = 1.0 - lg * sb.v1 / (zn > kTiny ? zn : kTiny);
    g = g > 0 ? g : 0.0;
    kA *= g;
    mA *= g;
    if (!(g > 0)) jA = 0;
  }
  // B̂ | Â:  B̂ = sign(B)·max(c|B| − λ2, 0)/â when c > 0: k = c/â, m = λ2/â above τ = λ2/c.
  const Sums sa = affine_sums(A, kA, mA, jA);
  const bool hasA = jA > 0;
  const double c = sa.xv, nA = sa.v1;
  const double ah = sa.vv > kTiny ? sa.vv : kTiny;
  const double t2 = lg > 0 ? l2 + lg * sqrt(ah) : l2;
  const double kB = hasA ? c / ah : 0.0;
  const double mB = hasA ? t2 / ah : 0.0;
  const int64_t jB = count_above(B, hasA ? t2 / (c > kTiny ? c : kTiny) : INFINITY);
  const double nB = affine_sums(B, kB, mB, jB).v1;
  // Free rescaling (tÂ_i, B̂_i/t): thresholds are scale-free, only (k, m) move.
  const bool ok = l1 > 0 && l2 > 0 && nA > 0 && nB > 0;
  const double lnA = l1 * nA;
  const double t = ok ? sqrt((l2 * nB) / (lnA > kTiny ? lnA : kTiny)) : 1.0;
  return {static_cast<S>(kA * t), static_cast<S>(mA * t), static_cast<S>(kB / t), static_cast<S>(mB / t), jA, jB};
}

// `steps` sweeps from (Â, B̂) = (A, B) (sorted._bcd_state).  With `early_exit`, the cycle
// detector of cycle.h on B̂'s state (kB, mB, jB) stops the unit at the sweep that leaves
// what sweep `steps` would.  Returns the sweeps actually run.
template <typename S>
struct SortedKey {
  S k, m;
  int64_t j;
  TROPFAST_HD bool operator==(const SortedKey& o) const { return k == o.k && m == o.m && j == o.j; }
};

template <typename S>
TROPFAST_HD int64_t bcd_unit(const Sorted<S>& A, const Sorted<S>& B, double l1, double l2, int64_t steps,
                             BcdState<S>* out, bool early_exit = true, double lg = 0.0) {
  const int64_t jB = count_above(B, 0.0);
  BcdState<S> cur{S(0), S(0), S(1), S(0), count_above(A, 0.0), jB};
  CycleDetector<SortedKey<S>> det(steps, SortedKey<S>{cur.kB, cur.mB, jB});
  int64_t t = 0;
  while (t < det.target) {
    ++t;
    cur = bcd_sweep(A, B, l1, l2, cur.kB, cur.mB, cur.jB, lg);
    if (early_exit) det.observe(t, SortedKey<S>{cur.kB, cur.mB, cur.jB});
  }
  *out = cur;
  return t;
}

// ------------------------------------------------------------------------------------------
// ISTA (the paper's Algorithm 1): B̂ is one piece on a support that only shrinks; Â is a
// convex piecewise-affine function of |A| kept as up to kMaxPieces index ranges.
// ------------------------------------------------------------------------------------------
struct IstaState {
  // piece p covers sorted positions [hi[p−1], hi[p]) (hi[−1] = 0) with value k[p]|A| − m[p];
  // positions >= hi[cnt − 1] are zero.
  int64_t hi[kMaxPieces];
  double k[kMaxPieces], m[kMaxPieces];
  int cnt;
  double kB, mB;
  int64_t jB;
  bool bad;  // the iterate left the sorted form: the unit must be solved densely
};

// `steps` ISTA steps (sorted._ista_state).  `bad` marks a unit that needed more than
// kMaxPieces pieces, or met a step with 1 − lr·β̂ < 0 or 1 − lr·â < 0 (signs could flip).
// lg > 0: the generator penalty, which scales the new pieces by the group shrink and raises
// B̂'s threshold (sorted._ista_state); lg = 0 runs exactly the arithmetic without it.
template <typename S>
TROPFAST_HD void ista_unit(const Sorted<S>& A, const Sorted<S>& B, double l1, double l2, double eta, int64_t steps,
                           IstaState* out, double lg = 0.0) {
  constexpr int P = kMaxPieces;
  const int64_t n = A.n;
  // bounds[0] = 0; slot p covers [bounds[p], bounds[p+1]); slot P is the spare one a new
  // piece is born in; unused slots are empty ranges at n.
  int64_t bounds[P + 2];
  double kP[P + 1], mP[P + 1];
  bounds[0] = 0;
  bounds[1] = count_above(A, 0.0);
  for (int p = 2; p < P + 2; ++p) bounds[p] = n;
  for (int p = 0; p < P + 1; ++p) kP[p] = mP[p] = 0.0;
  kP[0] = 1.0;
  int cnt = 1;
  double kB = 1.0, mB = 0.0;
  int64_t jB = count_above(B, 0.0);
  bool bad = false;
  const double eta_l1 = eta * l1, eta_l2 = eta * l2;
  for (int64_t t = 0; t < steps && !bad; ++t) {
    // c = ⟨A, Â⟩ and â = ‖Â‖² from the pieces' range sums.
    double c = 0, ah = 0;
    for (int p = 0; p < cnt; ++p) {
      const int64_t lo = bounds[p], hi = bounds[p + 1];
      const double g0 = static_cast<double>(hi - lo);
      const double g1 = A.p1[hi] - A.p1[lo], g2 = A.p2[hi] - A.p2[lo];
      const double xv = kP[p] * g2 - mP[p] * g1;
      const double v1 = kP[p] * g1 - mP[p] * g0;
      c += xv;
      ah += kP[p] * xv - mP[p] * v1;
    }
    const Sums sb = affine_sums(B, kB, mB, jB);
    const double s = sb.xv, bh = sb.vv;
    const double alB = 1 - eta * ah;
    const double alA = 1 - eta * bh;
    if ((alA < 0 && cnt > 0) || (alB < 0 && jB > 0)) {
      bad = true;
      break;
    }
    // B̂ ← S((1 − η â) B̂ + η c B·1[B B̂ > 0], η λ2): on its support sign(B)·(K|B| − M); off
    // it the gradient is zero and B̂ stays zero, so the support only shrinks.
    const double KB = alB * kB + eta * c;
    const double MB = alB * mB + (lg > 0 ? eta * (l2 + lg * sqrt(ah > 0 ? ah : 0.0)) : eta_l2);
    const double tauB = KB > 0 ? MB / (KB > kTiny ? KB : kTiny) : INFINITY;
    if (jB > 0 && !(static_cast<double>(B.x[jB - 1]) > tauB)) jB = count_above(B, tauB, 0, jB - 1);
    kB = KB;
    mB = MB;
    // Â ← S((1 − η β̂) Â + η s A, η λ1): each piece stays affine; the zero region
    // [bounds[cnt], n) becomes a candidate piece (η s, η λ1) in slot cnt.
    const double ks = eta * s;
    for (int p = 0; p < cnt; ++p) {
      kP[p] = alA * kP[p] + ks;
      mP[p] = alA * mP[p] + eta_l1;
    }
    kP[cnt] = ks;
    mP[cnt] = eta_l1;
    const int live = cnt + 1;
    // The new function is nondecreasing in |A|, so its nonzeros are a prefix: it ends in
    // the first piece whose smallest entry is at or below the piece's threshold.
    int64_t q = n;
    for (int p = 0; p < live; ++p) {
      const int64_t lo = bounds[p], hi = bounds[p + 1];
      const double tau = kP[p] > 0 ? mP[p] / (kP[p] > kTiny ? kP[p] : kTiny) : INFINITY;
      const int64_t last = hi - 1 < 0 ? 0 : (hi - 1 > n - 1 ? n - 1 : hi - 1);
      if (hi > lo && static_cast<double>(A.x[last]) <= tau) {
        // the count lies in [lo, hi): x[hi − 1] <= tau, and the pieces before have no zero
        q = count_above(A, tau, lo, last);
        break;
      }
    }
    int kept = 0;
    for (int p = 0; p < live; ++p) {
      if (bounds[p] < q) {
        // the kept slots are a prefix (ranges are increasing), so they stay in place
        const int64_t hi = bounds[p + 1];
        bounds[p + 1] = hi < q ? hi : q;
        ++kept;
      }
    }
    for (int p = kept; p < live; ++p) {  // slots from `live` on are unused already
      bounds[p + 1] = n;
      kP[p] = mP[p] = 0.0;
    }
    cnt = kept;
    if (cnt > P) bad = true;
    if (lg > 0) {
      // the group shrink g = max(0, 1 − η lg ‖B̂‖₁/‖U‖₂) of every piece, B̂ the old iterate
      double uu = 0;
      for (int p = 0; p < cnt && p <= P; ++p) {
        const int64_t lo = bounds[p], hi = bounds[p + 1];
        const double g0 = static_cast<double>(hi - lo);
        const double g1 = A.p1[hi] - A.p1[lo], g2 = A.p2[hi] - A.p2[lo];
        const double xv = kP[p] * g2 - mP[p] * g1;
        const double v1 = kP[p] * g1 - mP[p] * g0;
        uu += kP[p] * xv - mP[p] * v1;
      }
      const double un = sqrt(uu > 0 ? uu : 0.0);
      double g = 1.0 - eta * lg * sb.v1 / (un > kTiny ? un : kTiny);
      g = g > 0 ? g : 0.0;
      for (int p = 0; p < P + 1; ++p) {
        kP[p] *= g;
        mP[p] *= g;
      }
      if (!(g > 0)) {
        cnt = 0;
        for (int p = 1; p < P + 2; ++p) bounds[p] = n;
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    out->hi[p] = bounds[p + 1];
    out->k[p] = kP[p];
    out->m[p] = mP[p];
  }
  out->cnt = cnt < P ? cnt : P;
  out->kB = kB;
  out->mB = mB;
  out->jB = jB;
  out->bad = bad;
}

// Â_ik of an ISTA piece table: the entry's piece is the first (largest magnitudes) whose
// smallest magnitude is <= |A_ik|; entries below every piece are zero.
template <typename S>
TROPFAST_HD double ista_value(const Sorted<S>& A, const IstaState& st, double a) {
  const double ax = fabs(a);
  for (int p = 0; p < st.cnt; ++p) {
    const int64_t lo = p == 0 ? 0 : st.hi[p - 1];
    if (st.hi[p] <= lo) continue;
    if (ax >= static_cast<double>(A.x[st.hi[p] - 1])) {
      double v = st.k[p] * ax - st.m[p];
      v = v > 0 ? v : 0.0;
      return a > 0 ? v : (a < 0 ? -v : 0.0);
    }
  }
  return 0.0;
}

// sign(x)·max(k|x| − m, 0) where |x| >= x_lo, else 0 (sorted._materialise), in the type S.
// Written with selects and a multiply by the sign, not branches: the signs of the weights
// are random, so a branch on them would mispredict half the time.
template <typename S>
TROPFAST_HD S piece_value(S x, S k, S m, double x_lo) {
  const S ax = x < S(0) ? -x : x;
  S v = k * ax - m;
  v = v > S(0) ? v : S(0);
  v = static_cast<double>(ax) >= x_lo ? v : S(0);
  const S sg = static_cast<S>(x > S(0)) - static_cast<S>(x < S(0));
  return sg * v;
}

// The non-empty pieces of an ISTA state with their smallest magnitudes, for a branch-free
// lookup of ista_value: an entry's piece is the number of pieces whose smallest magnitude
// exceeds it (the pieces run in decreasing magnitude).
struct Pieces {
  double low[kMaxPieces], k[kMaxPieces], m[kMaxPieces];
  int n = 0;
  template <typename S>
  TROPFAST_HD Pieces(const Sorted<S>& A, const IstaState& st) {
    for (int p = 0; p < st.cnt; ++p) {
      const int64_t lo = p == 0 ? 0 : st.hi[p - 1];
      if (st.hi[p] <= lo) continue;
      low[n] = static_cast<double>(A.x[st.hi[p] - 1]);
      k[n] = st.k[p];
      m[n] = st.m[p];
      ++n;
    }
  }
  // ista_value(A, st, a), the same arithmetic
  TROPFAST_HD double value(double a) const {
    const double ax = fabs(a);
    int p = 0;
    for (int q = 0; q < n; ++q) p += ax < low[q];
    if (p >= n) return 0.0;
    double v = k[p] * ax - m[p];
    v = v > 0 ? v : 0.0;
    return (static_cast<double>(a > 0) - static_cast<double>(a < 0)) * v;
  }
};

}  // namespace sorted
}  // namespace tropfast
