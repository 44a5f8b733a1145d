// pyformer: declarations shared by the schema file (ops.cpp), the CPU kernels (csrc/cpu/*.cpp)
// and the CUDA kernels (csrc/cuda/*.cu).
//
// Every op has the same four places, named alike:
//   schema           csrc/ops.cpp                 TORCH_LIBRARY(pyformer, m)
//   CPU kernel       csrc/cpu/<op>.cpp            TORCH_LIBRARY_IMPL(pyformer, CPU, m)
//   CUDA kernel      csrc/cuda/<op>.cu            TORCH_LIBRARY_IMPL(pyformer, CUDA, m)
//   Python wrapper   pyformer/ops/<op>.py         fake kernel + autograd
//
// The argument checks below are device-agnostic and called by both the CPU and the CUDA kernel
// of an op, so a malformed input gets the same Python exception on every device. Messages name
// the op, the argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <optional>
#include <tuple>

namespace pyformer {

// ---- argument checks (csrc/checks.cpp) -------------------------------------------------------
void check_scaled_qk(const at::Tensor& q, const at::Tensor& k, double scale);
void check_scaled_qk_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k);

// Also validates the values of key_lengths (0 <= len <= Lk); on CUDA that reads them back (a sync).
void check_masked_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                          double scale, bool causal, const std::optional<at::Tensor>& key_lengths,
                          const char* op = "masked_softmax");
void check_masked_softmax_backward(const at::Tensor& grad, const at::Tensor& out);

void check_layer_norm(const at::Tensor& x, at::IntArrayRef normalized_shape,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      double eps, const char* op = "layer_norm");
void check_layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                               at::IntArrayRef normalized_shape);
void check_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                          at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps);

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale, bool causal,
                     const std::optional<at::Tensor>& key_lengths, double dropout_p);
void check_attention_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_probs,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& probs, const at::Tensor& keep, double scale,
                              double dropout_p);

// Kernels that call ATen ops open with this guard: the ops inside a kernel are implementation,
// never recorded by autograd (the op's own autograd formula covers them), also when a backward op
// runs under create_graph=True, where the dispatcher's fallback then marks its outputs as not
// differentiable twice instead of failing inside.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// ---- helpers shared by kernels ---------------------------------------------------------------
// Number of rows when the trailing `normalized_shape` dims of x are flattened into one row.
int64_t layer_norm_rows(const at::Tensor& x, at::IntArrayRef normalized_shape);
int64_t layer_norm_cols(at::IntArrayRef normalized_shape);

// The float mask converted to the scores' dtype (a copy of the small, unexpanded mask only when
// the dtypes differ); a bool mask is returned as is.
at::Tensor mask_for_kernel(const at::Tensor& mask, const at::Tensor& scores);

}  // namespace pyformer
