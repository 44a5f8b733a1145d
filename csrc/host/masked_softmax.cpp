// masked_softmax: host entry (both devices) and autograd.
//
//   probs = softmax(scale * scores + M, dim=-1), M from mask / causal / key_lengths (docs/ops.md)
//   dscores = scale * probs * (grad - sum(grad * probs, -1))            (masked_softmax_backward)
//
// The host checks the arguments, makes the scores contiguous, allocates the output and builds the
// one MaskLayout that the CPU and CUDA row kernels read (csrc/mask_layout.h); the kernels do the
// rest. Backward uses the saved output alone; a floating mask that requires grad gets the same
// formula without the scale, summed over its broadcast dims.
#include "../kernels.h"
#include "../memory.h"
#include "autograd.h"

namespace pyformer::host {

at::Tensor masked_softmax(const at::Tensor& scores_, const std::optional<at::Tensor>& mask,
                          double scale, int64_t causal,
                          const std::optional<at::Tensor>& key_lengths) {
  check_masked_softmax(scores_, mask, scale, causal, key_lengths);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(scores_.device());
  const at::Tensor x = scores_.contiguous();
  at::Tensor y = empty_output_like(x);
  if (x.numel() == 0) return y;
  const MaskArgs m = make_mask_args(x.sizes(), x.scalar_type(), mask, causal, key_lengths);
  kernels::masked_softmax_fwd.require(x.device())(x, y, m.layout, scale);
  return y;
}

at::Tensor masked_softmax_backward(const at::Tensor& grad_, const at::Tensor& out_, double scale) {
  check_masked_softmax_backward(grad_, out_);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(out_.device());
  const at::Tensor grad = grad_.contiguous(), out = out_.contiguous();
  at::Tensor dx = empty_output_like(out);
  if (out.numel() == 0) return dx;
  kernels::masked_softmax_bwd.require(out.device())(grad, out, dx, scale);
  return dx;
}

// ---- autograd -----------------------------------------------------------------------------------

using MaskedSoftmaxSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, double,
                                    int64_t, const std::optional<at::Tensor>&);
using MaskedSoftmaxBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, double);
PYFORMER_OP_HANDLE(masked_softmax, MaskedSoftmaxSig)
PYFORMER_OP_HANDLE(masked_softmax_backward, MaskedSoftmaxBwdSig)

at::Tensor mask_grad(const at::Tensor& dlogits, at::IntArrayRef mask_sizes, at::ScalarType dtype) {
  return at::sum_to(dlogits, mask_sizes).to(dtype);
}

struct MaskedSoftmaxFunction : torch::autograd::Function<MaskedSoftmaxFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& scores,
                            const std::optional<at::Tensor>& mask, double scale, int64_t causal,
                            const std::optional<at::Tensor>& key_lengths) {
    at::Tensor y;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      y = masked_softmax_op().call(scores, mask, scale, causal, key_lengths);
    }
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["scores_grad"] = scores.requires_grad();
    ctx->saved_data["mask_grad"] = requires_grad(mask);
    if (requires_grad(mask)) {
      ctx->saved_data["mask_sizes"] = mask->sizes().vec();
      ctx->saved_data["mask_dtype"] = static_cast<int64_t>(mask->scalar_type());
    }
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor out = ctx->get_saved_variables()[0];
    const double scale = ctx->saved_data["scale"].toDouble();
    at::Tensor dscores, dmask;
    if (creating_graph()) {  // differentiable: dlogits = y * (g - sum(g * y)) in ATen ops
      const at::ScalarType acc = stat_dtype(out.scalar_type());
      const at::Tensor y = out.to(acc), g = grads[0].to(acc);
      const at::Tensor dlogits = differentiable_softmax_backward(y, g).to(out.scalar_type());
      if (ctx->saved_data["mask_grad"].toBool())
        dmask = mask_grad(dlogits, ctx->saved_data["mask_sizes"].toIntVector(),
                          static_cast<at::ScalarType>(ctx->saved_data["mask_dtype"].toInt()));
      if (ctx->saved_data["scores_grad"].toBool()) dscores = dlogits * scale;
    } else if (ctx->saved_data["mask_grad"].toBool()) {
      const at::Tensor dlogits = masked_softmax_backward_op().call(grads[0], out, 1.0);
      dmask = mask_grad(dlogits, ctx->saved_data["mask_sizes"].toIntVector(),
                        static_cast<at::ScalarType>(ctx->saved_data["mask_dtype"].toInt()));
      if (ctx->saved_data["scores_grad"].toBool()) dscores = dlogits * scale;
    } else if (ctx->saved_data["scores_grad"].toBool()) {
      dscores = masked_softmax_backward_op().call(grads[0], out, scale);
    }
    return {dscores, dmask, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor masked_softmax_autograd(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                   double scale, int64_t causal,
                                   const std::optional<at::Tensor>& key_lengths) {
  if (!recording(scores, mask)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return masked_softmax_op().call(scores, mask, scale, causal, key_lengths);
  }
  return MaskedSoftmaxFunction::apply(scores, mask, scale, causal, key_lengths);
}

// One host entry for both devices.
static void register_host(torch::Library& m) {
  m.impl("masked_softmax", &masked_softmax);
  m.impl("masked_softmax_backward", &masked_softmax_backward);
}
TORCH_LIBRARY_IMPL(pyformer, CPU, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, CUDA, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, Autograd, m) {
  m.impl("masked_softmax", &masked_softmax_autograd);
  register_no_double_backward(m, "masked_softmax_backward");
}

}  // namespace pyformer::host

namespace pyformer::kernels {
PYFORMER_DEFINE_SLOT(MaskedSoftmaxFwd, masked_softmax_fwd, "masked_softmax forward");
PYFORMER_DEFINE_SLOT(MaskedSoftmaxBwd, masked_softmax_bwd, "masked_softmax backward");
}  // namespace pyformer::kernels
