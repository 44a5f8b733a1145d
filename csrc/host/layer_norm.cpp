// layer_norm, add_layer_norm, rms_norm and add_rms_norm: host entries (both devices) and autograd.
//
//   y = (x - mean) * rstd * weight + bias per row of N = prod(normalized_shape) (docs/ops.md);
//   mean and rstd saved per row in the statistics dtype (float32; float64 for float64 x)
//   add_layer_norm: s = x + residual (rounded to x's dtype), y = layer_norm(s); returns y and s
//   backward (layer_norm_backward): dx, and dweight, dbias of shape normalized_shape
//   rms_norm: y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps), no mean and no bias (the
//   same kernels, told so by an undefined mean); add_rms_norm and rms_norm_backward likewise
//
// The host checks, makes the rows contiguous, allocates y, s and the statistics, handles empty
// rows (N == 0: NaN statistics) and calls the device's row kernels. add_layer_norm shares the
// backward: the gradient reaching s is that of y through the norm plus the one flowing into s
// directly, and x and residual both receive it.
#include <limits>

#include "../kernels.h"
#include "../memory.h"
#include "autograd.h"

namespace pyformer::host {
namespace {

// (y, s, mean, rstd); s is undefined without a residual, mean for the RMS norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& x_, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor res = residual.defined() ? residual.contiguous() : at::Tensor();
  const int64_t N = layer_norm_cols(normalized_shape), R = layer_norm_rows(x, normalized_shape);
  const auto stat_shape = x.sizes().slice(0, x.dim() - normalized_shape.size());
  const auto stats = x.options().dtype(stat_dtype(x.scalar_type()));
  at::Tensor y = empty_output_like(x);
  at::Tensor s = res.defined() ? empty_output_like(x) : at::Tensor();
  at::Tensor mean = rms ? at::Tensor() : at::empty(stat_shape, stats);
  at::Tensor rstd = at::empty(stat_shape, stats);
  if (N == 0) {  // empty rows: no statistics to speak of
    if (!rms) mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (R == 0 || N == 0) return {y, s, mean, rstd};
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  kernels::layer_norm_fwd.require(x.device())(x, res, s, w, b, y, mean, rstd, eps);
  return {y, s, mean, rstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x,
                                                          at::IntArrayRef normalized_shape,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          double eps) {
  check_layer_norm(x, normalized_shape, weight, bias, eps);
  auto [y, s, mean, rstd] =
      norm_forward(x, at::Tensor(), normalized_shape, weight, bias, eps, /*rms=*/false);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& x, const at::Tensor& residual, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  check_add_layer_norm(x, residual, normalized_shape, weight, bias, eps);
  return norm_forward(x, residual, normalized_shape, weight, bias, eps, /*rms=*/false);
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, at::IntArrayRef normalized_shape,
                                            const std::optional<at::Tensor>& weight,
                                            std::optional<double> eps_) {
  const double eps = resolve_rms_eps(x, eps_);
  check_layer_norm(x, normalized_shape, weight, std::nullopt, eps, "rms_norm");
  auto [y, s, mean, rstd] =
      norm_forward(x, at::Tensor(), normalized_shape, weight, std::nullopt, eps, /*rms=*/true);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x,
                                                            const at::Tensor& residual,
                                                            at::IntArrayRef normalized_shape,
                                                            const std::optional<at::Tensor>& weight,
                                                            std::optional<double> eps_) {
  const double eps = resolve_rms_eps(x, eps_);
  check_add_rms_norm(x, residual, normalized_shape, weight, eps);
  auto [y, s, mean, rstd] =
      norm_forward(x, residual, normalized_shape, weight, std::nullopt, eps, /*rms=*/true);
  return {y, s, rstd};
}

namespace {

// (dx, dweight, dbias) of either norm; mean undefined for the RMS norm (dbias then undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_rows(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& weight, at::IntArrayRef normalized_shape) {
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), grad = grad_.contiguous();
  const at::Tensor mean = mean_.defined() ? mean_.contiguous() : at::Tensor();
  const at::Tensor rstd = rstd_.contiguous();
  const int64_t N = layer_norm_cols(normalized_shape), R = layer_norm_rows(x, normalized_shape);
  at::Tensor dx = empty_output_like(x);
  const bool rms = !mean.defined();
  if (R == 0 || N == 0) {
    return {dx, at::zeros(normalized_shape, x.options()),
            rms ? at::Tensor() : at::zeros(normalized_shape, x.options())};
  }
  at::Tensor dw = at::empty(normalized_shape, x.options());
  at::Tensor db = rms ? at::Tensor() : at::empty(normalized_shape, x.options());
  const at::Tensor w = weight ? weight->contiguous() : at::Tensor();
  kernels::layer_norm_bwd.require(x.device())(grad, x, mean, rstd, w, dx, dw, db);
  return {dx, dw, db};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, at::IntArrayRef normalized_shape) {
  check_layer_norm_backward(grad, x, mean, rstd, weight, normalized_shape);
  return norm_backward_rows(grad, x, mean, rstd, weight, normalized_shape);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& weight,
                                                     at::IntArrayRef normalized_shape) {
  check_rms_norm_backward(grad, x, rstd, weight, normalized_shape);
  auto [dx, dw, db] = norm_backward_rows(grad, x, at::Tensor(), rstd, weight, normalized_shape);
  return {dx, dw};
}

// ---- autograd -----------------------------------------------------------------------------------

using LayerNormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double);
using AddLayerNormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double);
using LayerNormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, c10::SymIntArrayRef);
using RmsNormSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::SymIntArrayRef,
                                                      const std::optional<at::Tensor>&,
                                                      std::optional<double>);
using AddRmsNormSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
    std::optional<double>);
using RmsNormBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&,
                                                         const std::optional<at::Tensor>&,
                                                         c10::SymIntArrayRef);
PYFORMER_OP_HANDLE(layer_norm, LayerNormSig)
PYFORMER_OP_HANDLE(add_layer_norm, AddLayerNormSig)
PYFORMER_OP_HANDLE(layer_norm_backward, LayerNormBwdSig)
PYFORMER_OP_HANDLE(rms_norm, RmsNormSig)
PYFORMER_OP_HANDLE(add_rms_norm, AddRmsNormSig)
PYFORMER_OP_HANDLE(rms_norm_backward, RmsNormBwdSig)

namespace {

// The normalized dims are saved as their count: backward reads their sizes from x (symbolic
// under torch.compile).
void save_norm(AutogradContext* ctx, c10::SymIntArrayRef normalized_shape,
               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
               double eps) {
  ctx->saved_data["ndims"] = static_cast<int64_t>(normalized_shape.size());
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->set_materialize_grads(false);
}

// The backward in differentiable ATen ops (creating_graph): mean and rstd recomputed from x, so
// that they too are differentiated, in the statistics dtype; the formulas of layer_norm_backward
// (rms: of rms_norm_backward, without the mean).
std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_norm_backward(
    const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& w, int64_t n, double eps,
    bool rms) {
  const at::ScalarType acc = stat_dtype(x.scalar_type());
  std::vector<int64_t> norm_dims, lead_dims;
  for (int64_t d = 0; d < x.dim(); ++d) (d < x.dim() - n ? lead_dims : norm_dims).push_back(d);
  const at::Tensor xa = x.to(acc), g = grad_y.to(acc);
  const at::Tensor xc = rms ? xa : xa - xa.mean(norm_dims, /*keepdim=*/true);
  const at::Tensor rstd = ((xc * xc).mean(norm_dims, /*keepdim=*/true) + eps).rsqrt();
  const at::Tensor xhat = xc * rstd;
  const at::Tensor gw = w.defined() ? g * w.to(acc) : g;
  const at::Tensor gc = rms ? gw : gw - gw.mean(norm_dims, true);
  const at::Tensor dx = rstd * (gc - xhat * (gw * xhat).mean(norm_dims, true));
  // over the leading dims (none: the elementwise products themselves)
  auto lead_sum = [&](const at::Tensor& t) { return lead_dims.empty() ? t : t.sum(lead_dims); };
  return {dx.to(x.scalar_type()), lead_sum(g * xhat).to(x.scalar_type()),
          lead_sum(g).to(x.scalar_type())};
}

// (dx, dweight, dbias) of the norm itself; undefined where there is no such input. saved is
// (x or s, mean, rstd, weight), mean undefined for the RMS norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(AutogradContext* ctx,
                                                             at::Tensor grad_y,
                                                             const variable_list& saved) {
  const at::Tensor& x = saved[0];
  if (!grad_y.defined()) grad_y = at::zeros_like(x);
  const at::Tensor& w = saved[3];
  const bool rms = !saved[1].defined();
  at::Tensor dx, dw, db;
  if (creating_graph()) {
    const int64_t n = ctx->saved_data["ndims"].toInt();
    std::tie(dx, dw, db) =
        differentiable_norm_backward(x, grad_y, w, n, ctx->saved_data["eps"].toDouble(), rms);
  } else {
    const std::optional<at::Tensor> wo = w.defined() ? std::optional<at::Tensor>(w) : std::nullopt;
    const c10::SymIntArrayRef shape =
        x.sym_sizes().slice(x.dim() - ctx->saved_data["ndims"].toInt());
    if (rms) {
      std::tie(dx, dw) = rms_norm_backward_op().call(grad_y, x, saved[2], wo, shape);
    } else {
      std::tie(dx, dw, db) =
          layer_norm_backward_op().call(grad_y, x, saved[1], saved[2], wo, shape);
    }
  }
  return {dx, ctx->saved_data["has_weight"].toBool() ? dw : at::Tensor(),
          ctx->saved_data["has_bias"].toBool() ? db : at::Tensor()};
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }

}  // namespace

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               c10::SymIntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    at::Tensor y, mean, rstd;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, mean, rstd) = layer_norm_op().call(x, normalized_shape, weight, bias, eps);
    }
    save_norm(ctx, normalized_shape, weight, bias, eps);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({x, mean, rstd, or_undefined(weight)});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined())
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dx, dw, db] = norm_backward(ctx, grads[0], ctx->get_saved_variables());
    return {dx, at::Tensor(), dw, db, at::Tensor()};
  }
};

