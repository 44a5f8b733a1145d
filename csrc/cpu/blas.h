// The BLAS that torch links, for the CPU attention kernels (attention.cpp, flash_attention.cpp):
// sgemm/dgemm found by name in the process, called on raw row-major pointers.
//
// ATen's own CPU BLAS entry point for float/double (at::native::cpublas::gemm) is not exported
// from libtorch_cpu in the released wheels (only its non-BLAS fallback stub is), and at::mm_out
// per block would cost a dispatcher call and two tensor headers per GEMM; without a BLAS symbol
// the kernels decline and the host composes ATen ops.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <type_traits>

namespace pyformer::cpu {
namespace {

// ---- BLAS, column-major (Fortran) interface, looked up in the process at first use ------------
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const double*, const double*, const int*, const double*, const int*,
                         const double*, double*, const int*);

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  Blas() {
    sgemm = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
  }
};
const Blas& blas() {
  static const Blas b;
  return b;
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>)
    return blas().sgemm != nullptr;
  else if constexpr (std::is_same_v<T, double>)
    return blas().dgemm != nullptr;
  else
    return false;
}

// Row-major C (m x n, ldc) = alpha * op(A) @ op(B) + beta * C, op(X) = X^T when trans_x. A is
// stored (m x k) or, transposed, (k x m) with leading dimension lda; B (k x n) or (n x k) with ldb.
// In the BLAS's column-major terms that is C^T = op(B)^T @ op(A)^T, hence the swapped operands.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* A, int lda,
             const T* B, int ldb, T* C, int ldc, T beta = 0) {
  const char tb = trans_b ? 'T' : 'N', ta = trans_a ? 'T' : 'N';
  if (!have_blas<T>()) {  // no BLAS symbol in the process: plain loops (correct, slow)
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        T acc = 0;
        for (int p = 0; p < k; ++p)
          acc += (trans_a ? A[p * lda + i] : A[i * lda + p]) *
                 (trans_b ? B[j * ldb + p] : B[p * ldb + j]);
        C[i * ldc + j] = alpha * acc + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
      }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    blas().sgemm(&tb, &ta, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
  } else {
    blas().dgemm(&tb, &ta, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
  }
}

}  // namespace
}  // namespace pyformer::cpu
