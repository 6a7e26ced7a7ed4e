// The Python module tropfast._C.  Importing it runs the TORCH_LIBRARY_IMPL registrations of
// the kernels linked into it; the functions below only report what was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "common.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

#ifdef TROPFAST_WITH_CUDA
static constexpr bool kWithCuda = true;
#else
static constexpr bool kWithCuda = false;
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tropfast native kernels (CPU, and CUDA when built with it) for the tropfast:: ops";
  m.def("has_cpu", [] { return true; }, "True: the CPU kernels are always part of the build");
  m.def("has_cuda", [] { return kWithCuda; }, "Whether the CUDA kernels were compiled in");
  m.def("simd_level", &tropfast::cpu::simd_level,
        "The vector width of the CPU's ISTA and FISTA loops: 'avx512', 'avx2' or 'generic' (csrc/cpu/ista_x86.h)");
  m.def("set_simd_level", &tropfast::cpu::set_simd_level, pybind11::arg("name"),
        "Use a narrower vector width for the CPU's ISTA and FISTA loops (never wider than the CPU runs); returns the one in use");
  m.def("num_threads", [] { return at::get_num_threads(); }, "Threads the CPU kernels use (torch.get_num_threads)");
}
