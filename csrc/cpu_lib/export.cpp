// The entry point of the AVX2 CPU kernel library (pyformer/_cpu_avx2*.so): the files of
// csrc/cpu/ compiled with AVX2 offer their kernels here at load time, and
// kernels::load_cpu_kernels (csrc/kernels.cpp, in pyformer._C) reads them by slot name.
#include <vector>

#include "../kernels.h"

namespace pyformer::kernels {
namespace {
std::vector<OfferedKernel>& offered() {
  static std::vector<OfferedKernel> all;
  return all;
}
}  // namespace

bool offer(const char* slot, void* fn) {
  offered().push_back({slot, fn});
  return true;
}

}  // namespace pyformer::kernels

extern "C" __attribute__((visibility("default"))) const pyformer::kernels::OfferedKernel*
pyformer_cpu_kernels(size_t* n) {
  *n = pyformer::kernels::offered().size();
  return pyformer::kernels::offered().data();
}
