// swiglu: host entry (both devices) and autograd.
//
//   out = silu(gate) * up, elementwise over equal shapes (docs/ops.md)
//   backward (swiglu_backward): dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout *
//   silu(gate)
//
// The host checks, makes both inputs contiguous (outputs are contiguous), handles empty tensors
// and calls the device's elementwise kernels; nothing is saved but the inputs.
#include "../kernels.h"
#include "../memory.h"
#include "autograd.h"

namespace pyformer::host {

at::Tensor swiglu(const at::Tensor& gate_, const at::Tensor& up_) {
  check_swiglu(gate_, up_);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(gate_.device());
  const at::Tensor gate = gate_.contiguous(), up = up_.contiguous();
  at::Tensor out = empty_output_like(gate);
  if (gate.numel() > 0) kernels::swiglu_fwd.require(gate.device())(gate, up, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_, const at::Tensor& gate_,
                                                   const at::Tensor& up_) {
  check_swiglu_backward(grad_, gate_, up_);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(gate_.device());
  const at::Tensor grad = grad_.contiguous(), gate = gate_.contiguous(), up = up_.contiguous();
  at::Tensor dgate = empty_output_like(gate), dup = empty_output_like(gate);
  if (gate.numel() > 0) kernels::swiglu_bwd.require(gate.device())(grad, gate, up, dgate, dup);
  return {dgate, dup};
}

// ---- autograd -----------------------------------------------------------------------------------

using SwigluSig = at::Tensor(const at::Tensor&, const at::Tensor&);
using SwigluBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&);
PYFORMER_OP_HANDLE(swiglu, SwigluSig)
PYFORMER_OP_HANDLE(swiglu_backward, SwigluBwdSig)

struct SwigluFunction : torch::autograd::Function<SwigluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::Tensor out;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      out = swiglu_op().call(gate, up);
    }
    ctx->save_for_backward({gate, up});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &gate = saved[0], &up = saved[1];
    if (creating_graph()) {  // the same formulas, differentiable, in the accumulation type
      const at::ScalarType acc = stat_dtype(gate.scalar_type());
      const at::Tensor g = grads[0].to(acc), x = gate.to(acc), u = up.to(acc);
      const at::Tensor s = at::sigmoid(x);
      return {(g * u * s * (1 + x * (1 - s))).to(gate.scalar_type()),
              (g * x * s).to(gate.scalar_type())};
    }
    auto [dgate, dup] = swiglu_backward_op().call(grads[0], gate, up);
    return {dgate, dup};
  }
};

at::Tensor swiglu_autograd(const at::Tensor& gate, const at::Tensor& up) {
  if (!recording(gate, up)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return swiglu_op().call(gate, up);
  }
  return SwigluFunction::apply(gate, up);
}

static void register_host(torch::Library& m) {
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_backward", &swiglu_backward);
}
TORCH_LIBRARY_IMPL(pyformer, CPU, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, CUDA, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, Autograd, m) {
  m.impl("swiglu", &swiglu_autograd);
  register_no_double_backward(m, "swiglu_backward");
}

}  // namespace pyformer::host

namespace pyformer::kernels {
PYFORMER_DEFINE_SLOT(SwigluFwd, swiglu_fwd, "swiglu forward");
PYFORMER_DEFINE_SLOT(SwigluBwd, swiglu_bwd, "swiglu backward");
}  // namespace pyformer::kernels
