// Input normalisation shared by the CPU and CUDA registrations of the tropfast:: ops.
// The schemas and rules live in tropfast/ops.py (the op contract); these checks implement
// the same rules as its check_pair / param_vector / solve_args, message for message, and
// tests/backends/test_contract.py runs one table of bad calls through every backend.
// Op-level conventions:
//   A, A_hat: (r, d_in) or (L, r, d_in);  B, B_hat: (d_out, r) or (L, d_out, r)
//   lr, lam1, lam2, tau: shape () or (L,), any floating dtype and any device
//   float16 / bfloat16 are computed in float32 and returned in the input dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace tropfast {

enum Method : int { kIsta = 0, kFista = 1, kBcd = 2 };

namespace cpu {
// The vector width of the CPU's ISTA and FISTA loops (cpu/ista_x86.h): "avx512", "avx2" or
// "generic" (the compiler's vectorisation of the scalar loops).
std::string simd_level();
// Use a narrower width than the CPU's widest (tests and benchmarks compare them); returns the
// width now in use, which is never wider than the CPU runs.
std::string set_simd_level(const std::string& name);
}  // namespace cpu

inline at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_dtype(const at::Tensor& x, const char* op, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op, ": ", name,
              " has dtype ", t, "; supported dtypes are float16, bfloat16, float32 and float64");
}

// One or more adapters as contiguous (L, r, d_in) / (L, d_out, r) tensors of one dtype.
struct Batch {
  at::Tensor A, B, Ah, Bh;  // Ah / Bh undefined for ops that take only (A, B)
  int64_t L = 0, r = 0, d_in = 0, d_out = 0;
  bool squeeze = false;  // the input was a single adapter (2-D)
};

inline at::Tensor as_batched(const at::Tensor& x, bool squeeze, at::ScalarType t) {
  return (squeeze ? x.unsqueeze(0) : x).to(t).contiguous();
}

inline Batch make_batch(const char* op, const at::Tensor& A, const at::Tensor& B, const at::Tensor* Ah = nullptr,
                        const at::Tensor* Bh = nullptr) {
  TORCH_CHECK_VALUE(A.dim() == 2 || A.dim() == 3, op, ": A must be (r, d_in) or (L, r, d_in), got shape ", A.sizes());
  TORCH_CHECK_VALUE(B.dim() == A.dim(), op, ": B must have ", A.dim(), " dims to match A ", A.sizes(), ", got ",
              B.sizes());
  TORCH_CHECK_VALUE(B.size(-1) == A.size(-2), op, ": A ", A.sizes(), " has r=", A.size(-2), " rows but B ", B.sizes(),
              " has ", B.size(-1), " columns");
  TORCH_CHECK_VALUE(A.dim() == 2 || A.size(0) == B.size(0), op, ": A has ", A.size(0), " adapters, B has ", B.size(0));
  TORCH_CHECK_VALUE(A.device() == B.device(), op, ": A is on ", A.device(), " but B is on ", B.device());
  check_dtype(A, op, "A");
  TORCH_CHECK_TYPE(B.scalar_type() == A.scalar_type(), op, ": A is ", A.scalar_type(), " but B is ", B.scalar_type(),
              "; use one dtype");
  Batch out;
  out.squeeze = A.dim() == 2;
  const auto t = A.scalar_type();
  out.A = as_batched(A, out.squeeze, t);
  out.B = as_batched(B, out.squeeze, t);
  out.L = out.A.size(0);
  out.r = out.A.size(1);
  out.d_in = out.A.size(2);
  out.d_out = out.B.size(1);
  if (Ah != nullptr) {
    TORCH_CHECK_VALUE(Ah->sizes() == A.sizes(), op, ": A_hat has shape ", Ah->sizes(), " but must match A ", A.sizes());
    TORCH_CHECK_VALUE(Bh->sizes() == B.sizes(), op, ": B_hat has shape ", Bh->sizes(), " but must match B ", B.sizes());
    TORCH_CHECK_VALUE(Ah->device() == A.device() && Bh->device() == A.device(), op,
                ": A_hat and B_hat must be on the device of A (", A.device(), ")");
    out.Ah = as_batched(*Ah, out.squeeze, t);
    out.Bh = as_batched(*Bh, out.squeeze, t);
  }
  return out;
}

