// Argument checks shared by the CPU and CUDA kernels of every op (declared in pyformer.h).
//
// Each message reads "pyformer.<op>: argument '<arg>': expected <what>, got <what>" and is raised
// as TypeError (wrong dtype), ValueError (wrong shape, value or device) or IndexError.
#include <cmath>
#include <cstring>
#include <sstream>

#include "pyformer.h"

namespace pyformer {
namespace {

std::string str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

#define PYF_TYPE(cond, op, arg, expected, got)                                                     \
  TORCH_CHECK_TYPE(cond, "pyformer.", op, ": argument '", arg, "': expected ", expected, ", got ", \
                   got)
#define PYF_VALUE(cond, op, arg, expected, got)                                           \
  TORCH_CHECK_VALUE(cond, "pyformer.", op, ": argument '", arg, "': expected ", expected, \
                    ", got ", got)

void check_float(const char* op, const char* arg, const at::Tensor& t) {
  PYF_TYPE(is_float_dtype(t.scalar_type()), op, arg,
           "a float32, float16, bfloat16 or float64 tensor", t.scalar_type());
}

void check_same(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                const char* ref_name, bool dtype = true) {
  PYF_VALUE(
      t.device() == ref.device(), op, arg,
      std::string("a tensor on ") + ref.device().str() + " (the device of '" + ref_name + "')",
      t.device());
  if (dtype) {
    PYF_TYPE(t.scalar_type() == ref.scalar_type(), op, arg,
             std::string("dtype ") + c10::toString(ref.scalar_type()) + " (the dtype of '" +
                 ref_name + "')",
             t.scalar_type());
  }
}

void check_finite(const char* op, const char* arg, double v) {
  PYF_VALUE(std::isfinite(v), op, arg, "a finite number", v);
}

// Mask arguments of an op whose scores have shape `sizes` on `device`.
void check_masks(const char* op, at::IntArrayRef sizes, const at::Device& device,
                 const std::optional<at::Tensor>& mask, int64_t causal,
                 const std::optional<at::Tensor>& key_lengths) {
  const int64_t nd = static_cast<int64_t>(sizes.size());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    PYF_TYPE(m.scalar_type() == at::kBool || is_float_dtype(m.scalar_type()), op, "mask",
             "a bool (True = may attend) or floating (additive) tensor", m.scalar_type());
    PYF_VALUE(m.device() == device, op, "mask", std::string("a tensor on ") + device.str(),
              m.device());
    bool ok = m.dim() <= nd;
    for (int64_t d = 1; ok && d <= m.dim(); ++d) {
      const int64_t ms = m.size(-d), ss = sizes[nd - d];
      ok = ms == ss || ms == 1;
    }
    PYF_VALUE(ok, op, "mask", "a shape broadcastable to the scores' shape " + str(sizes),
              str(m.sizes()));
  }
  PYF_VALUE(causal >= 0 && causal <= 2, op, "causal", "0 (none), 1 (top-left) or 2 (bottom-right)",
            causal);
  if (causal) {
    PYF_VALUE(nd >= 2, op, "causal", "scores of at least 2 dims (..., Lq, Lk)", str(sizes));
  }
  if (key_lengths.has_value()) {
    const at::Tensor& kl = *key_lengths;
    PYF_VALUE(nd >= 2, op, "key_lengths", "scores of at least 2 dims (B, ..., Lk)", str(sizes));
    PYF_TYPE(at::isIntegralType(kl.scalar_type(), /*includeBool=*/false), op, "key_lengths",
             "an integer tensor", kl.scalar_type());
    PYF_VALUE(kl.device() == device, op, "key_lengths", std::string("a tensor on ") + device.str(),
              kl.device());
    PYF_VALUE(kl.dim() == 1 && kl.size(0) == sizes[0], op, "key_lengths",
              "shape (" + std::to_string(sizes[0]) + ",) (one length per batch element)",
              str(kl.sizes()));
    if (kl.numel() > 0) {
      const int64_t lk = sizes[nd - 1];
      // one read-back (on CUDA one sync) for both ends
      // as int64 first: min/max have no kernels for uint16/32/64 (a uint64 above 2^63 turns
      // negative and fails the range check below)
      const at::Tensor kl64 = kl.to(at::kLong);
      const at::Tensor ends = at::stack({kl64.min(), kl64.max()}).to(at::kCPU);
      const int64_t lo = ends[0].item<int64_t>(), hi = ends[1].item<int64_t>();
      PYF_VALUE(lo >= 0 && hi <= lk, op, "key_lengths", "values in [0, " + std::to_string(lk) + "]",
                "values in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
  }
}

}  // namespace

void check_scaled_qk(const at::Tensor& q, const at::Tensor& k, double scale) {
  const char* op = "scaled_qk";
  check_float(op, "q", q);
  check_same(op, "k", k, q, "q");
  PYF_VALUE(q.dim() >= 2, op, "q", "a tensor of shape (..., Lq, D)", str(q.sizes()));
  PYF_VALUE(k.dim() == q.dim() &&
                k.sizes().slice(0, k.dim() - 2) == q.sizes().slice(0, q.dim() - 2) &&
                k.size(-1) == q.size(-1),
            op, "k",
            "shape (..., Lk, " + std::to_string(q.size(-1)) + ") with the leading dims of q " +
                str(q.sizes()),
            str(k.sizes()));
  check_finite(op, "scale", scale);
}

void check_scaled_qk_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k) {
  check_scaled_qk(q, k, 1.0);
  check_same("scaled_qk_backward", "grad", grad, q, "q");
  std::vector<int64_t> want(q.sizes().begin(), q.sizes().end());
  want.back() = k.size(-2);
  PYF_VALUE(grad.sizes() == at::IntArrayRef(want), "scaled_qk_backward", "grad",
            "shape " + str(want), str(grad.sizes()));
}

void check_masked_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                          double scale, int64_t causal,
                          const std::optional<at::Tensor>& key_lengths, const char* op) {
  check_float(op, "scores", scores);
  PYF_VALUE(scores.dim() >= 1, op, "scores", "a tensor of at least 1 dim (..., Lk)",
            str(scores.sizes()));
  check_finite(op, "scale", scale);
  check_masks(op, scores.sizes(), scores.device(), mask, causal, key_lengths);
}

