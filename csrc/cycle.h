// Brent's cycle detector for one unit's BCD sweeps (docs/design.md §4), shared by the sorted
// solvers (sorted.h, CPU and CUDA) and the CPU dense loop (cpu/solve_simd.h); the PyTorch
// form is tropfast/backends/torch/sorted.py's CycleDetector.
//
// A BCD sweep reads only B̂, so a unit's states form a deterministic sequence, which in
// floating point ends in a fixed point or a short cycle.  The state after sweep t is compared
// with one saved state, the one after sweep t − lam (lam <= power); on a match the period is
// lam, and sweep `steps` leaves what sweep t + (steps − t) mod lam leaves, bit for bit, so a
// loop only has to run up to `target`.  One saved state and O(1) work per sweep.
//
// Key: the few numbers that determine B̂ after a sweep (sorted: k, m, j; dense: c, â and the
// rescaling), with operator==.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TROPFAST_HD __host__ __device__ __forceinline__
#else
#define TROPFAST_HD inline
#endif

namespace tropfast {

template <typename Key>
struct CycleDetector {
  Key saved;
  int64_t steps, target, power = 1, lam = 0;
  bool has_saved, found = false;

  // `start`: the state before the first sweep, when it is one the sweeps can return to;
  // without it the first comparison waits for the state after sweep 1.
  TROPFAST_HD explicit CycleDetector(int64_t steps_) : saved(), steps(steps_), target(steps_), has_saved(false) {}
  TROPFAST_HD CycleDetector(int64_t steps_, const Key& start)
      : saved(start), steps(steps_), target(steps_), has_saved(true) {}

  // The state after sweep t (t = 1, 2, …); afterwards `target` is the last sweep to run.
  TROPFAST_HD void observe(int64_t t, const Key& cur) {
    if (found) return;
    ++lam;
    if (has_saved && cur == saved) {
      found = true;
      target = t + (steps - t) % lam;
      return;
    }
    if (lam == power) {
      saved = cur;
      has_saved = true;
      power *= 2;
      lam = 0;
    }
  }
};

}  // namespace tropfast
