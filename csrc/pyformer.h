// pyformer: declarations shared by the host entries of the ops (csrc/host/*.cpp) and the
// argument checks (csrc/checks.cpp).
//
// Every op lives in the same places, named alike:
//   schema           csrc/ops.cpp                 TORCH_LIBRARY(pyformer, m)
//   host entry       csrc/host/<op>.cpp           checks, allocation, composition; registered
//                                                 for CPU and CUDA; C++ autograd (Autograd key)
//   kernels          csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu, behind csrc/kernels.h
//   Python           pyformer/ops/<op>.py (fake kernel), pyformer/functional.py (the function)
// See docs/contributing.md.
//
// The argument checks below run once, in the host entry, whatever the device, so a malformed
// input gets the same Python exception everywhere. Messages name the op, the argument, what was
// expected and what was given.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "mask_layout.h"
#include "philox.h"

namespace pyformer {

// ---- argument checks (csrc/checks.cpp) -------------------------------------------------------
void check_scaled_qk(const at::Tensor& q, const at::Tensor& k, double scale);

// The scale of scaled_qk / attention: `scale`, or 1/sqrt(D) when it is None (D = q's last dim;
// 1 when D = 0, where every score is 0 whatever the scale). Resolved here rather than in Python
// so that D stays symbolic under torch.compile(dynamic=True).
inline double resolve_scale(const at::Tensor& q, std::optional<double> scale) {
  if (scale) return *scale;
  const int64_t d = q.dim() > 0 ? q.size(-1) : 0;
  return d > 0 ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0;
}
void check_scaled_qk_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k);

// Also validates the values of key_lengths (0 <= len <= Lk); on CUDA that reads them back (a sync).
void check_masked_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                          double scale, int64_t causal,
                          const std::optional<at::Tensor>& key_lengths,
                          const char* op = "masked_softmax");
void check_masked_softmax_backward(const at::Tensor& grad, const at::Tensor& out);

void check_layer_norm(const at::Tensor& x, at::IntArrayRef normalized_shape,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps,
                      const char* op = "layer_norm");
void check_layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                               at::IntArrayRef normalized_shape);
void check_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                          at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps);

void check_rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rstd,
                             const std::optional<at::Tensor>& weight,
                             at::IntArrayRef normalized_shape);
void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                        at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                        double eps);
// The eps of rms_norm: `eps`, or the machine epsilon of the statistics dtype when None.
inline double resolve_rms_eps(const at::Tensor& x, std::optional<double> eps) {
  if (eps) return *eps;
  return x.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                        : std::numeric_limits<float>::epsilon();
}

void check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                  const at::Tensor& sin, const char* op = "apply_rotary");
void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const char* op = "swiglu");
void check_swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up);

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale, int64_t causal,
                     const std::optional<at::Tensor>& key_lengths, double dropout_p);
void check_attention_backward(const at::Tensor& grad_out,
                              const std::optional<at::Tensor>& grad_probs, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs,
                              const at::Tensor& keep, double scale, double dropout_p);
void check_flash_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                    const at::Tensor& lse, const std::optional<at::Tensor>& mask,
                                    double scale, int64_t causal,
                                    const std::optional<at::Tensor>& key_lengths,
                                    const std::optional<at::Tensor>& grad_lse, double dropout_p,
                                    const std::optional<at::Tensor>& rng);

// Kernels that call ATen ops open with this guard: the ops inside a kernel are implementation,
// never recorded by autograd (the op's own autograd formula covers them), also when a backward op
// runs under create_graph=True, where the dispatcher's fallback then marks its outputs as not
// differentiable twice instead of failing inside.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// ---- helpers shared by the host entries ------------------------------------------------------
// Number of rows when the trailing `normalized_shape` dims of x are flattened into one row.
int64_t layer_norm_rows(const at::Tensor& x, at::IntArrayRef normalized_shape);
int64_t layer_norm_cols(at::IntArrayRef normalized_shape);

// The dtype of saved statistics (layer norm's mean and rstd): float64 for float64, else float32.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The dropout of one call with probability p > 0: a fresh Philox key from torch's default CPU
// generator (torch.manual_seed seeds it), whatever the device (csrc/philox.h).
Dropout draw_dropout(double p);
// The bool keep mask of `sizes` (the (B, H, Lq, Lk) probabilities) for that dropout, on the
// device of `options`: the device's dropout_keep kernel.
at::Tensor dropout_keep_mask(at::IntArrayRef sizes, const Dropout& dropout,
                             const at::TensorOptions& options);

// A MaskLayout (mask_layout.h) and the tensors it points into, which must outlive the kernel
// (the float mask converted to the scores' dtype, key_lengths as contiguous int64).
struct MaskArgs {
  MaskLayout layout;
  at::Tensor mask;
  at::Tensor key_lengths;
};
// The mask layout over scores of `sizes` (..., Lq, Lk) and dtype `dtype`, from checked arguments.
MaskArgs make_mask_args(at::IntArrayRef sizes, at::ScalarType dtype,
                        const std::optional<at::Tensor>& mask, int64_t causal,
                        const std::optional<at::Tensor>& key_lengths);

}  // namespace pyformer
