// pyformer: helpers for the ops' C++ autograd (each csrc/host/<op>.cpp holds its op's
// torch::autograd::Function, registered for the Autograd dispatch key).
//
// Autograd lives in C++ so that a call costs what a PyTorch op costs: the Python wrapper of an
// op runs no Python autograd machinery. The forward of each Function calls the op again below
// autograd through the dispatcher (so torch.compile's fake kernels, pyformer/ops/<op>.py, serve
// it when tracing) and the backward calls the op's backward op, also through the dispatcher (so
// a traced backward is made of pyformer ops too).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../pyformer.h"

namespace pyformer::host {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// name##_op(): the typed handle of pyformer::<name>, looked up once.
#define PYFORMER_OP_HANDLE(name, Sig)                                                        \
  static const c10::TypedOperatorHandle<Sig>& name##_op() {                                  \
    static const auto handle =                                                               \
        c10::Dispatcher::singleton().findSchemaOrThrow("pyformer::" #name, "").typed<Sig>(); \
    return handle;                                                                           \
  }

inline bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}
inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

// Whether a call must be recorded for autograd: grad mode on and some input requires grad. When
// not, the Autograd kernels call the op below autograd directly, skipping the Function's context
// and node (what a PyTorch op's generated autograd kernel does too).
template <typename... Ts>
bool recording(const Ts&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

// The gradient of an additive mask from that of the logits: summed over its broadcast dims,
// in the mask's dtype (masked_softmax and attention).
at::Tensor mask_grad(const at::Tensor& dlogits, at::IntArrayRef mask_sizes, at::ScalarType dtype);

// Inside a Function's backward: whether the gradient must itself be differentiable (grad mode is
// on there exactly when the caller asked for create_graph=True). The backward then computes the
// same formulas in differentiable ATen ops instead of calling the backward op, so a gradient of a
// gradient (gradgradcheck, gradient penalties, Hessian-vector products) works; saved outputs
// (probs, s) carry the chain back through the op's own node.
inline bool creating_graph() { return at::GradMode::is_enabled(); }

// The softmax backward y * (dy - sum(dy * y, -1)) in differentiable ATen ops (creating_graph), in
// y's dtype: exactly 0 where y == 0, whose dy is not read, as the row kernels (docs/ops.md).
at::Tensor differentiable_softmax_backward(const at::Tensor& y, const at::Tensor& dy);

// A scale saved by a Function's forward as given (None = 1/sqrt(D)), resolved in backward: read
// in forward, q's size would pin every dim of a symbolic q (torch.export, torch.compile).
inline c10::IValue save_scale(std::optional<double> scale) {
  return scale ? c10::IValue(*scale) : c10::IValue();
}
inline double saved_scale(const c10::IValue& v, const at::Tensor& q) {
  return resolve_scale(q, v.isNone() ? std::nullopt : std::optional<double>(v.toDouble()));
}

// The Autograd kernel of a backward op called directly (torch.ops.pyformer.<op>_backward):
// differentiating it is not supported and says so, rather than silently giving zeros. Through
// the ops' own autograd a gradient of a gradient works (creating_graph above).
void register_no_double_backward(torch::Library& m, const char* backward_op);

}  // namespace pyformer::host