struct AddLayerNormFunction : torch::autograd::Function<AddLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    at::Tensor y, s, mean, rstd;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, s, mean, rstd) =
          add_layer_norm_op().call(x, residual, normalized_shape, weight, bias, eps);
    }
    save_norm(ctx, normalized_shape, weight, bias, eps);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({s, mean, rstd, or_undefined(weight)});
    return {y, s, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [ds, dw, db] = norm_backward(ctx, grads[0], saved);
    if (grads[1].defined()) ds = ds + grads[1];
    return {ds, ds, at::Tensor(), dw, db, at::Tensor()};
  }
};

struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               c10::SymIntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight, std::optional<double> eps) {
    at::Tensor y, rstd;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, rstd) = rms_norm_op().call(x, normalized_shape, weight, eps);
    }
    save_norm(ctx, normalized_shape, weight, std::nullopt, resolve_rms_eps(x, eps));
    ctx->mark_non_differentiable({rstd});
    ctx->save_for_backward({x, at::Tensor(), rstd, or_undefined(weight)});
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dx, dw, db] = norm_backward(ctx, grads[0], ctx->get_saved_variables());
    return {dx, at::Tensor(), dw, at::Tensor()};
  }
};

struct AddRmsNormFunction : torch::autograd::Function<AddRmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight, std::optional<double> eps) {
    at::Tensor y, s, rstd;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, s, rstd) = add_rms_norm_op().call(x, residual, normalized_shape, weight, eps);
    }
    save_norm(ctx, normalized_shape, weight, std::nullopt, resolve_rms_eps(x, eps));
    ctx->mark_non_differentiable({rstd});
    ctx->save_for_backward({s, at::Tensor(), rstd, or_undefined(weight)});
    return {y, s, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [ds, dw, db] = norm_backward(ctx, grads[0], ctx->get_saved_variables());
    if (grads[1].defined()) ds = ds + grads[1];
    return {ds, ds, at::Tensor(), dw, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_autograd(const at::Tensor& x,
                                                     c10::SymIntArrayRef normalized_shape,
                                                     const std::optional<at::Tensor>& weight,
                                                     std::optional<double> eps) {
  if (!recording(x, weight)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return rms_norm_op().call(x, normalized_shape, weight, eps);
  }
  const variable_list r = RmsNormFunction::apply(x, normalized_shape, weight, eps);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_autograd(
    const at::Tensor& x, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  if (!recording(x, residual, weight)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return add_rms_norm_op().call(x, residual, normalized_shape, weight, eps);
  }
  const variable_list r = AddRmsNormFunction::apply(x, residual, normalized_shape, weight, eps);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_autograd(
    const at::Tensor& x, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  if (!recording(x, weight, bias)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return layer_norm_op().call(x, normalized_shape, weight, bias, eps);
  }
  const variable_list r = LayerNormFunction::apply(x, normalized_shape, weight, bias, eps);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_autograd(
    const at::Tensor& x, const at::Tensor& residual, c10::SymIntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  if (!recording(x, residual, weight, bias)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return add_layer_norm_op().call(x, residual, normalized_shape, weight, bias, eps);
  }
  const variable_list r =
      AddLayerNormFunction::apply(x, residual, normalized_shape, weight, bias, eps);
  return {r[0], r[1], r[2], r[3]};
}

static void register_host(torch::Library& m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("layer_norm_backward", &layer_norm_backward);
  m.impl("add_layer_norm", &add_layer_norm);
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("add_rms_norm", &add_rms_norm);
}
TORCH_LIBRARY_IMPL(pyformer, CPU, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, CUDA, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("add_layer_norm", &add_layer_norm_autograd);
  register_no_double_backward(m, "layer_norm_backward");
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("add_rms_norm", &add_rms_norm_autograd);
  register_no_double_backward(m, "rms_norm_backward");
}

}  // namespace pyformer::host

namespace pyformer::kernels {
PYFORMER_DEFINE_SLOT(LayerNormFwd, layer_norm_fwd, "layer_norm forward");
PYFORMER_DEFINE_SLOT(LayerNormBwd, layer_norm_bwd, "layer_norm backward");
}  // namespace pyformer::kernels
