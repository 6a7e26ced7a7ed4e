// CUDA registrations of the tropfast:: ops (compiled only in CUDA builds).  The kernels sit
// behind the plain interface of cuda/launch.h; this file only turns tensors into pointers,
// on the tensors' device and current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common.h"
#include "launch.h"

namespace tropfast {
namespace cuda_ops {
namespace {

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "tropfast CUDA kernels: unsupported dtype ", t);
  }
  return cuda::DType::kFloat32;
}

void check(int code, const char* op) {
  TORCH_CHECK(code == 0, "tropfast::", op, ": CUDA error: ", cuda::error_string(code));
}

void* stream_of(const at::Tensor& x) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
}

cuda::Shape shape_of(const Batch& x) { return {x.L, x.r, x.d_in, x.d_out}; }

void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "tropfast::", op, ": expected CUDA tensors, got one on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> generators_cuda(const at::Tensor& A_, const at::Tensor& B_) {
  check_cuda(A_, "generators");
  c10::cuda::CUDAGuard guard(A_.device());
  Batch x = make_batch("generators", A_, B_);
  at::Tensor G1 = at::empty({x.L, x.d_out, x.r, x.d_in}, x.A.options());
  at::Tensor G2 = at::empty({x.L, x.d_out, x.r, x.d_in}, x.A.options());
  check(cuda::generators(dtype_of(x.A.scalar_type()), x.A.data_ptr(), x.B.data_ptr(), G1.data_ptr(), G2.data_ptr(),
                         shape_of(x), stream_of(x.A)),
        "generators");
  if (x.squeeze) return {G1.squeeze(0), G2.squeeze(0)};
  return {G1, G2};
}

// loss (L,) and, when grads is set, (∂/∂Â, ∂/∂B̂).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hsd_common(const char* op, const at::Tensor& A,
                                                          const at::Tensor& B, const at::Tensor& Ah,
                                                          const at::Tensor& Bh, bool grads) {
  check_cuda(A, op);
  c10::cuda::CUDAGuard guard(A.device());
  Batch x = make_batch(op, A, B, &Ah, &Bh);
  at::Tensor loss = at::empty({x.L}, x.A.options());
  at::Tensor partial = at::empty({x.L * x.r}, x.A.options().dtype(compute_type(x.A.scalar_type())));
  at::Tensor gA, gB;
  if (grads) {
    gA = at::empty_like(x.Ah);
    gB = at::empty_like(x.Bh);
  }
  check(cuda::hsd(dtype_of(x.A.scalar_type()), x.A.data_ptr(), x.B.data_ptr(), x.Ah.data_ptr(), x.Bh.data_ptr(),
                  shape_of(x), loss.data_ptr(), partial.data_ptr(), grads ? gA.data_ptr() : nullptr,
                  grads ? gB.data_ptr() : nullptr, stream_of(x.A)),
        op);
  if (x.squeeze) loss = loss.squeeze(0);
  if (!grads) return {loss, gA, gB};
  return {loss, finish(gA, x.squeeze, Ah), finish(gB, x.squeeze, Bh)};
}

