// The native dense BCD loop (csrc/cpu/solve_simd.h) with and without its early exit, on many
// small units over a range of λ: the results must agree bit for bit at every T.
// Prints "mismatches <n> exits <n> phased <n> cases <n>" (tests/backends/test_native.py).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/solve_simd.h"

using tropfast::cpu::simd::UnitScratch;

static uint64_t rng = 88172645463325252ull;
static double uniform() {  // xorshift64, in (0, 1)
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (static_cast<double>(rng >> 11) + 0.5) / 9007199254740992.0;
}
static double normal() { return std::sqrt(-2 * std::log(uniform())) * std::cos(6.283185307179586 * uniform()); }

struct Out {
  std::vector<unsigned char> bytes;
  int64_t sweeps;
};

template <typename T>
static Out run(const std::vector<T>& a, const std::vector<T>& b, T l1, T l2, T lg, int64_t steps, bool exit) {
  const int64_t din = static_cast<int64_t>(a.size()), dout = static_cast<int64_t>(b.size());
  UnitScratch<T> u(din, dout);
  std::copy(a.begin(), a.end(), u.a);
  std::copy(b.begin(), b.end(), u.b);
  u.start();
  const T tiny = std::numeric_limits<T>::min();
  const int64_t sweeps = lg > T(0) ? tropfast::cpu::simd::bcd_gen(u, l1, l2, lg, steps, tiny, exit)
                                   : tropfast::cpu::simd::bcd(u, l1, l2, steps, tiny, exit);
  Out o{std::vector<unsigned char>(sizeof(T) * (din + dout)), sweeps};
  std::memcpy(o.bytes.data(), u.ah, sizeof(T) * din);
  std::memcpy(o.bytes.data() + sizeof(T) * din, u.bh, sizeof(T) * dout);
  return o;
}

template <typename T>
static void check(int& mismatches, int& exits, int& phased, int& cases) {
  const int64_t shapes[][2] = {{12, 9}, {7, 5}, {24, 40}, {1, 9}};
  const int64_t Ts[] = {1, 2, 5, 20, 31, 300, 301, 302, 303};
  for (const auto& sh : shapes) {
    for (int k = 0; k < 48; ++k) {
      std::vector<T> a(sh[0]), b(sh[1]);
      for (auto& x : a) x = static_cast<T>(normal());
      for (auto& x : b) x = static_cast<T>(normal());
      const T l1 = static_cast<T>(std::pow(10.0, -2.0 + 3.5 * k / 47.0)), l2 = static_cast<T>(0.7) * l1;
      for (const T lg : {T(0), static_cast<T>(0.3) * l1}) {
        Out prev_fast;
        for (const int64_t T_ : Ts) {
          const Out fast = run<T>(a, b, l1, l2, lg, T_, true), full = run<T>(a, b, l1, l2, lg, T_, false);
          ++cases;
          mismatches += fast.bytes != full.bytes;
          exits += fast.sweeps < T_;
          // the phase matters: consecutive T leave different iterates although both exited early
          if (T_ > 300 && fast.sweeps < 300 && fast.bytes != prev_fast.bytes) ++phased;
          prev_fast = fast;
        }
      }
    }
  }
}

int main() {
  int mismatches = 0, exits = 0, phased = 0, cases = 0;
  check<float>(mismatches, exits, phased, cases);
  check<double>(mismatches, exits, phased, cases);
  std::printf("mismatches %d exits %d phased %d cases %d\n", mismatches, exits, phased, cases);
  return 0;
}
