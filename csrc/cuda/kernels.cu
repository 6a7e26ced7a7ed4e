// CUDA kernels of the tropfast:: ops.  The closed form separates by hidden unit
// (docs/design.md §2), so the unit kernels run one thread block per (adapter, unit): the block
// strides over the unit's d_in + d_out numbers, block-reduces the per-unit sums, and, in
// solve_fused, keeps the unit in shared memory for all iterations.  Each thread only ever
// touches the elements k ≡ threadIdx.x (mod blockDim.x), so the buffers need no barriers;
// the only synchronisation is inside the reductions.  Accumulation is in float (double for
// float64 inputs), and the arithmetic follows tropfast/backends/torch/closed_form.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../sorted.h"
#include "launch.h"

namespace tropfast {
namespace cuda {
namespace {

constexpr int kMaxWarps = 32;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

template <typename T>
__device__ __forceinline__ T tiny_();  // torch.finfo(compute dtype).tiny
template <>
__device__ __forceinline__ float tiny_<float>() {
  return 1.17549435082228750797e-38f;
}
template <>
__device__ __forceinline__ double tiny_<double>() {
  return 2.22507385850720138309e-308;
}

// `x < 0 ? 0 : x` lets NaN through, as torch.relu and clamp_min do.
template <typename T>
__device__ __forceinline__ T relu(T x) {
  return x < T(0) ? T(0) : x;
}
template <typename T>
__device__ __forceinline__ T clamp_min(T x, T lo) {
  return x < lo ? lo : x;
}
template <typename T>
__device__ __forceinline__ T sign(T x) {
  return static_cast<T>(x > T(0)) - static_cast<T>(x < T(0));
}
template <typename T>
__device__ __forceinline__ T soft(T z, T tau) {
  return sign(z) * relu(abs_(z) - tau);
}

// Sums N values over the block; every thread gets the totals.  Lane 0 of each warp publishes
// its warp's sums and every thread adds the warp sums in warp order, so the result does not
// depend on scheduling.  blockDim.x must be a multiple of 32.
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N], T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[n] += __shfl_xor_sync(0xffffffffu, v[n], off);
  }
  __syncthreads();  // the previous reduction's readers are done with `red`
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) red[n * kMaxWarps + warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    T s = 0;
    for (int w = 0; w < nwarps; ++w) s += red[n * kMaxWarps + w];
    v[n] = s;
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < (1 << 20) ? (blocks > 0 ? blocks : 1) : (1 << 20));
}

// Threads per unit block: about four elements of the longer side per thread, 32..256.
int unit_threads(int64_t din, int64_t dout) {
  const int64_t d = din > dout ? din : dout;
  int t = 32;
  while (t < 256 && 4 * t < d) t *= 2;
  return t;
}

// ------------------------------------------------------------------------------------------
// Elementwise ops.
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void generators_kernel(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ G1,
                                  T* __restrict__ G2, int64_t r, int64_t din, int64_t dout, int64_t n) {
  using acc_t = typename Acc<T>::type;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx % din;
    const int64_t t = idx / din;
    const int64_t i = t % r;
    const int64_t lj = t / r;
    const int64_t l = lj / dout;
    const acc_t b = to_acc(B[lj * r + i]);
    const acc_t a = to_acc(A[(l * r + i) * din + k]);
    G1[idx] = from_acc<T>(relu(b) * a);
    G2[idx] = from_acc<T>(relu(-b) * a);
  }
}

template <typename T>
__global__ void soft_threshold_kernel(const T* __restrict__ X, const typename Acc<T>::type* __restrict__ tau,
                                      int64_t n, int64_t inner, T* __restrict__ out) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[idx] = from_acc<T>(soft(to_acc(X[idx]), tau[idx / inner]));
  }
}

// ------------------------------------------------------------------------------------------
// One pass per unit: statistics, then the loss term, the gradient or the prox step.
// ------------------------------------------------------------------------------------------
enum UnitMode { kLoss = 0, kGrad = 1, kProx = 2 };