void check_masked_softmax_backward(const at::Tensor& grad, const at::Tensor& out) {
  const char* op = "masked_softmax_backward";
  check_float(op, "out", out);
  check_same(op, "grad", grad, out, "out");
  PYF_VALUE(grad.sizes() == out.sizes(), op, "grad", "shape " + str(out.sizes()),
            str(grad.sizes()));
}

void check_layer_norm(const at::Tensor& x, at::IntArrayRef normalized_shape,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps, const char* op) {
  check_float(op, "x", x);
  const int64_t n = static_cast<int64_t>(normalized_shape.size());
  bool ok = n >= 1;
  for (auto s : normalized_shape) ok = ok && s >= 0;
  PYF_VALUE(ok, op, "normalized_shape", "a non-empty list of non-negative sizes",
            str(normalized_shape));
  PYF_VALUE(x.dim() >= n && x.sizes().slice(x.dim() - n) == normalized_shape, op, "x",
            "a tensor whose trailing dims are normalized_shape " + str(normalized_shape),
            str(x.sizes()));
  if (weight.has_value()) {
    check_same(op, "weight", *weight, x, "x");
    PYF_VALUE(weight->sizes() == normalized_shape, op, "weight", "shape " + str(normalized_shape),
              str(weight->sizes()));
  }
  if (bias.has_value()) {
    check_same(op, "bias", *bias, x, "x");
    PYF_VALUE(bias->sizes() == normalized_shape, op, "bias", "shape " + str(normalized_shape),
              str(bias->sizes()));
  }
  PYF_VALUE(std::isfinite(eps) && eps >= 0, op, "eps", "a finite number >= 0", eps);
}

void check_layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                               at::IntArrayRef normalized_shape) {
  const char* op = "layer_norm_backward";
  check_layer_norm(x, normalized_shape, weight, std::nullopt, 0.0, op);
  check_same(op, "grad", grad, x, "x");
  PYF_VALUE(grad.sizes() == x.sizes(), op, "grad", "shape " + str(x.sizes()), str(grad.sizes()));
  const int64_t rows = layer_norm_rows(x, normalized_shape);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean},
                                std::pair<const char*, const at::Tensor&>{"rstd", rstd}}) {
    check_same(op, name, t, x, "x", /*dtype=*/false);
    PYF_TYPE(t.scalar_type() == (x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat), op,
             name, "the float32 statistics saved by layer_norm (float64 for float64 x)",
             t.scalar_type());
    PYF_VALUE(t.numel() == rows, op, name, std::to_string(rows) + " elements (one per row)",
              t.numel());
  }
}

void check_add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                          at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "add_layer_norm";
  check_layer_norm(x, normalized_shape, weight, bias, eps, op);
  check_same(op, "residual", residual, x, "x");
  PYF_VALUE(residual.sizes() == x.sizes(), op, "residual", "shape " + str(x.sizes()),
            str(residual.sizes()));
}

