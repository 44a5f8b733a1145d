// The BLAS that torch links, for the CPU attention kernels (attention.cpp, flash_attention.cpp):
// sgemm/dgemm (and MKL's mixed-precision GEMMs) found by name in the process, called on raw
// row-major pointers.
//
// ATen's own CPU BLAS entry point for float/double (at::native::cpublas::gemm) is not exported
// from libtorch_cpu in the released wheels (only its non-BLAS fallback stub is), and at::mm_out
// per block would cost a dispatcher call and two tensor headers per GEMM; without a BLAS symbol
// the kernels decline and the host composes ATen ops.
#pragma once

#include <c10/util/BFloat16.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
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
inline const Blas& blas() {
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

// ---- mixed precision: bfloat16 inputs, float accumulation and output ----------------------------
// MKL's cblas_gemm_bf16bf16f32 (torch's x86-64 wheels link MKL), row-major CBLAS interface. On a
// CPU with AMX-BF16 or AVX512-BF16 it runs at several times the float GEMM's rate, and it reads
// the bfloat16 operands in place, with no conversion pass; it is taken only there (elsewhere MKL
// would emulate it). float16 always takes the float path: MKL's cblas_gemm_f16f16f32 measured no
// faster than converting to float on an AVX512-FP16 Xeon without AMX-FP16. Without the symbol
// (another BLAS), on other CPUs, or with PYFORMER_CPU_HALF_GEMM=0 in the environment, the kernels
// convert the blocks to float and call sgemm.
using gemm_half_t = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                             const void* A, int lda, const void* B, int ldb, float beta, float* C,
                             int ldc);
inline gemm_half_t find_bf16_gemm() {
  const char* env = std::getenv("PYFORMER_CPU_HALF_GEMM");
  if (env && std::strcmp(env, "0") == 0) return nullptr;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"))
    return reinterpret_cast<gemm_half_t>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
#endif
  return nullptr;
}

// The mixed-precision GEMM for T (c10::BFloat16), or null: looked up once.
template <typename T>
gemm_half_t half_gemm() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    static const gemm_half_t bf16 = find_bf16_gemm();
    return bf16;
  } else {
    return nullptr;
  }
}

// Row-major float C (m x n, ldc) = alpha * op(A) @ op(B) + beta * C on T operands, as gemm_rm
// below; half_gemm<T>() must not be null.
template <typename T>
void gemm_rm_half(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const T* A, int lda,
                  const T* B, int ldb, float* C, int ldc, float beta = 0) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // the CBLAS enums
  half_gemm<T>()(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k,
                 alpha, A, lda, B, ldb, beta, C, ldc);
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