template <typename T, int MODE>
__global__ void unit_kernel(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ Ah,
                            const T* __restrict__ Bh, int64_t r, int64_t din, int64_t dout,
                            typename Acc<T>::type* __restrict__ partial, T* __restrict__ outA,
                            T* __restrict__ outB, const typename Acc<T>::type* __restrict__ lr,
                            const typename Acc<T>::type* __restrict__ lam1,
                            const typename Acc<T>::type* __restrict__ lam2) {
  using acc_t = typename Acc<T>::type;
  constexpr int NV = MODE == kProx ? 4 : 9;
  __shared__ acc_t red[NV * kMaxWarps];
  const int64_t u = blockIdx.x, l = u / r, i = u % r;
  const int64_t row = u * din, col = l * dout * r + i;
  // v: â, c, β̂, s  [, ‖E‖², ⟨E, Â⟩, β, q, δ for the loss]
  acc_t v[NV];
#pragma unroll
  for (int n = 0; n < NV; ++n) v[n] = 0;
  for (int64_t k = threadIdx.x; k < din; k += blockDim.x) {
    const acc_t a = to_acc(A[row + k]), ah = to_acc(Ah[row + k]);
    v[0] += ah * ah;
    v[1] += a * ah;
    if constexpr (MODE != kProx) {
      const acc_t e = a - ah;
      v[4] += e * e;
      v[5] += e * ah;
    }
  }
  for (int64_t j = threadIdx.x; j < dout; j += blockDim.x) {
    const acc_t b = to_acc(B[col + j * r]), bh = to_acc(Bh[col + j * r]);
    v[2] += bh * bh;
    v[3] += relu(b * bh);
    if constexpr (MODE != kProx) {
      const acc_t bp = relu(b), bn = relu(-b);
      const acc_t dp = bp - relu(bh), dn = bn - relu(-bh);
      v[6] += b * b;
      v[7] += bp * dp + bn * dn;
      v[8] += dp * dp + dn * dn;
    }
  }
  block_sum<NV>(v, red);
  const acc_t a_hat = v[0], c = v[1], beta_hat = v[2], s = v[3];
  if constexpr (MODE != kProx) {
    if (threadIdx.x == 0) partial[u] = v[6] * v[4] + acc_t(2) * v[7] * v[5] + v[8] * a_hat;
  }
  if constexpr (MODE == kLoss) return;
  acc_t step = 0, thr_a = 0, thr_b = 0;
  if constexpr (MODE == kProx) {
    step = lr[l];
    thr_a = step * lam1[l];
    thr_b = step * lam2[l];
  }
  for (int64_t k = threadIdx.x; k < din; k += blockDim.x) {
    const acc_t a = to_acc(A[row + k]), ah = to_acc(Ah[row + k]);
    const acc_t g = beta_hat * ah - s * a;
    if constexpr (MODE == kProx) {
      outA[row + k] = from_acc<T>(soft(ah - step * g, thr_a));
    } else {
      outA[row + k] = from_acc<T>(g);
    }
  }
  for (int64_t j = threadIdx.x; j < dout; j += blockDim.x) {
    const acc_t b = to_acc(B[col + j * r]), bh = to_acc(Bh[col + j * r]);
    const acc_t same = (b * bh) > acc_t(0) ? b : acc_t(0);
    const acc_t g = a_hat * bh - c * same;
    if constexpr (MODE == kProx) {
      outB[col + j * r] = from_acc<T>(soft(bh - step * g, thr_b));
    } else {
      outB[col + j * r] = from_acc<T>(g);
    }
  }
}

// loss[l] = ½ Σ_i partial[l, i] in unit order: reproducible run to run.
template <typename T>
__global__ void loss_reduce_kernel(const typename Acc<T>::type* __restrict__ partial, int64_t L, int64_t r,
                                   T* __restrict__ loss) {
  using acc_t = typename Acc<T>::type;
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l >= L) return;
  acc_t sum = 0;
  for (int64_t i = 0; i < r; ++i) sum += partial[l * r + i];
  loss[l] = from_acc<T>(acc_t(0.5) * sum);
}

// ------------------------------------------------------------------------------------------
// solve_fused: one block per unit for all iterations (backends/torch/dense.py restricted to
// it), then the unit's stats (F at the start and the end, nonzeros; common.h kStats).
// ------------------------------------------------------------------------------------------
enum SolveMethod { kIsta = 0, kFista = 1, kBcd = 2 };

// Buffers per side: originals and iterate; FISTA adds the previous iterate and the
// extrapolation point.
__host__ __device__ constexpr int buffers_per_side(int method) { return method == kFista ? 4 : 2; }

// Block sums of solve_kernel's last pass (its largest reduction).
constexpr int kSolveRed = 11;

