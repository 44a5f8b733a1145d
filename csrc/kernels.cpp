// The kernel slots' registry and the loader of the AVX2 CPU kernels (csrc/kernels.h).
#include "kernels.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace pyformer::kernels {
namespace {

std::vector<SlotBase*>& slots() {
  static std::vector<SlotBase*> all;
  return all;
}

// The CPU can run the AVX2 library: AVX2, FMA and F16C, with the OS saving the ymm registers
// (libgcc's __builtin_cpu_supports checks XCR0 before it reports AVX features).
bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace

bool list_slot(SlotBase* slot) {
  slots().push_back(slot);
  return true;
}

SlotBase* find_slot(const char* id) {
  for (SlotBase* s : slots())
    if (std::strcmp(s->id, id) == 0) return s;
  return nullptr;
}

std::string load_cpu_kernels(const std::string& path, std::string& why) {
  const char* env = std::getenv("PYFORMER_CPU_CAPABILITY");
  const std::string want = env ? env : "";
  TORCH_CHECK(want.empty() || want == "default" || want == "avx2",
              "pyformer: PYFORMER_CPU_CAPABILITY must be 'default' or 'avx2' (or unset), got '",
              want, "'");
  if (want == "default") {
    why = "PYFORMER_CPU_CAPABILITY=default";
    return "default";
  }
  if (!cpu_has_avx2()) {
    why = "this CPU lacks AVX2, FMA or F16C";
    return "default";
  }
  if (path.empty()) {
    why = "this build has no AVX2 kernel library (PYFORMER_CPU_VEC=none)";
    return "default";
  }
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    why = std::string("the AVX2 kernel library did not load: ") + (err ? err : path);
    return "default";
  }
  using Export = const OfferedKernel* (*)(size_t*);
  auto get = reinterpret_cast<Export>(dlsym(lib, "pyformer_cpu_kernels"));
  TORCH_CHECK(get != nullptr, "pyformer: ", path, " has no pyformer_cpu_kernels entry");
  size_t n = 0;
  const OfferedKernel* offered = get(&n);
  // All or nothing: a mismatch (a library from another build) leaves the baseline kernels.
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(find_slot(offered[i].slot) != nullptr, "pyformer: ", path,
                " offers a kernel for unknown slot '", offered[i].slot,
                "' (it is from another build of pyformer; reinstall)");
  for (size_t i = 0; i < n; ++i) find_slot(offered[i].slot)->set_cpu(offered[i].fn);
  // The library stays loaded for the life of the process: its kernels are in the slots.
  return "avx2";
}

}  // namespace pyformer::kernels