// A scalar-or-per-adapter parameter as a contiguous (L,) tensor of the compute dtype on
// `device`; rounding to the compute dtype first matches the closed form's `_scal`.
inline at::Tensor param_vector(const at::Tensor& p, int64_t L, at::ScalarType compute, at::Device device,
                               const char* op, const char* name) {
  TORCH_CHECK_VALUE(p.dim() <= 1 && (p.numel() == 1 || p.numel() == L), op, ": ", name, " must have shape () or (",
              L, ",), got ", p.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()) || at::isIntegralType(p.scalar_type(), false), op, ": ", name,
              " must be real, got dtype ", p.scalar_type());
  return p.reshape({-1}).to(device, compute).expand({L}).contiguous();
}

inline Method parse_method(c10::string_view method, const char* op = "solve_fused") {
  if (method == "ista") return kIsta;
  if (method == "fista") return kFista;
  if (method == "bcd") return kBcd;
  TORCH_CHECK_VALUE(false, op, ": unknown method '", std::string(method), "'; choose ista, fista or bcd");
  return kIsta;
}

// The checked input of a whole solve (solve_fused, solve_sorted): the batch and its
// per-adapter (lam1, lam2, lr, lam_gen) in the compute dtype on `device`.  `gen` is false when
// lam_gen is absent or zero for every adapter (then lam_gen is undefined and the kernels run
// exactly the solve without the generator penalty, as ops.solve_args does).
struct SolveInput {
  Method method;
  Batch x;
  at::Tensor lam1, lam2, lr, lam_gen;
  int64_t steps = 0;
  bool gen = false;
};

// Columns of the whole solves' stats (tropfast/ops.py N_STATS): F at the start, F at the
// end, nonzeros of (Â, B̂); per unit first, then summed per adapter in unit order.
constexpr int kStats = 3;

// stats (L, 3) float64 from per-unit partials (L·r, 3) of any floating type, summed in unit
// order (reproducible for any thread count); squeezed to (3,) for a single adapter.
inline at::Tensor adapter_stats(const at::Tensor& per_unit, int64_t L, int64_t r, bool squeeze) {
  at::Tensor s = per_unit.to(at::kDouble).view({L, r, kStats}).sum(1);
  return squeeze ? s.squeeze(0) : s;
}

inline SolveInput solve_input(const char* op, const at::Tensor& A, const at::Tensor& B, const at::Tensor& lam1,
                              const at::Tensor& lam2, const at::Tensor& lr, c10::string_view method, int64_t steps,
                              at::Device device, const c10::optional<at::Tensor>& lam_gen = c10::nullopt) {
  SolveInput in;
  in.method = parse_method(method, op);
  TORCH_CHECK_VALUE(steps >= 0, op, ": steps must be >= 0, got ", steps);
  in.x = make_batch(op, A, B);
  in.steps = steps;
  const at::ScalarType ct = compute_type(in.x.A.scalar_type());
  in.lam1 = param_vector(lam1, in.x.L, ct, device, op, "lam1");
  in.lam2 = param_vector(lam2, in.x.L, ct, device, op, "lam2");
  in.lr = param_vector(lr, in.x.L, ct, device, op, "lr");
  if (lam_gen.has_value() && lam_gen->defined()) {
    at::Tensor lg = param_vector(*lam_gen, in.x.L, ct, device, op, "lam_gen");
    if (lg.numel() > 0 && lg.ne(0).any().item<bool>()) {
      in.lam_gen = lg;
      in.gen = true;
    }
  }
  return in;
}

// The result of a batched computation in the layout of `like`: squeezed back for a single
// adapter, and with like's strides (what the fake kernels' empty_like promises).
inline at::Tensor finish(const at::Tensor& out3, bool squeeze, const at::Tensor& like) {
  at::Tensor out = squeeze ? out3.squeeze(0) : out3;
  if (like.is_contiguous() || like.sizes() != out.sizes()) return out;
  at::Tensor res = at::empty_like(like);
  res.copy_(out);
  return res;
}

}  // namespace tropfast