// One iteration of METHOD with the generator penalty lg > 0 (tropfast/ops.py GENERATOR_PENALTY;
// backends/torch/dense.py is the specification): the Â step ends with the group shrink
// max(0, 1 − τ/‖·‖₂) of the sparse-group-lasso prox, the B̂ threshold grows by lg‖Â_i‖₂.
// FISTA writes the new iterate into (ahp, bhp); the caller swaps.  Kept apart from the
// loops without the penalty, which stay as they are.
template <int METHOD, typename acc_t>
__device__ __forceinline__ void gen_step(const acc_t* a, const acc_t* b, acc_t* ah, acc_t* bh, acc_t* ahp, acc_t* bhp,
                                         acc_t* ya, acc_t* yb, int64_t din, int64_t dout, acc_t lr, acc_t lam1,
                                         acc_t lam2, acc_t lg, acc_t thr_a, acc_t tiny, acc_t* mom, acc_t* red) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if constexpr (METHOD == kBcd) {
    acc_t v[3] = {0, 0, 0};  // s, β̂, ‖B̂‖₁
    for (int64_t j = tid; j < dout; j += nt) {
      v[0] += relu(b[j] * bh[j]);
      v[1] += bh[j] * bh[j];
      v[2] += abs_(bh[j]);
    }
    block_sum<3>(v, red);
    const bool has_b = v[1] > acc_t(0);
    const acc_t den_b = clamp_min(v[1], tiny);
    acc_t zz[1] = {0};
    for (int64_t k = tid; k < din; k += nt) {
      const acc_t z = soft(v[0] * a[k], lam1);
      ah[k] = z;
      zz[0] += z * z;
    }
    block_sum<1>(zz, red);
    acc_t g = acc_t(1) - lg * v[2] / clamp_min(sqrt_(zz[0]), tiny);
    g = g > acc_t(0) ? g : acc_t(0);
    acc_t w[2] = {0, 0};
    for (int64_t k = tid; k < din; k += nt) {
      const acc_t x = has_b ? (ah[k] * g) / den_b : acc_t(0);
      ah[k] = x;
      w[0] += a[k] * x;
      w[1] += x * x;
    }
    block_sum<2>(w, red);
    const bool ok = w[0] > acc_t(0) && w[1] > acc_t(0);
    const acc_t cpos = relu(w[0]);
    const acc_t den = clamp_min(w[1], tiny);
    const acc_t thr = lam2 + lg * sqrt_(w[1]);
    acc_t n1[2] = {0, 0};
    for (int64_t k = tid; k < din; k += nt) n1[0] += abs_(ah[k]);
    for (int64_t j = tid; j < dout; j += nt) {
      const acc_t mag = relu(cpos * abs_(b[j]) - thr) / den;
      const acc_t x = ok ? sign(b[j]) * mag : acc_t(0);
      bh[j] = x;
      n1[1] += abs_(x);
    }
    block_sum<2>(n1, red);
    if (n1[0] > acc_t(0) && n1[1] > acc_t(0) && lam1 > acc_t(0) && lam2 > acc_t(0)) {
      const acc_t sc = sqrt_((lam2 * n1[1]) / clamp_min(lam1 * n1[0], tiny));
      for (int64_t k = tid; k < din; k += nt) ah[k] *= sc;
      for (int64_t j = tid; j < dout; j += nt) bh[j] /= sc;
    }
  } else {
    // ISTA from x = (ah, bh); FISTA from y = x + w(x − xp), into (ahp, bhp)
    acc_t w = 0, mom_next = 1;
    const acc_t* xa = ah;
    const acc_t* xb = bh;
    if constexpr (METHOD == kFista) {
      mom_next = (acc_t(1) + sqrt_(acc_t(1) + acc_t(4) * (*mom) * (*mom))) / acc_t(2);
      w = (*mom - acc_t(1)) / mom_next;
      for (int64_t k = tid; k < din; k += nt) ya[k] = ah[k] + w * (ah[k] - ahp[k]);
      for (int64_t j = tid; j < dout; j += nt) yb[j] = bh[j] + w * (bh[j] - bhp[j]);
      xa = ya;
      xb = yb;
    }
    acc_t v[5] = {0, 0, 0, 0, 0};  // â, c, β̂, s, ‖B̂‖₁ at the point the step starts from
    for (int64_t k = tid; k < din; k += nt) {
      v[0] += xa[k] * xa[k];
      v[1] += a[k] * xa[k];
    }
    for (int64_t j = tid; j < dout; j += nt) {
      v[2] += xb[j] * xb[j];
      v[3] += relu(b[j] * xb[j]);
      v[4] += abs_(xb[j]);
    }
    block_sum<5>(v, red);
    acc_t* na = METHOD == kFista ? ahp : ah;
    acc_t* nb = METHOD == kFista ? bhp : bh;
    const acc_t thr_b = lr * (lam2 + lg * sqrt_(v[0]));
    acc_t uq[1] = {0};
    for (int64_t k = tid; k < din; k += nt) {
      const acc_t gr = v[2] * xa[k] - v[3] * a[k];
      const acc_t x = soft(xa[k] - lr * gr, thr_a);
      na[k] = x;
      uq[0] += x * x;
    }
    block_sum<1>(uq, red);
    acc_t g = acc_t(1) - lr * lg * v[4] / clamp_min(sqrt_(uq[0]), tiny);
    g = g > acc_t(0) ? g : acc_t(0);
    acc_t up[1] = {0};
    for (int64_t k = tid; k < din; k += nt) {
      const acc_t x = na[k] * g;
      na[k] = x;
      if constexpr (METHOD == kFista) up[0] += (xa[k] - x) * (x - ah[k]);
    }
    for (int64_t j = tid; j < dout; j += nt) {
      const acc_t same = (b[j] * xb[j]) > acc_t(0) ? b[j] : acc_t(0);
      const acc_t gr = v[0] * xb[j] - v[1] * same;
      const acc_t x = soft(xb[j] - lr * gr, thr_b);
      if constexpr (METHOD == kFista) up[0] += (xb[j] - x) * (x - bh[j]);
      nb[j] = x;
    }
    if constexpr (METHOD == kFista) {
      block_sum<1>(up, red);
      *mom = up[0] > acc_t(0) ? acc_t(1) : mom_next;
    }
  }
}