at::Tensor hsd_loss_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& Ah, const at::Tensor& Bh) {
  return std::get<0>(hsd_common("hsd_loss", A, B, Ah, Bh, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hsd_grad_cuda(const at::Tensor& A, const at::Tensor& B,
                                                             const at::Tensor& Ah, const at::Tensor& Bh) {
  return hsd_common("hsd_grad", A, B, Ah, Bh, true);
}

at::Tensor soft_threshold_cuda(const at::Tensor& X_, const at::Tensor& tau_) {
  check_cuda(X_, "soft_threshold");
  check_dtype(X_, "soft_threshold", "X");
  c10::cuda::CUDAGuard guard(X_.device());
  const bool per_adapter = tau_.numel() != 1;
  TORCH_CHECK(tau_.dim() <= 1, "soft_threshold: tau must have shape () or (L,), got ", tau_.sizes());
  TORCH_CHECK(!per_adapter || (X_.dim() == 3 && tau_.numel() == X_.size(0)), "soft_threshold: a per-adapter tau of shape ",
              tau_.sizes(), " needs a batched X of shape (L, m, n) with L = ", tau_.numel(), ", got X ", X_.sizes());
  const int64_t outer = per_adapter ? X_.size(0) : 1;
  at::Tensor tau = param_vector(tau_, outer, compute_type(X_.scalar_type()), X_.device(), "soft_threshold", "tau");
  at::Tensor X = X_.contiguous();
  at::Tensor out = at::empty_like(X);
  const int64_t n = X.numel();
  if (n > 0) {
    check(cuda::soft_threshold(dtype_of(X.scalar_type()), X.data_ptr(), tau.data_ptr(), n, n / outer, out.data_ptr(),
                               stream_of(X)),
          "soft_threshold");
  }
  return finish(out, false, X_);
}

std::tuple<at::Tensor, at::Tensor> prox_step_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& Ah,
                                                  const at::Tensor& Bh, const at::Tensor& lr_, const at::Tensor& lam1_,
                                                  const at::Tensor& lam2_) {
  check_cuda(A, "prox_step");
  c10::cuda::CUDAGuard guard(A.device());
  Batch x = make_batch("prox_step", A, B, &Ah, &Bh);
  const at::ScalarType ct = compute_type(x.A.scalar_type());
  at::Tensor lr = param_vector(lr_, x.L, ct, x.A.device(), "prox_step", "lr");
  at::Tensor lam1 = param_vector(lam1_, x.L, ct, x.A.device(), "prox_step", "lam1");
  at::Tensor lam2 = param_vector(lam2_, x.L, ct, x.A.device(), "prox_step", "lam2");
  at::Tensor oA = at::empty_like(x.Ah);
  at::Tensor oB = at::empty_like(x.Bh);
  check(cuda::prox_step(dtype_of(x.A.scalar_type()), x.A.data_ptr(), x.B.data_ptr(), x.Ah.data_ptr(),
                        x.Bh.data_ptr(), shape_of(x), lr.data_ptr(), lam1.data_ptr(), lam2.data_ptr(), oA.data_ptr(),
                        oB.data_ptr(), stream_of(x.A)),
        "prox_step");
  return {finish(oA, x.squeeze, Ah), finish(oB, x.squeeze, Bh)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_fused_cuda(const at::Tensor& A_, const at::Tensor& B_,
                                                                const at::Tensor& lam1_, const at::Tensor& lam2_,
                                                                const at::Tensor& lr_, c10::string_view method_,
                                                                int64_t steps,
                                                                const c10::optional<at::Tensor>& lam_gen_) {
  check_cuda(A_, "solve_fused");
  c10::cuda::CUDAGuard guard(A_.device());
  const SolveInput in = solve_input("solve_fused", A_, B_, lam1_, lam2_, lr_, method_, steps, A_.device(), lam_gen_);
  const Batch& x = in.x;
  const Method method = in.method;
  const at::Tensor &lam1 = in.lam1, &lam2 = in.lam2, &lr = in.lr;
  at::Tensor oA = at::empty_like(x.A);
  at::Tensor oB = at::empty_like(x.B);
  at::Tensor per_unit = at::zeros({x.L * x.r, kStats}, x.A.options().dtype(compute_type(x.A.scalar_type())));
  const cuda::DType dt = dtype_of(x.A.scalar_type());
  size_t ws_bytes = 0;
  check(cuda::solve_fused_workspace(dt, shape_of(x), static_cast<int>(method), &ws_bytes), "solve_fused");
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.A.options().dtype(at::kByte));
  check(cuda::solve_fused(dt, x.A.data_ptr(), x.B.data_ptr(), shape_of(x), lam1.data_ptr(), lam2.data_ptr(),
                          lr.data_ptr(), static_cast<int>(method), steps, oA.data_ptr(), oB.data_ptr(),
                          ws_bytes > 0 ? ws.data_ptr() : nullptr, per_unit.data_ptr(), stream_of(x.A),
                          in.gen ? in.lam_gen.data_ptr() : nullptr),
        "solve_fused");
  return {finish(oA, x.squeeze, A_), finish(oB, x.squeeze, B_), adapter_stats(per_unit, x.L, x.r, x.squeeze)};
}

// The stats of an iterate by extra passes (the sorted path's recurrences keep no per-unit
// loss): (L, 3) float64 per common.h kStats, squeezed for a single adapter.
at::Tensor stats_of(const Batch& x, const at::Tensor& oA, const at::Tensor& oB, const at::Tensor& lam1,
                    const at::Tensor& lam2, const at::Tensor& lam_gen = at::Tensor()) {
  const at::ScalarType ct = compute_type(x.A.scalar_type());
  const at::Tensor A = x.A.to(ct), B = x.B.to(ct), Ah = oA.to(ct), Bh = oB.to(ct);
  const at::Tensor loss = std::get<0>(hsd_common("solve_sorted", A, B, Ah, Bh, false));
  at::Tensor start = lam1 * A.abs().sum({1, 2}) + lam2 * B.abs().sum({1, 2});
  at::Tensor end = loss + lam1 * Ah.abs().sum({1, 2}) + lam2 * Bh.abs().sum({1, 2});
  if (lam_gen.defined()) {  // lam_gen·Σ_i ‖Â_i‖₂‖B̂_{:,i}‖₁ (tropfast/ops.py GENERATOR_PENALTY)
    start = start + lam_gen * (A.norm(2, {2}) * B.abs().sum({1})).sum({1});
    end = end + lam_gen * (Ah.norm(2, {2}) * Bh.abs().sum({1})).sum({1});
  }
  const at::Tensor nnz = oA.ne(0).sum({1, 2}) + oB.ne(0).sum({1, 2});
  at::Tensor s = at::stack({start.to(at::kDouble), end.to(at::kDouble), nnz.to(at::kDouble)}, 1);
  return x.squeeze ? s.squeeze(0) : s;
}

// The segmented sort of every unit's magnitudes (rows of |A|, columns of |B|) in the compute
// type, descending, with fp64 prefix sums of x and x² starting at 0: sorted.h's input.
struct SortedRows {
  at::Tensor x, p1, p2;
};

SortedRows sort_rows(const at::Tensor& rows) {
  SortedRows s;
  s.x = std::get<0>(rows.abs().sort(/*dim=*/-1, /*descending=*/true)).contiguous();
  const int64_t U = s.x.size(0), n = s.x.size(1);
  at::Tensor x64 = s.x.to(at::kDouble);
  s.p1 = at::zeros({U, n + 1}, x64.options());
  s.p2 = at::zeros({U, n + 1}, x64.options());
  s.p1.narrow(1, 1, n).copy_(x64.cumsum(1));
  s.p2.narrow(1, 1, n).copy_((x64 * x64).cumsum(1));
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_sorted_cuda(const at::Tensor& A_, const at::Tensor& B_,
                                                                 const at::Tensor& lam1_, const at::Tensor& lam2_,
                                                                 const at::Tensor& lr_, c10::string_view method_,
                                                                 int64_t steps,
                                                                 const c10::optional<at::Tensor>& lam_gen_) {
  check_cuda(A_, "solve_sorted");
  c10::cuda::CUDAGuard guard(A_.device());
  const SolveInput in = solve_input("solve_sorted", A_, B_, lam1_, lam2_, lr_, method_, steps, A_.device(), lam_gen_);
  // fista has no sorted form; steps = 0 leaves nothing to sort
  if (in.method == kFista || steps == 0) return solve_fused_cuda(A_, B_, lam1_, lam2_, lr_, method_, steps, lam_gen_);
  const Batch& x = in.x;
  const Method method = in.method;
  const at::Tensor &lam1 = in.lam1, &lam2 = in.lam2, &lr = in.lr;
  const at::ScalarType ct = compute_type(x.A.scalar_type());
  const int64_t U = x.L * x.r;
  const SortedRows sa = sort_rows(x.A.to(ct).reshape({U, x.d_in}));
  const SortedRows sb = sort_rows(x.B.to(ct).transpose(1, 2).reshape({U, x.d_out}));
  at::Tensor oA = at::empty_like(x.A);
  at::Tensor oB = at::empty_like(x.B);
  const cuda::DType dt = dtype_of(x.A.scalar_type());
  const size_t state_bytes = cuda::solve_sorted_state_bytes(dt, shape_of(x), static_cast<int>(method));
  at::Tensor state = at::empty({static_cast<int64_t>(std::max<size_t>(state_bytes, 1))}, x.A.options().dtype(at::kByte));
  at::Tensor bad = at::empty({std::max<int64_t>(U, 1)}, x.A.options().dtype(at::kByte));
  check(cuda::solve_sorted(dt, x.A.data_ptr(), x.B.data_ptr(), shape_of(x), sa.x.data_ptr(),
                           sa.p1.data_ptr<double>(), sa.p2.data_ptr<double>(), sb.x.data_ptr(),
                           sb.p1.data_ptr<double>(), sb.p2.data_ptr<double>(), lam1.data_ptr(), lam2.data_ptr(),
                           lr.data_ptr(), static_cast<int>(method), steps, state.data_ptr(),
                           static_cast<unsigned char*>(bad.data_ptr()), oA.data_ptr(), oB.data_ptr(),
                           stream_of(x.A), in.gen ? in.lam_gen.data_ptr() : nullptr),
        "solve_sorted");
  if (method == kIsta && U > 0) {
    // Adapters with a unit that left the sorted form are solved densely (the same iterates).
    at::Tensor adapters = bad.narrow(0, 0, U).view({x.L, x.r}).any(1).nonzero().squeeze(1);
    if (adapters.numel() > 0) {
      const c10::optional<at::Tensor> lg =
          in.gen ? c10::optional<at::Tensor>(in.lam_gen.index_select(0, adapters)) : c10::nullopt;
      auto dense = solve_fused_cuda(x.A.index_select(0, adapters), x.B.index_select(0, adapters),
                                    lam1.index_select(0, adapters), lam2.index_select(0, adapters),
                                    lr.index_select(0, adapters), "ista", steps, lg);
      oA.index_copy_(0, adapters, std::get<0>(dense));
      oB.index_copy_(0, adapters, std::get<1>(dense));
    }
  }
  return {finish(oA, x.squeeze, A_), finish(oB, x.squeeze, B_),
          stats_of(x, oA, oB, lam1, lam2, in.gen ? in.lam_gen : at::Tensor())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tropfast, CUDA, m) {
  m.impl("generators", &generators_cuda);
  m.impl("hsd_loss", &hsd_loss_cuda);
  m.impl("hsd_grad", &hsd_grad_cuda);
  m.impl("soft_threshold", &soft_threshold_cuda);
  m.impl("prox_step", &prox_step_cuda);
  m.impl("solve_fused", &solve_fused_cuda);
  m.impl("solve_sorted", &solve_sorted_cuda);
}

}  // namespace cuda_ops
}  // namespace tropfast