void check_rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& rstd,
                             const std::optional<at::Tensor>& weight,
                             at::IntArrayRef normalized_shape) {
  const char* op = "rms_norm_backward";
  check_layer_norm(x, normalized_shape, weight, std::nullopt, 0.0, op);
  check_same(op, "grad", grad, x, "x");
  PYF_VALUE(grad.sizes() == x.sizes(), op, "grad", "shape " + str(x.sizes()), str(grad.sizes()));
  check_same(op, "rstd", rstd, x, "x", /*dtype=*/false);
  PYF_TYPE(rstd.scalar_type() == (x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat), op,
           "rstd", "the float32 statistics saved by rms_norm (float64 for float64 x)",
           rstd.scalar_type());
  const int64_t rows = layer_norm_rows(x, normalized_shape);
  PYF_VALUE(rstd.numel() == rows, op, "rstd", std::to_string(rows) + " elements (one per row)",
            rstd.numel());
}

void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                        at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                        double eps) {
  const char* op = "add_rms_norm";
  check_layer_norm(x, normalized_shape, weight, std::nullopt, eps, op);
  check_same(op, "residual", residual, x, "x");
  PYF_VALUE(residual.sizes() == x.sizes(), op, "residual", "shape " + str(x.sizes()),
            str(residual.sizes()));
}

void check_rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                  const at::Tensor& sin, const char* op) {
  const bool fwd = std::strcmp(op, "apply_rotary") == 0;
  const char* qn = fwd ? "q" : "grad_q";
  const char* kn = fwd ? "k" : "grad_k";
  check_float(op, qn, q);
  check_same(op, kn, k, q, qn);
  PYF_VALUE(q.dim() == 4, op, qn, "a 4-dim tensor (B, H, L, D)", str(q.sizes()));
  PYF_VALUE(
      k.dim() == 4 && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
      op, kn,
      "shape (" + std::to_string(q.size(0)) + ", H_kv, " + std::to_string(q.size(2)) + ", " +
          std::to_string(q.size(3)) + ")",
      str(k.sizes()));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos},
                                std::pair<const char*, const at::Tensor&>{"sin", sin}}) {
    check_same(op, name, t, q, qn, /*dtype=*/false);
    PYF_TYPE(at::isFloatingType(t.scalar_type()), op, name, "a floating tensor", t.scalar_type());
    const int64_t B = q.size(0), L = q.size(2), D = q.size(3);
    const bool ok3 = t.dim() == 3 && (t.size(0) == 1 || t.size(0) == B) && t.size(1) == L;
    const bool ok2 = t.dim() == 2 && t.size(0) == L;
    PYF_VALUE((ok3 || ok2) && t.size(-1) % 2 == 0 && t.size(-1) <= D, op, name,
              "shape (" + std::to_string(B) + " or 1, " + std::to_string(L) +
                  ", Dr) or (L, Dr) with Dr even and at most D = " + std::to_string(D),
              str(t.sizes()));
  }
  PYF_VALUE(sin.sizes() == cos.sizes(), op, "sin", "the shape of cos " + str(cos.sizes()),
            str(sin.sizes()));
}

void check_swiglu(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_float(op, "gate", gate);
  check_same(op, "up", up, gate, "gate");
  PYF_VALUE(up.sizes() == gate.sizes(), op, "up", "shape " + str(gate.sizes()) + " (gate's)",
            str(up.sizes()));
}

void check_swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "swiglu_backward";
  check_swiglu(gate, up, op);
  check_same(op, "grad", grad, gate, "gate");
  PYF_VALUE(grad.sizes() == gate.sizes(), op, "grad", "shape " + str(gate.sizes()),
            str(grad.sizes()));
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scale, int64_t causal,
                     const std::optional<at::Tensor>& key_lengths, double dropout_p) {
  const char* op = "attention";
  check_float(op, "q", q);
  check_same(op, "k", k, q, "q");
  check_same(op, "v", v, q, "q");
  PYF_VALUE(q.dim() == 4, op, "q", "a 4-dim tensor (B, H, Lq, D)", str(q.sizes()));
  // grouped-query attention: k and v may have H_kv heads, H_kv dividing H
  const bool heads_ok =
      k.dim() == 4 && k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : k.dim() == 4 && q.size(1) == 0;
  PYF_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && heads_ok && k.size(3) == q.size(3), op, "k",
            "shape (" + std::to_string(q.size(0)) + ", H_kv, Lk, " + std::to_string(q.size(3)) +
                ") with H_kv dividing q's " + std::to_string(q.size(1)) + " heads",
            str(k.sizes()));
  PYF_VALUE(
      v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
      op, "v",
      "shape (" + std::to_string(k.size(0)) + ", " + std::to_string(k.size(1)) + ", " +
          std::to_string(k.size(2)) + ", Dv)",
      str(v.sizes()));
  check_finite(op, "scale", scale);
  PYF_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, op, "dropout_p", "a probability in [0, 1]",
            dropout_p);
  const std::vector<int64_t> scores{q.size(0), q.size(1), q.size(2), k.size(2)};
  check_masks(op, scores, q.device(), mask, causal, key_lengths);
}