template <typename T, int METHOD>
__global__ void solve_kernel(const T* __restrict__ A, const T* __restrict__ B, int64_t r, int64_t din,
                             int64_t dout, const typename Acc<T>::type* __restrict__ lam1_,
                             const typename Acc<T>::type* __restrict__ lam2_,
                             const typename Acc<T>::type* __restrict__ lr_, int64_t steps, T* __restrict__ outA,
                             T* __restrict__ outB, typename Acc<T>::type* __restrict__ workspace,
                             typename Acc<T>::type* __restrict__ stats,
                             const typename Acc<T>::type* __restrict__ lam_gen_) {
  using acc_t = typename Acc<T>::type;
  constexpr int NB = buffers_per_side(METHOD);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red[kSolveRed * kMaxWarps];
  const int64_t u = blockIdx.x, l = u / r, i = u % r;
  const int64_t row = u * din, col = l * dout * r + i;
  acc_t* base = workspace != nullptr ? workspace + u * NB * (din + dout) : reinterpret_cast<acc_t*>(smem_raw);
  acc_t* a = base;
  acc_t* ah = a + din;
  acc_t* b = base + NB * din;
  acc_t* bh = b + dout;
  acc_t* ahp = nullptr;
  acc_t* ya = nullptr;
  acc_t* bhp = nullptr;
  acc_t* yb = nullptr;
  if constexpr (METHOD == kFista) {
    ahp = ah + din;
    ya = ahp + din;
    bhp = bh + dout;
    yb = bhp + dout;
  }
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int64_t k = tid; k < din; k += nt) {
    a[k] = to_acc(A[row + k]);
    ah[k] = a[k];
    if constexpr (METHOD == kFista) ahp[k] = a[k];
  }
  for (int64_t j = tid; j < dout; j += nt) {
    b[j] = to_acc(B[col + j * r]);
    bh[j] = b[j];
    if constexpr (METHOD == kFista) bhp[j] = b[j];
  }
  const acc_t lam1 = lam1_[l], lam2 = lam2_[l], lr = lr_[l];
  const acc_t thr_a = lr * lam1, thr_b = lr * lam2;
  const acc_t tiny = tiny_<acc_t>();
  // the generator penalty lg·‖Â_i‖₂‖B̂_i‖₁ (tropfast/ops.py GENERATOR_PENALTY); 0: none
  const acc_t lg = lam_gen_ != nullptr ? lam_gen_[l] : acc_t(0);
  acc_t mom = 1;

  for (int64_t t = 0; t < steps; ++t) {
    if (lg > acc_t(0)) {
      gen_step<METHOD>(a, b, ah, bh, ahp, bhp, ya, yb, din, dout, lr, lam1, lam2, lg, thr_a, tiny, &mom, red);
      if constexpr (METHOD == kFista) {
        acc_t* tmp = ah;
        ah = ahp;
        ahp = tmp;
        tmp = bh;
        bh = bhp;
        bhp = tmp;
      }
      continue;
    }
    if constexpr (METHOD == kIsta) {
      acc_t v[4] = {0, 0, 0, 0};
      for (int64_t k = tid; k < din; k += nt) {
        v[0] += ah[k] * ah[k];
        v[1] += a[k] * ah[k];
      }
      for (int64_t j = tid; j < dout; j += nt) {
        v[2] += bh[j] * bh[j];
        v[3] += relu(b[j] * bh[j]);
      }
      block_sum<4>(v, red);
      for (int64_t k = tid; k < din; k += nt) {
        const acc_t g = v[2] * ah[k] - v[3] * a[k];
        ah[k] = soft(ah[k] - lr * g, thr_a);
      }
      for (int64_t j = tid; j < dout; j += nt) {
        const acc_t same = (b[j] * bh[j]) > acc_t(0) ? b[j] : acc_t(0);
        const acc_t g = v[0] * bh[j] - v[1] * same;
        bh[j] = soft(bh[j] - lr * g, thr_b);
      }
    } else if constexpr (METHOD == kFista) {
      const acc_t mom_next = (acc_t(1) + sqrt_(acc_t(1) + acc_t(4) * mom * mom)) / acc_t(2);
      const acc_t w = (mom - acc_t(1)) / mom_next;
      acc_t v[4] = {0, 0, 0, 0};
      for (int64_t k = tid; k < din; k += nt) {
        const acc_t y = ah[k] + w * (ah[k] - ahp[k]);
        ya[k] = y;
        v[0] += y * y;
        v[1] += a[k] * y;
      }
      for (int64_t j = tid; j < dout; j += nt) {
        const acc_t y = bh[j] + w * (bh[j] - bhp[j]);
        yb[j] = y;
        v[2] += y * y;
        v[3] += relu(b[j] * y);
      }
      block_sum<4>(v, red);
      // The new iterate overwrites the previous one (no longer needed), then the roles swap.
      acc_t up[2] = {0, 0};
      for (int64_t k = tid; k < din; k += nt) {
        const acc_t y = ya[k];
        const acc_t g = v[2] * y - v[3] * a[k];
        const acc_t nx = soft(y - lr * g, thr_a);
        up[0] += (y - nx) * (nx - ah[k]);
        ahp[k] = nx;
      }
      for (int64_t j = tid; j < dout; j += nt) {
        const acc_t y = yb[j];
        const acc_t same = (b[j] * y) > acc_t(0) ? b[j] : acc_t(0);
        const acc_t g = v[0] * y - v[1] * same;
        const acc_t nx = soft(y - lr * g, thr_b);
        up[1] += (y - nx) * (nx - bh[j]);
        bhp[j] = nx;
      }
      block_sum<2>(up, red);
      acc_t* tmp = ah;
      ah = ahp;
      ahp = tmp;
      tmp = bh;
      bh = bhp;
      bhp = tmp;
      mom = (up[0] + up[1] > acc_t(0)) ? acc_t(1) : mom_next;
    } else {
      // Â_i = S_λ1(s_i A_i) / β̂_i
      acc_t v[2] = {0, 0};
      for (int64_t j = tid; j < dout; j += nt) {
        v[0] += relu(b[j] * bh[j]);
        v[1] += bh[j] * bh[j];
      }
      block_sum<2>(v, red);
      const bool has_b = v[1] > acc_t(0);
      const acc_t den_b = clamp_min(v[1], tiny);
      acc_t w[2] = {0, 0};
      for (int64_t k = tid; k < din; k += nt) {
        const acc_t z = soft(v[0] * a[k], lam1);
        const acc_t x = has_b ? z / den_b : acc_t(0);
        ah[k] = x;
        w[0] += a[k] * x;
        w[1] += x * x;
      }
      block_sum<2>(w, red);
      // B̂_ji = sign(B_ji) · max(c_i |B_ji| − λ2, 0) / â_i when c_i > 0, else 0
      const bool ok = w[0] > acc_t(0) && w[1] > acc_t(0);
      const acc_t cpos = relu(w[0]);
      const acc_t den = clamp_min(w[1], tiny);
      acc_t n1[2] = {0, 0};
      for (int64_t k = tid; k < din; k += nt) n1[0] += abs_(ah[k]);
      for (int64_t j = tid; j < dout; j += nt) {
        const acc_t mag = relu(cpos * abs_(b[j]) - lam2) / den;
        const acc_t x = ok ? sign(b[j]) * mag : acc_t(0);
        bh[j] = x;
        n1[1] += abs_(x);
      }
      block_sum<2>(n1, red);
      // Free rescaling (tÂ_i, B̂_i / t) minimising λ1 t‖Â_i‖₁ + λ2‖B̂_i‖₁ / t.
      if (n1[0] > acc_t(0) && n1[1] > acc_t(0) && lam1 > acc_t(0) && lam2 > acc_t(0)) {
        const acc_t sc = sqrt_((lam2 * n1[1]) / clamp_min(lam1 * n1[0], tiny));
        for (int64_t k = tid; k < din; k += nt) ah[k] *= sc;
        for (int64_t j = tid; j < dout; j += nt) bh[j] /= sc;
      }
    }
  }
  // Store, and sum the stats: ‖A_i‖₁, ‖B_i‖₁, ‖Â_i‖₁, ‖B̂_i‖₁, nonzeros stored, and the loss
  // terms ‖E‖², ⟨E, Â⟩, β, q, δ, â of closed_form._loss (E = A − Â).
  acc_t v[kSolveRed];
