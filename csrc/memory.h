// pyformer: output allocation that asks Linux for transparent huge pages.
//
// A large CPU tensor is memory that glibc maps fresh for each allocation (above its mmap
// threshold, 32 MiB at most); its first touch then page-faults once per 4 KiB page, which for a
// memory-bound op costs more than the op itself (8192 faults for a 32 MiB output; on the
// development machine layer norm (8192,1024) float32 took ~13 ms per call of which ~2 ms was the
// kernel). madvise(MADV_HUGEPAGE) on the fresh range, before anything touches it, lets the kernel
// back it with 2 MiB pages where transparent huge pages are in "madvise" mode (the usual
// default): 512 times fewer faults. PyTorch's own allocator does the same for every allocation
// when THP_MEM_ALLOC_ENABLE=1. The advice is a hint: on other systems, or for memory glibc
// reuses, it does nothing, and the tensor is an ordinary tensor either way.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyformer {

// Advise huge pages for the 2 MiB-aligned part of t's storage (tensors of at least 4 MiB).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (!t.defined() || !t.device().is_cpu() || t.nbytes() < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty / at::empty_like for an op's output, with the advice above.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}
inline at::Tensor empty_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like, at::MemoryFormat::Contiguous);
  advise_huge_pages(t);
  return t;
}

}  // namespace pyformer
