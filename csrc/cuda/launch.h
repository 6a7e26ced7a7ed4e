// Plain C++ interface of the CUDA kernels in kernels.cu: raw device pointers, no torch types,
// so the .cu needs only the CUDA toolkit and cuda_ops.cpp needs no CUDA headers from ATen.
//
// Layouts (contiguous): A, A_hat (L, r, d_in); B, B_hat (L, d_out, r); per-adapter
// parameters are (L,) arrays on the device in the compute type (float for float16 /
// bfloat16 / float32, double for float64).  Every function returns a cudaError_t as int
// (0 = success); error_string turns it into a message.  `stream` is a cudaStream_t.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tropfast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Shape {
  int64_t L, r, d_in, d_out;
};

const char* error_string(int code);

// G1[l, j, i, :] = relu(B[l, j, i]) · A[l, i, :], G2 with relu(−B): (L, d_out, r, d_in) each.
int generators(DType dt, const void* A, const void* B, void* G1, void* G2, Shape s, void* stream);

// out = sign(X)·max(|X| − tau[k / inner], 0) over n elements.
int soft_threshold(DType dt, const void* X, const void* tau, int64_t n, int64_t inner, void* out, void* stream);

// Per-unit closed form.  loss (L,) in the input dtype, or null; grad_A / grad_B, or null.
// `partial` is a device workspace of L·r compute-type numbers (needed when loss is set).
int hsd(DType dt, const void* A, const void* B, const void* A_hat, const void* B_hat, Shape s, void* loss,
        void* partial, void* grad_A, void* grad_B, void* stream);

// One proximal-gradient step from (A_hat, B_hat) into (out_A, out_B).
int prox_step(DType dt, const void* A, const void* B, const void* A_hat, const void* B_hat, Shape s,
              const void* lr, const void* lam1, const void* lam2, void* out_A, void* out_B, void* stream);

// Bytes of device workspace solve_fused needs: 0 when a unit's buffers fit in shared memory
// of the current device, else a global-memory scratch of that size.
int solve_fused_workspace(DType dt, Shape s, int method, size_t* bytes);

// `steps` iterations of method 0 = ista, 1 = fista, 2 = bcd from (A, B); one block per unit.
// stats: (L·r, 3) compute-type numbers per unit: F's share at the start and the end, and the
// nonzeros of the stored iterate (summed per adapter by the caller).  lam_gen: (L,) weights of
// the generator penalty (tropfast/ops.py GENERATOR_PENALTY), or null for none.
int solve_fused(DType dt, const void* A, const void* B, Shape s, const void* lam1, const void* lam2,
                const void* lr, int method, int64_t steps, void* out_A, void* out_B, void* workspace, void* stats,
                void* stream, const void* lam_gen = nullptr);

// solve_sorted (sorted.h): `steps` iterations of method 0 = ista or 2 = bcd on the sorted
// path, one thread per unit, then one thread per output element.  xa (L·r, d_in) and
// xb (L·r, d_out): |A|'s rows and |B|'s columns sorted descending, in the compute type;
// pa1/pa2 (L·r, d_in + 1) and pb1/pb2 (L·r, d_out + 1): their prefix sums of x and x², in
// double, each row starting at 0.  `state`: solve_sorted_state_bytes of device workspace.
// bad (L·r bytes): set to 1 for an ISTA unit whose iterate left the sorted form (its output
// is then meaningless and the caller solves it densely), else 0.
size_t solve_sorted_state_bytes(DType dt, Shape s, int method);
int solve_sorted(DType dt, const void* A, const void* B, Shape s, const void* xa, const double* pa1,
                 const double* pa2, const void* xb, const double* pb1, const double* pb2, const void* lam1,
                 const void* lam2, const void* lr, int method, int64_t steps, void* state, unsigned char* bad,
                 void* out_A, void* out_B, void* stream, const void* lam_gen = nullptr);

}  // namespace cuda
}  // namespace tropfast