#pragma unroll
  for (int n = 0; n < kSolveRed; ++n) v[n] = 0;
  for (int64_t k = tid; k < din; k += nt) {
    const T o = from_acc<T>(ah[k]);
    outA[row + k] = o;
    const acc_t e = a[k] - ah[k];
    v[0] += abs_(a[k]);
    v[2] += abs_(ah[k]);
    v[4] += to_acc(o) != acc_t(0) ? acc_t(1) : acc_t(0);
    v[5] += e * e;
    v[6] += e * ah[k];
    v[10] += ah[k] * ah[k];
  }
  for (int64_t j = tid; j < dout; j += nt) {
    const T o = from_acc<T>(bh[j]);
    outB[col + j * r] = o;
    const acc_t bp = relu(b[j]), bn = relu(-b[j]);
    const acc_t dp = bp - relu(bh[j]), dn = bn - relu(-bh[j]);
    v[1] += abs_(b[j]);
    v[3] += abs_(bh[j]);
    v[4] += to_acc(o) != acc_t(0) ? acc_t(1) : acc_t(0);
    v[7] += b[j] * b[j];
    v[8] += bp * dp + bn * dn;
    v[9] += dp * dp + dn * dn;
  }
  block_sum<kSolveRed>(v, red);
  acc_t aa[1] = {0};
  if (lg > acc_t(0)) {
    for (int64_t k = tid; k < din; k += nt) aa[0] += a[k] * a[k];
    block_sum<1>(aa, red);
  }
  if (tid == 0) {
    const acc_t fit = v[7] * v[5] + acc_t(2) * v[8] * v[6] + v[9] * v[10];
    stats[3 * u] = lam1 * v[0] + lam2 * v[1];
    stats[3 * u + 1] = acc_t(0.5) * fit + lam1 * v[2] + lam2 * v[3];
    stats[3 * u + 2] = v[4];
    if (lg > acc_t(0)) {
      stats[3 * u] += lg * sqrt_(aa[0]) * v[1];
      stats[3 * u + 1] += lg * sqrt_(v[10]) * v[3];
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host launchers.
// ------------------------------------------------------------------------------------------
template <typename T>
int generators_t(const void* A, const void* B, void* G1, void* G2, Shape s, cudaStream_t st) {
  const int64_t n = s.L * s.d_out * s.r * s.d_in;
  if (n == 0) return 0;
  generators_kernel<T><<<grid_for(n, 256), 256, 0, st>>>(static_cast<const T*>(A), static_cast<const T*>(B),
                                                         static_cast<T*>(G1), static_cast<T*>(G2), s.r, s.d_in,
                                                         s.d_out, n);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int soft_threshold_t(const void* X, const void* tau, int64_t n, int64_t inner, void* out, cudaStream_t st) {
  if (n == 0) return 0;
  using acc_t = typename Acc<T>::type;
  soft_threshold_kernel<T><<<grid_for(n, 256), 256, 0, st>>>(static_cast<const T*>(X),
                                                             static_cast<const acc_t*>(tau), n, inner,
                                                             static_cast<T*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int MODE>
int unit_t(const void* A, const void* B, const void* Ah, const void* Bh, Shape s, void* loss, void* partial,
           void* outA, void* outB, const void* lr, const void* lam1, const void* lam2, cudaStream_t st) {
  using acc_t = typename Acc<T>::type;
  const int64_t units = s.L * s.r;
  acc_t* part = static_cast<acc_t*>(partial);
  if (units > 0) {
    unit_kernel<T, MODE><<<static_cast<unsigned>(units), unit_threads(s.d_in, s.d_out), 0, st>>>(
        static_cast<const T*>(A), static_cast<const T*>(B), static_cast<const T*>(Ah), static_cast<const T*>(Bh),
        s.r, s.d_in, s.d_out, part, static_cast<T*>(outA), static_cast<T*>(outB), static_cast<const acc_t*>(lr),
        static_cast<const acc_t*>(lam1), static_cast<const acc_t*>(lam2));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  if (MODE != kProx && s.L > 0) {
    loss_reduce_kernel<T><<<grid_for(s.L, 128), 128, 0, st>>>(part, s.L, s.r, static_cast<T*>(loss));
    return static_cast<int>(cudaGetLastError());
  }
  return 0;
}

template <typename T>
size_t unit_bytes(Shape s, int method) {
  return sizeof(typename Acc<T>::type) * static_cast<size_t>(buffers_per_side(method)) *
         static_cast<size_t>(s.d_in + s.d_out);
}

// Shared memory per block: dynamic bytes to request, or -1 when the unit must live in global
// workspace instead.
template <typename T>
int shared_plan(Shape s, int method, int64_t* dyn_bytes) {
  const size_t need = unit_bytes<T>(s, method);
  const size_t static_red = sizeof(typename Acc<T>::type) * kSolveRed * kMaxWarps;
  if (need <= 48 * 1024 - static_red) {
    *dyn_bytes = static_cast<int64_t>(need);
    return 0;
  }
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return static_cast<int>(err);
  *dyn_bytes = need + static_red <= static_cast<size_t>(optin) ? static_cast<int64_t>(need) : -1;
  return 0;
}

template <typename T, int METHOD>
int solve_launch(const void* A, const void* B, Shape s, const void* lam1, const void* lam2, const void* lr,
                 int64_t steps, void* outA, void* outB, void* workspace, void* stats, cudaStream_t st,
                 const void* lam_gen) {
  using acc_t = typename Acc<T>::type;
  const int64_t units = s.L * s.r;
  if (units == 0) return 0;
  int64_t dyn = 0;
  int err = shared_plan<T>(s, METHOD, &dyn);
  if (err != 0) return err;
  auto kernel = solve_kernel<T, METHOD>;
  acc_t* ws = nullptr;
  if (dyn < 0) {
    if (workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    ws = static_cast<acc_t*>(workspace);
    dyn = 0;
  } else if (dyn + sizeof(acc_t) * kSolveRed * kMaxWarps > 48 * 1024) {
    // Above 48 KiB of shared memory per block (static + dynamic) a kernel must opt in.
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  kernel<<<static_cast<unsigned>(units), unit_threads(s.d_in, s.d_out), static_cast<size_t>(dyn), st>>>(
      static_cast<const T*>(A), static_cast<const T*>(B), s.r, s.d_in, s.d_out, static_cast<const acc_t*>(lam1),
      static_cast<const acc_t*>(lam2), static_cast<const acc_t*>(lr), steps, static_cast<T*>(outA),
      static_cast<T*>(outB), ws, static_cast<acc_t*>(stats), static_cast<const acc_t*>(lam_gen));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int solve_t(const void* A, const void* B, Shape s, const void* lam1, const void* lam2, const void* lr, int method,
            int64_t steps, void* outA, void* outB, void* workspace, void* stats, cudaStream_t st, const void* lam_gen) {
  switch (method) {
    case kIsta:
      return solve_launch<T, kIsta>(A, B, s, lam1, lam2, lr, steps, outA, outB, workspace, stats, st, lam_gen);
    case kFista:
      return solve_launch<T, kFista>(A, B, s, lam1, lam2, lr, steps, outA, outB, workspace, stats, st, lam_gen);
    case kBcd:
      return solve_launch<T, kBcd>(A, B, s, lam1, lam2, lr, steps, outA, outB, workspace, stats, st, lam_gen);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T>
int workspace_t(Shape s, int method, size_t* bytes) {
  int64_t dyn = 0;
  const int err = shared_plan<T>(s, method, &dyn);
  if (err != 0) return err;
  *bytes = dyn < 0 ? unit_bytes<T>(s, method) * static_cast<size_t>(s.L * s.r) : 0;
  return 0;
}

// ------------------------------------------------------------------------------------------
// solve_sorted: one thread per unit runs sorted.h's recurrences on the unit's sorted
// magnitudes (sorted by the caller with a segmented sort); then one thread per output
// element reads its unit's final state.
// ------------------------------------------------------------------------------------------
template <typename T>
struct SortedArgs {
  using S = typename Acc<T>::type;
  const S *xa, *xb;
  const double *pa1, *pa2, *pb1, *pb2;
  int64_t din, dout;
  __device__ sorted::Sorted<S> row(int64_t u) const {
    return {xa + u * din, pa1 + u * (din + 1), pa2 + u * (din + 1), din};
  }
  __device__ sorted::Sorted<S> col(int64_t u) const {
    return {xb + u * dout, pb1 + u * (dout + 1), pb2 + u * (dout + 1), dout};
  }
};

template <typename T, int METHOD>
__global__ void sorted_state_kernel(SortedArgs<T> g, int64_t r, int64_t units, const typename Acc<T>::type* lam1,
                                    const typename Acc<T>::type* lam2, const typename Acc<T>::type* lr,
                                    int64_t steps, void* state, unsigned char* bad,
                                    const typename Acc<T>::type* lam_gen) {
  using S = typename Acc<T>::type;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= units) return;
  const int64_t l = u / r;
  const sorted::Sorted<S> SA = g.row(u), SB = g.col(u);
  const double lg = lam_gen != nullptr ? static_cast<double>(lam_gen[l]) : 0.0;
  if (METHOD == kBcd) {
    sorted::bcd_unit(SA, SB, static_cast<double>(lam1[l]), static_cast<double>(lam2[l]), steps,
                     static_cast<sorted::BcdState<S>*>(state) + u, true, lg);
    bad[u] = 0;
  } else {
    sorted::IstaState* st = static_cast<sorted::IstaState*>(state) + u;
    sorted::ista_unit(SA, SB, static_cast<double>(lam1[l]), static_cast<double>(lam2[l]),
                      static_cast<double>(lr[l]), steps, st, lg);
    bad[u] = st->bad ? 1 : 0;
  }
}

// Â from the units' states: element (l, i, k) of A belongs to unit l·r + i.
template <typename T, int METHOD>
__global__ void sorted_write_a(const T* A, SortedArgs<T> g, int64_t n, const void* state, T* out) {
  using S = typename Acc<T>::type;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = e / g.din;
    const S a = to_acc(A[e]);
    if (METHOD == kBcd) {
      const sorted::BcdState<S>& st = static_cast<const sorted::BcdState<S>*>(state)[u];
      out[e] = from_acc<T>(sorted::piece_value(a, st.kA, st.mA, sorted::smallest_kept(g.row(u), st.jA)));
    } else {
      const sorted::IstaState& st = static_cast<const sorted::IstaState*>(state)[u];
      out[e] = from_acc<T>(static_cast<S>(sorted::ista_value(g.row(u), st, static_cast<double>(a))));
    }
  }
}

// B̂ from the units' states: element (l, j, i) of B belongs to unit l·r + i.
template <typename T, int METHOD>
__global__ void sorted_write_b(const T* B, SortedArgs<T> g, int64_t r, int64_t n, const void* state, T* out) {
  using S = typename Acc<T>::type;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = (e / (g.dout * r)) * r + e % r;
    const S b = to_acc(B[e]);
    if (METHOD == kBcd) {
      const sorted::BcdState<S>& st = static_cast<const sorted::BcdState<S>*>(state)[u];
      out[e] = from_acc<T>(sorted::piece_value(b, st.kB, st.mB, sorted::smallest_kept(g.col(u), st.jB)));
    } else {
      const sorted::IstaState& st = static_cast<const sorted::IstaState*>(state)[u];
      const double v = sorted::piece_value<double>(static_cast<double>(b), st.kB, st.mB,
                                                   sorted::smallest_kept(g.col(u), st.jB));
      out[e] = from_acc<T>(static_cast<S>(v));
    }
  }
}

template <typename T, int METHOD>
int sorted_launch(const void* A, const void* B, Shape s, SortedArgs<T> g, const void* lam1, const void* lam2,
                  const void* lr, int64_t steps, void* state, unsigned char* bad, void* oA, void* oB,
                  cudaStream_t st, const void* lam_gen) {
  using S = typename Acc<T>::type;
  const int64_t units = s.L * s.r;
  if (units == 0) return 0;
  constexpr int kThreads = 128;
  sorted_state_kernel<T, METHOD><<<static_cast<unsigned>((units + kThreads - 1) / kThreads), kThreads, 0, st>>>(
      g, s.r, units, static_cast<const S*>(lam1), static_cast<const S*>(lam2), static_cast<const S*>(lr), steps, state,
      bad, static_cast<const S*>(lam_gen));
  const int64_t na = units * s.d_in, nb = units * s.d_out;
  if (na > 0) {
    sorted_write_a<T, METHOD><<<grid_for(na, 256), 256, 0, st>>>(static_cast<const T*>(A), g, na, state,
                                                                  static_cast<T*>(oA));
  }
  if (nb > 0) {
    sorted_write_b<T, METHOD><<<grid_for(nb, 256), 256, 0, st>>>(static_cast<const T*>(B), g, s.r, nb, state,
                                                                  static_cast<T*>(oB));
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int sorted_t(const void* A, const void* B, Shape s, const void* xa, const double* pa1, const double* pa2,
             const void* xb, const double* pb1, const double* pb2, const void* lam1, const void* lam2, const void* lr,
             int method, int64_t steps, void* state, unsigned char* bad, void* oA, void* oB, cudaStream_t st,
             const void* lam_gen) {
  using S = typename Acc<T>::type;
  SortedArgs<T> g{static_cast<const S*>(xa), static_cast<const S*>(xb), pa1, pa2, pb1, pb2, s.d_in, s.d_out};
  if (method == kBcd)
    return sorted_launch<T, kBcd>(A, B, s, g, lam1, lam2, lr, steps, state, bad, oA, oB, st, lam_gen);
  if (method == kIsta)
    return sorted_launch<T, kIsta>(A, B, s, g, lam1, lam2, lr, steps, state, bad, oA, oB, st, lam_gen);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

#define TROPFAST_CUDA_DISPATCH(dt, FN, ...)                                              \
  switch (dt) {                                                                         \
    case DType::kFloat32:                                                               \
      return FN<float>(__VA_ARGS__);                                                    \
    case DType::kFloat64:                                                               \
      return FN<double>(__VA_ARGS__);                                                   \
    case DType::kFloat16:                                                               \
      return FN<__half>(__VA_ARGS__);                                                   \
    case DType::kBFloat16:                                                              \
      return FN<__nv_bfloat16>(__VA_ARGS__);                                            \
  }                                                                                     \
  return static_cast<int>(cudaErrorInvalidValue)

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int generators(DType dt, const void* A, const void* B, void* G1, void* G2, Shape s, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TROPFAST_CUDA_DISPATCH(dt, generators_t, A, B, G1, G2, s, st);
}

int soft_threshold(DType dt, const void* X, const void* tau, int64_t n, int64_t inner, void* out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TROPFAST_CUDA_DISPATCH(dt, soft_threshold_t, X, tau, n, inner, out, st);
}

template <typename T>
int hsd_t(const void* A, const void* B, const void* Ah, const void* Bh, Shape s, void* loss, void* partial,
          void* gA, void* gB, cudaStream_t st) {
  if (gA != nullptr) return unit_t<T, kGrad>(A, B, Ah, Bh, s, loss, partial, gA, gB, nullptr, nullptr, nullptr, st);
  return unit_t<T, kLoss>(A, B, Ah, Bh, s, loss, partial, nullptr, nullptr, nullptr, nullptr, nullptr, st);
}

int hsd(DType dt, const void* A, const void* B, const void* A_hat, const void* B_hat, Shape s, void* loss,
        void* partial, void* grad_A, void* grad_B, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TROPFAST_CUDA_DISPATCH(dt, hsd_t, A, B, A_hat, B_hat, s, loss, partial, grad_A, grad_B, st);
}

template <typename T>
int prox_t(const void* A, const void* B, const void* Ah, const void* Bh, Shape s, const void* lr, const void* lam1,
           const void* lam2, void* oA, void* oB, cudaStream_t st) {
  return unit_t<T, kProx>(A, B, Ah, Bh, s, nullptr, nullptr, oA, oB, lr, lam1, lam2, st);
}

int prox_step(DType dt, const void* A, const void* B, const void* A_hat, const void* B_hat, Shape s,
              const void* lr, const void* lam1, const void* lam2, void* out_A, void* out_B, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TROPFAST_CUDA_DISPATCH(dt, prox_t, A, B, A_hat, B_hat, s, lr, lam1, lam2, out_A, out_B, st);
}

int solve_fused_workspace(DType dt, Shape s, int method, size_t* bytes) {
  if (method < kIsta || method > kBcd) return static_cast<int>(cudaErrorInvalidValue);
  TROPFAST_CUDA_DISPATCH(dt, workspace_t, s, method, bytes);
}

int solve_fused(DType dt, const void* A, const void* B, Shape s, const void* lam1, const void* lam2,
                const void* lr, int method, int64_t steps, void* out_A, void* out_B, void* workspace, void* stats,
                void* stream, const void* lam_gen) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TROPFAST_CUDA_DISPATCH(dt, solve_t, A, B, s, lam1, lam2, lr, method, steps, out_A, out_B, workspace, stats, st,
                         lam_gen);
}

size_t solve_sorted_state_bytes(DType dt, Shape s, int method) {
  const size_t per = method != kBcd             ? sizeof(sorted::IstaState)
                     : dt == DType::kFloat64 ? sizeof(sorted::BcdState<double>)
                                             : sizeof(sorted::BcdState<float>);
  return per * static_cast<size_t>(s.L * s.r);
}

int solve_sorted(DType dt, const void* A, const void* B, Shape s, const void* xa, const double* pa1,
                 const double* pa2, const void* xb, const double* pb1, const double* pb2, const void* lam1,
                 const void* lam2, const void* lr, int method, int64_t steps, void* state, unsigned char* bad,
                 void* out_A, void* out_B, void* stream, const void* lam_gen) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TROPFAST_CUDA_DISPATCH(dt, sorted_t, A, B, s, xa, pa1, pa2, xb, pb1, pb2, lam1, lam2, lr, method, steps, state, bad,
                         out_A, out_B, st, lam_gen);
}

#undef TROPFAST_CUDA_DISPATCH

}  // namespace cuda
}  // namespace tropfast