void check_attention_backward(const at::Tensor& grad_out,
                              const std::optional<at::Tensor>& grad_probs, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs,
                              const at::Tensor& keep, double scale, double dropout_p) {
  const char* op = "attention_backward";
  check_attention(q, k, v, std::nullopt, scale, 0, std::nullopt, dropout_p);
  const std::vector<int64_t> ps{q.size(0), q.size(1), q.size(2), k.size(2)};
  const std::vector<int64_t> os{q.size(0), q.size(1), q.size(2), v.size(3)};
  check_same(op, "probs", probs, q, "q");
  PYF_VALUE(probs.sizes() == at::IntArrayRef(ps), op, "probs",
            "the probs returned by attention, shape " + str(ps), str(probs.sizes()));
  check_same(op, "grad_out", grad_out, q, "q");
  PYF_VALUE(grad_out.sizes() == at::IntArrayRef(os), op, "grad_out", "shape " + str(os),
            str(grad_out.sizes()));
  if (grad_probs) {
    check_same(op, "grad_probs", *grad_probs, q, "q");
    PYF_VALUE(grad_probs->sizes() == at::IntArrayRef(ps), op, "grad_probs", "shape " + str(ps),
              str(grad_probs->sizes()));
  }
  if (dropout_p > 0) {
    check_same(op, "keep", keep, q, "q", /*dtype=*/false);
    PYF_VALUE(keep.scalar_type() == at::kBool && keep.sizes() == at::IntArrayRef(ps), op, "keep",
              "the bool dropout mask returned by attention, shape " + str(ps), str(keep.sizes()));
  }
}

void check_flash_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                    const at::Tensor& lse, const std::optional<at::Tensor>& mask,
                                    double scale, int64_t causal,
                                    const std::optional<at::Tensor>& key_lengths,
                                    const std::optional<at::Tensor>& grad_lse, double dropout_p,
                                    const std::optional<at::Tensor>& rng) {
  const char* op = "flash_attention_backward";
  check_attention(q, k, v, mask, scale, causal, key_lengths, dropout_p);
  const std::vector<int64_t> os{q.size(0), q.size(1), q.size(2), v.size(3)};
  const std::vector<int64_t> ls{q.size(0), q.size(1), q.size(2)};
  check_same(op, "grad_out", grad_out, q, "q");
  PYF_VALUE(grad_out.sizes() == at::IntArrayRef(os), op, "grad_out", "shape " + str(os),
            str(grad_out.sizes()));
  check_same(op, "out", out, q, "q");
  PYF_VALUE(out.sizes() == at::IntArrayRef(os), op, "out", "shape " + str(os), str(out.sizes()));
  check_same(op, "lse", lse, q, "q", /*dtype=*/false);
  PYF_VALUE(lse.sizes() == at::IntArrayRef(ls) && lse.scalar_type() == stat_dtype(q.scalar_type()),
            op, "lse", "the lse flash_attention returned, shape " + str(ls), str(lse.sizes()));
  if (grad_lse) {
    check_same(op, "grad_lse", *grad_lse, q, "q", /*dtype=*/false);
    PYF_VALUE(grad_lse->sizes() == at::IntArrayRef(ls) && grad_lse->is_floating_point(), op,
              "grad_lse", "a floating tensor of shape " + str(ls), str(grad_lse->sizes()));
  }
  if (dropout_p > 0) {
    const bool given = rng && rng->defined();
    PYF_VALUE(
        given && rng->device().is_cpu() && rng->scalar_type() == at::kLong && rng->numel() == 1, op,
        "rng", "the rng flash_attention returned (a CPU int64 tensor of 1 element)",
        given ? str(rng->sizes()) + " " + c10::toString(rng->scalar_type()) + " on " +
                    rng->device().str()
              : std::string("None"));
  }
}

int64_t layer_norm_cols(at::IntArrayRef normalized_shape) {
  int64_t n = 1;
  for (auto s : normalized_shape) n *= s;
  return n;
}

int64_t layer_norm_rows(const at::Tensor& x, at::IntArrayRef normalized_shape) {
  int64_t r = 1;
  for (int64_t d = 0; d < x.dim() - static_cast<int64_t>(normalized_shape.size()); ++d)
    r *= x.size(d);
  return r;
}

}  // namespace pyformer
