// attention: host entry (both devices) and autograd. bmm-based multi-head attention.
//
//   q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv)
//   -> out (B, H, Lq, Dv), probs (B, H, Lq, Lk), keep (B, H, Lq, Lk) bool, or (0,) without dropout
//   or need_probs probs = masked_softmax(scale * q @ k^T + M)  (docs/ops.md);  out = (probs * keep
//   / (1 - p)) @ v
// backward (attention_backward), from the saved probs and keep:
//   dP = grad_out @ v^T, through dropout, + grad_probs;  dS = probs * (dP - sum(dP * probs, -1))
//   dq = scale * dS @ k, dk = scale * dS^T @ q, dv = (probs * keep / (1 - p))^T @ grad_out
//   returns (dq, dk, dv, dS); dS is the gradient w.r.t. the logits scale * q @ k^T + M, which
//   autograd sums to the shape of a floating mask that requires grad.
//
// Dropout: keep is the mask of csrc/philox.h for a Philox key drawn per call from torch's default
// CPU generator (draw_dropout), the same elements the flash algorithm drops and regenerates in its
// backward. The host draws the key, builds the mask layout and allocates every output. A device
// with a fused per-head kernel (the CPU, float32/float64: GEMM -> softmax -> GEMM while the
// scores are in cache, csrc/cpu/attention.cpp) runs it; otherwise, and for the inputs the fused
// kernel declines, the composition below runs: a batched GEMM with the scale as alpha, the
// device's masked-softmax row kernel, the dropout, a batched GEMM. need_probs=False (inference
// without need_weights) returns an empty probs and keeps nothing for a backward; it runs the
// device's flash kernel when it has one (the CPU: csrc/cpu/flash_attention.cpp,
// every dtype), which never forms the (Lq, Lk) scores, so memory stays O(L) at any length.
// k and v may have fewer heads than q (grouped-query attention; see grouped below).
// Napkin math: 4 * B * H * Lq * Lk * D flops forward, 8 * ... backward; memory: q, k, v, out
// once, probs written once (and, in the composition, the scores written and read once).
#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

#include "../kernels.h"
#include "../memory.h"
#include "autograd.h"
#include "gemm.h"

namespace pyformer {

Dropout draw_dropout(double p) {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  const std::lock_guard<std::mutex> lock(gen.mutex());
  return {p, at::check_generator<at::CPUGeneratorImpl>(gen)->random64()};
}

at::Tensor dropout_keep_mask(at::IntArrayRef sizes, const Dropout& dropout,
                             const at::TensorOptions& options) {
  at::Tensor keep = at::empty(sizes, options.dtype(at::kBool));
  if (keep.numel() > 0) kernels::dropout_keep.require(keep.device())(keep, dropout);
  return keep;
}

}  // namespace pyformer

namespace pyformer::host {
namespace {

// (B, H, L, D) -> (B*H, L, D); sizes spelled out, since reshape cannot infer a -1 when D == 0.
at::Tensor bh3(const at::Tensor& t) {
  return t.reshape({t.size(0) * t.size(1), t.size(2), t.size(3)});
}

// Grouped-query attention by shape alone: query head h = g_kv * G + g reads kv head g_kv
// (G = H / H_kv), so a contiguous (B, H, L, X) query-side tensor is (B, H_kv, G * L, X) in the
// same memory, rows of one kv head's group stacked. Every GEMM then runs per kv head on G * L
// rows: k and v are never repeated, and dk, dv come out summed over the group. The mask layout
// keeps indexing rows as (B, H, Lq): the stacked row order is the same.
at::Tensor grouped(const at::Tensor& t, int64_t h_kv) {
  return t.view({t.size(0), h_kv, t.size(1) / h_kv * t.size(2), t.size(3)});
}

}  // namespace

// attention for a dropout already drawn (the op draws one; the flash op's composition and its
// declined backward pass the flash forward's).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& mask, std::optional<double> scale_, int64_t causal,
    const std::optional<at::Tensor>& key_lengths, const Dropout& drop, bool need_probs) {
  const double scale = resolve_scale(q_, scale_);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(q_.device());
  const at::Tensor k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q_.size(0), H = q_.size(1), Lq = q_.size(2), D = q_.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const at::Tensor q = Hkv > 0 ? grouped(q_.contiguous(), Hkv) : q_.contiguous();
  const bool dropped = drop.on();
  const double keep_scale = dropout_keep_scale(drop.p);
  const std::vector<int64_t> ps{B, H, Lq, Lk};
  at::Tensor keep;  // the dropout's keep mask, formed where a path reads it (the flash kernel not)
  const auto keep_mask = [&]() -> const at::Tensor& {
    if (!keep.defined())
      keep = dropped ? dropout_keep_mask(ps, drop, q.options())
                     : at::empty({0}, q.options().dtype(at::kBool));
    return keep;
  };
  at::Tensor out = empty_output({B, H, Lq, Dv}, q.options());
  const at::Tensor out_g = Hkv > 0 ? grouped(out, Hkv) : out;  // (B, H_kv, G * Lq, Dv)
  at::Tensor probs = need_probs ? empty_output(ps, q.options()) : at::Tensor();
  auto result = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    if (need_probs) return {out, probs, keep_mask()};
    return {out, at::empty({0}, q.options()), at::empty({0}, q.options().dtype(at::kBool))};
  };
  if (B * H * Lq == 0) return result();
  if (Lk == 0) {  // no keys: every row fully masked, zero output rows
    out.zero_();
    return result();
  }
  const MaskArgs m = make_mask_args(ps, q.scalar_type(), mask, causal, key_lengths);
  // the fused kernels' GEMMs take the scale as alpha; alpha 0 is the composition's (gemm.h).
  // Without probs (inference), flash attention: O(L) memory at any length.
  if (const auto flash =
          scale != 0 && !need_probs ? kernels::attention_flash_fwd(q.device()) : nullptr) {
    if (flash(q, k, v, out_g, at::Tensor(), m.layout, scale, drop)) return result();
  }
  if (const auto fused = scale != 0 ? kernels::attention_fwd(q.device()) : nullptr) {
    if (fused(q, k, v, out_g, probs, dropped ? keep_mask() : at::Tensor(), m.layout, scale,
              keep_scale))
      return result();
  }
  // the composition: scores = scale * q @ k^T, probs = the masked softmax rows, out = probs @ v
  at::Tensor scores = at::empty({B * Hkv, H / Hkv * Lq, Lk}, q.options());
  if (D == 0)
    scores.zero_();
  else
    scaled_bmm_out(scores, bh3(q), bh3(k).transpose(1, 2), scale);
  if (!probs.defined()) probs = empty_output(ps, q.options());  // the product's input anyway
  kernels::masked_softmax_fwd.require(q.device())(scores, probs, m.layout, 1.0);
  scores.reset();  // let the allocator reuse it for the product below
  if (Dv > 0) {
    const at::Tensor pd = dropped ? probs * keep_mask() * keep_scale : probs;
    at::Tensor out3 = bh3(out_g);
    at::bmm_out(out3, bh3(grouped(pd, Hkv)), bh3(v));
  }
  return result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, std::optional<double> scale, int64_t causal,
    const std::optional<at::Tensor>& key_lengths, double dropout_p, bool need_probs) {
  check_attention(q, k, v, mask, scale.value_or(1.0), causal, key_lengths, dropout_p);
  const Dropout drop = dropout_p > 0 ? draw_dropout(dropout_p) : Dropout{};
  return attention_with(q, k, v, mask, scale, causal, key_lengths, drop, need_probs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_probs, const at::Tensor& q_,
    const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& probs_, const at::Tensor& keep_,
    double scale, double dropout_p) {
  check_attention_backward(grad_out_, grad_probs, q_, k_, v_, probs_, keep_, scale, dropout_p);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(q_.device());
  const bool dropped = dropout_p > 0;
  const double keep_scale = dropout_keep_scale(dropout_p);
  const at::Tensor k = k_.contiguous(), v = v_.contiguous();
  at::Tensor dq = empty_output_like(q_), dk = empty_output_like(k), dv = empty_output_like(v);
  at::Tensor dS = empty_output_like(probs_);
  if (probs_.numel() == 0) {  // nothing flows: zero gradients
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dS};
  }
  // every query-side tensor grouped by kv head (see grouped)
  const int64_t Hkv = k.size(1);
  const auto gr = [&](const at::Tensor& t) { return grouped(t.contiguous(), Hkv); };
  const at::Tensor g = gr(grad_out_), q = gr(q_), probs = gr(probs_);
  const at::Tensor keep = dropped ? gr(keep_) : at::Tensor();
  const at::Tensor gp = grad_probs ? gr(*grad_probs) : at::Tensor();
  const at::Tensor dq_g = grouped(dq, Hkv), dS_g = grouped(dS, Hkv);
  if (const auto fused = scale != 0 ? kernels::attention_bwd(q.device()) : nullptr) {
    if (fused(g, gp, q, k, v, probs, keep, scale, keep_scale, dq_g, dk, dv, dS_g))
      return {dq, dk, dv, dS};
  }
  // the composition
  const at::Tensor g3 = bh3(g), q3 = bh3(q), k3 = bh3(k), v3 = bh3(v);
  at::Tensor dP = at::bmm(g3, v3.transpose(1, 2)).view(probs.sizes());
  if (dropped) dP.mul_(keep).mul_(keep_scale);
  if (gp.defined()) dP.add_(gp);
  kernels::masked_softmax_bwd.require(q.device())(dP, probs, dS_g, 1.0);
  dP.reset();
  const at::Tensor dS3 = bh3(dS_g);
  at::Tensor dq3 = bh3(dq_g), dk3 = bh3(dk), dv3 = bh3(dv);
  scaled_bmm_out(dq3, dS3, k3, scale);
  scaled_bmm_out(dk3, dS3.transpose(1, 2), q3, scale);
  const at::Tensor pd = dropped ? probs * keep * keep_scale : probs;
  at::bmm_out(dv3, bh3(pd).transpose(1, 2), g3);
  return {dq, dk, dv, dS};
}

// ---- autograd -----------------------------------------------------------------------------------

using AttentionSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    std::optional<double>, int64_t, const std::optional<at::Tensor>&, double, bool);
using AttentionBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double);
PYFORMER_OP_HANDLE(attention, AttentionSig)
PYFORMER_OP_HANDLE(attention_backward, AttentionBwdSig)

// Grouped-query attention in ATen ops, off the hot path (a gradient of a gradient, a declined
// kernel): k or v repeated to the query heads (H / H_kv each), and a key-side gradient (B, H, ...)
// summed back over each group to (B, H_kv, ...).
namespace {
at::Tensor repeat_kv(const at::Tensor& t, int64_t heads) {
  const int64_t G = t.size(1) > 0 ? heads / t.size(1) : 1;
  return G > 1 ? t.repeat_interleave(G, 1) : t;
}
at::Tensor sum_groups(const at::Tensor& t, int64_t kv_heads) {
  const int64_t G = kv_heads > 0 ? t.size(1) / kv_heads : 1;
  return G > 1 ? t.unflatten(1, {kv_heads, G}).sum(2) : t;
}
}  // namespace

// The backward in differentiable ATen ops (creating_graph), the formulas of attention_backward in
// the statistics dtype; probs is the op's own saved output, so differentiating through it runs
// this node's backward again (with grad_probs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> differentiable_attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_probs, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs, const at::Tensor& keep,
    double scale, double dropout_p) {
  const at::ScalarType dt = q.scalar_type(), acc = stat_dtype(dt);
  const int64_t H = q.size(1), Hkv = k.size(1);
  const at::Tensor g = grad_out.to(acc), qa = q.to(acc);
  const at::Tensor ka = repeat_kv(k.to(acc), H), va = repeat_kv(v.to(acc), H);
  const at::Tensor p = probs.to(acc);
  const bool dropped = dropout_p > 0;
  const double keep_scale = dropout_keep_scale(dropout_p);
  const at::Tensor pd = dropped ? p * keep * keep_scale : p;
  at::Tensor dP = at::matmul(g, va.transpose(-2, -1));
  if (dropped) dP = dP * keep * keep_scale;
  if (grad_probs) dP = dP + grad_probs->to(acc);
  const at::Tensor dS = differentiable_softmax_backward(p, dP);
  return {at::matmul(dS, ka).mul(scale).to(dt),
          sum_groups(at::matmul(dS.transpose(-2, -1), qa), Hkv).mul(scale).to(dt),
          sum_groups(at::matmul(pd.transpose(-2, -1), g), Hkv).to(dt), dS.to(dt)};
}

struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& mask,
                               std::optional<double> scale, int64_t causal,
                               const std::optional<at::Tensor>& key_lengths, double dropout_p,
                               bool need_probs) {
    at::Tensor out, probs, keep;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, probs, keep) =
          attention_op().call(q, k, v, mask, scale, causal, key_lengths, dropout_p, need_probs);
    }
    ctx->saved_data["scale"] = save_scale(scale);
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["mask_grad"] = requires_grad(mask);
    if (requires_grad(mask)) {
      ctx->saved_data["mask_sizes"] = mask->sizes().vec();
      ctx->saved_data["mask_dtype"] = static_cast<int64_t>(mask->scalar_type());
    }
    ctx->mark_non_differentiable({keep});
    // a probs output that nothing differentiates arrives undefined, not as a (B,H,Lq,Lk) tensor
    // of zeros that the backward would then read and add
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k, v, probs, keep});
    return {out, probs, keep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2];
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined())
      grad_out = at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
    const std::optional<at::Tensor> grad_probs =
        grads[1].defined() ? std::optional<at::Tensor>(grads[1]) : std::nullopt;
    const double scale = saved_scale(ctx->saved_data["scale"], q);
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    at::Tensor dq, dk, dv, dlogits;
    if (creating_graph()) {
      std::tie(dq, dk, dv, dlogits) = differentiable_attention_backward(
          grad_out, grad_probs, q, k, v, s[3], s[4], scale, dropout_p);
    } else {
      std::tie(dq, dk, dv, dlogits) =
          attention_backward_op().call(grad_out, grad_probs, q, k, v, s[3], s[4], scale, dropout_p);
    }
    at::Tensor dmask;
    if (ctx->saved_data["mask_grad"].toBool()) {
      dmask = mask_grad(dlogits, ctx->saved_data["mask_sizes"].toIntVector(),
                        static_cast<at::ScalarType>(ctx->saved_data["mask_dtype"].toInt()));
    }
    return {dq,           dk,           dv,           dmask,       at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- the flash algorithm: out and lse forward, the gradients recomputed from lse ---------------

// The gradient flowing into lse added to (dq, dk, dlogits), in ATen ops (differentiable, for a
// gradient of a gradient, and for the rare backward the flash kernel declines): d lse / d logits
// = probs, so dlogits += probs * grad_lse, and through the logits scale * q @ k^T to dq and dk
// (dk summed over each group of query heads).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_lse_grad(
    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dlogits, const at::Tensor& probs,
    const at::Tensor& grad_lse, const at::Tensor& q, const at::Tensor& k, double scale) {
  const at::ScalarType dt = q.scalar_type(), acc = stat_dtype(dt);
  // a masked key (probability 0) takes no gradient, whatever grad_lse holds (0 * inf)
  const at::Tensor p = probs.to(acc);
  const at::Tensor e =
      at::where(p == 0, at::zeros({}, p.options()), p * grad_lse.to(acc).unsqueeze(-1));
  const at::Tensor ek = sum_groups(at::matmul(e.transpose(-2, -1), q.to(acc)), k.size(1));
  return {dq + at::matmul(e, repeat_kv(k.to(acc), q.size(1))).mul(scale).to(dt),
          dk + ek.mul(scale).to(dt), dlogits.numel() ? dlogits + e.to(dt) : e.to(dt)};
}

namespace {
// The flash op where no flash kernel takes the call (a device without flash kernels, CUDA today;
// sizes past the CPU kernel's; PYFORMER_CPU_FLASH=0): the bmm composition, on the inputs
// converted to the statistics dtype so that lse is exact to that dtype. lse = x_j - log p_j at
// each row's most probable key j (x_j = scale * q k_j + M_j; p_j >= 1 / Lk, so the log loses
// nothing): -inf where every probability is 0 (a fully masked row), NaN where they are NaN (the
// NaN rule of docs/ops.md, which the probabilities carry).
void composed_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask, std::optional<double> scale_,
                    int64_t causal, const std::optional<at::Tensor>& key_lengths,
                    const Dropout& drop, const at::Tensor& out, const at::Tensor& lse) {
  const at::ScalarType acc = stat_dtype(q.scalar_type());
  const at::Tensor qa = q.to(acc), ka = k.to(acc);
  std::optional<at::Tensor> m = mask;
  if (mask && mask->is_floating_point()) m = mask->to(acc);
  const auto [o, probs, keep] =
      attention_with(qa, ka, v.to(acc), m, scale_, causal, key_lengths, drop, true);
  out.copy_(o);
  const auto [pmax, j] = probs.max(-1, /*keepdim=*/true);  // (B, H, Lq, 1)
  const at::Tensor kj = repeat_kv(ka, q.size(1)).gather(2, j.expand({-1, -1, -1, q.size(3)}));
  at::Tensor x = (qa * kj).sum(-1, /*keepdim=*/true).mul_(resolve_scale(q, scale_));
  if (m && m->is_floating_point()) x = x + m->expand(probs.sizes()).gather(3, j);
  const at::Tensor ninf = at::full({}, -std::numeric_limits<double>::infinity(), x.options());
  lse.copy_(at::where(pmax == 0, ninf, x - pmax.log()).squeeze(-1));
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& mask, std::optional<double> scale_, int64_t causal,
    const std::optional<at::Tensor>& key_lengths, double dropout_p) {
  check_attention(q_, k_, v_, mask, scale_.value_or(1.0), causal, key_lengths, dropout_p);
  const double scale = resolve_scale(q_, scale_);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(q_.device());
  const at::Tensor k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q_.size(0), H = q_.size(1), Lq = q_.size(2), Hkv = k.size(1);
  at::Tensor out = empty_output({B, H, Lq, v.size(3)}, q_.options());
  at::Tensor lse = empty_output({B, H, Lq}, q_.options().dtype(stat_dtype(q_.scalar_type())));
  TORCH_CHECK_VALUE(q_.size(3) > 0 && v.size(3) > 0,
                    "pyformer.flash_attention: the flash algorithm needs head dims D > 0 and Dv "
                    "> 0, got D = ",
                    q_.size(3), ", Dv = ", v.size(3), " (the bmm algorithm takes them)");
  // drawn once the call is known to run: a refused call leaves the generator as it was
  const Dropout drop = dropout_p > 0 ? draw_dropout(dropout_p) : Dropout{};
  const at::Tensor rng = drop.on() ? at::full({1}, static_cast<int64_t>(drop.seed), at::kLong)
                                   : at::empty({0}, at::kLong);
  if (B * H * Lq == 0) return {out, lse, rng};
  if (k.size(2) == 0) {  // no keys: every row fully masked
    out.zero_(), lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse, rng};
  }
  const MaskArgs m =
      make_mask_args({B, H, Lq, k.size(2)}, q_.scalar_type(), mask, causal, key_lengths);
  const auto flash = kernels::attention_flash_fwd(q_.device());
  if (!flash || !flash(grouped(q_.contiguous(), Hkv), k, v, grouped(out, Hkv),
                       lse.view({B, Hkv, -1}), m.layout, scale, drop))
    composed_flash(q_, k, v, mask, scale_, causal, key_lengths, drop, out, lse);
  return {out, lse, rng};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    std::optional<double> scale_, int64_t causal, const std::optional<at::Tensor>& key_lengths,
    bool logits_grad, const std::optional<at::Tensor>& grad_lse, double dropout_p,
    const std::optional<at::Tensor>& rng) {
  check_flash_attention_backward(grad_out, q_, k_, v_, out, lse, mask, scale_.value_or(1.0), causal,
                                 key_lengths, grad_lse, dropout_p, rng);
  const double scale = resolve_scale(q_, scale_);
  const BelowAutograd below_autograd;
  const c10::OptionalDeviceGuard guard(q_.device());
  // the forward's dropout, regenerated from its key
  const Dropout drop =
      dropout_p > 0 ? Dropout{dropout_p, static_cast<uint64_t>(rng->const_data_ptr<int64_t>()[0])}
                    : Dropout{};
  const at::Tensor k = k_.contiguous(), v = v_.contiguous();
  at::Tensor dq = empty_output_like(q_), dk = empty_output_like(k), dv = empty_output_like(v);
  const int64_t B = q_.size(0), H = q_.size(1), Lq = q_.size(2), Hkv = k.size(1);
  // the kernel writes the keys each row reaches; every other logit's gradient is 0
  at::Tensor dlogits =
      logits_grad ? at::zeros({B, H, Lq, k.size(2)}, q_.options()) : at::empty({0}, q_.options());
  if (B * H * Lq == 0 || k.size(2) == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dlogits};
  }
  const MaskArgs m =
      make_mask_args({B, H, Lq, k.size(2)}, q_.scalar_type(), mask, causal, key_lengths);
  const auto flash = kernels::attention_flash_bwd(q_.device());
  if (flash &&
      flash(
          grouped(grad_out.contiguous(), Hkv), grouped(q_.contiguous(), Hkv), k, v,
          grouped(out.contiguous(), Hkv), lse.contiguous().view({B, Hkv, -1}),
          grad_lse ? grad_lse->to(lse.scalar_type()).contiguous().view({B, Hkv, -1}) : at::Tensor(),
          m.layout, scale, drop, grouped(dq, Hkv), dk, dv, logits_grad ? dlogits : at::Tensor()))
    return {dq, dk, dv, dlogits};
  // No kernel (a device without flash kernels), or declined: an output (or grad_lse) holding
  // NaN/inf, whose rule the probabilities carry (a masked key's NaN value row, a NaN score;
  // docs/ops.md), or sizes past the kernel's. The probabilities (and the forward's keep mask) are
  // formed again and the bmm backward runs.
  const auto [o, probs, keep] =
      attention_with(q_, k_, v_, mask, scale_, causal, key_lengths, drop, /*need_probs=*/true);
  auto [gq, gk, gv, gs] =
      attention_backward(grad_out, std::nullopt, q_, k_, v_, probs, keep, scale, dropout_p);
  if (grad_lse) std::tie(gq, gk, gs) = add_lse_grad(gq, gk, gs, probs, *grad_lse, q_, k_, scale);
  return {gq, gk, gv, logits_grad ? gs : dlogits};
}

using FlashSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    std::optional<double>, int64_t, const std::optional<at::Tensor>&, double);
using FlashBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, std::optional<double>, int64_t,
    const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&);
PYFORMER_OP_HANDLE(flash_attention, FlashSig)
PYFORMER_OP_HANDLE(flash_attention_backward, FlashBwdSig)

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, std::optional<double> scale, int64_t causal,
    const std::optional<at::Tensor>& key_lengths, double dropout_p, bool need_probs);

// attention's autograd node on the flash algorithm: saves q, k, v, out, lse and the dropout's key
// (O(L) memory; the keep mask is regenerated). A floating mask that requires grad gets the
// logits' gradient summed to its shape, from a (B, H, Lq, Lk) buffer that lives only during the
// backward.
struct FlashAttentionFunction : torch::autograd::Function<FlashAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& mask,
                               std::optional<double> scale, int64_t causal,
                               const std::optional<at::Tensor>& key_lengths, double dropout_p) {
    at::Tensor out, lse, rng;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, lse, rng) =
          flash_attention_op().call(q, k, v, mask, scale, causal, key_lengths, dropout_p);
    }
    ctx->saved_data["scale"] = save_scale(scale);
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    // mask and key_lengths are read again by the backward: saved as variables, so that an
    // in-place change between forward and backward (a learned bias's optimizer step) raises
    ctx->save_for_backward({q, k, v, out, lse, mask ? *mask : at::Tensor(),
                            key_lengths ? *key_lengths : at::Tensor(), rng});
    ctx->mark_non_differentiable({rng});
    // an output that nothing differentiates arrives undefined: no zero-filled grad_lse to read
    ctx->set_materialize_grads(false);
    return {out, lse, rng};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &rng = s[7];
    const auto opt = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    const std::optional<at::Tensor> mask = opt(s[5]), key_lengths = opt(s[6]);
    const c10::IValue& sv = ctx->saved_data["scale"];
    const std::optional<double> scale =
        sv.isNone() ? std::nullopt : std::optional<double>(sv.toDouble());
    const int64_t causal = ctx->saved_data["causal"].toInt();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    // the (B, H, Lq, Lk) logits' gradient only when the mask's gradient is wanted
    const bool grad_mask = mask && mask->is_floating_point() && ctx->needs_input_grad(3);
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const std::optional<at::Tensor> grad_lse = opt(grads[1]);
    at::Tensor dq, dk, dv, dlogits;
    if (creating_graph()) {  // a gradient of a gradient: the attention node that forms probs
      const at::Tensor probs =
          std::get<1>(attention_autograd(q, k, v, mask, scale, causal, key_lengths, 0.0, true));
      const at::Tensor keep =
          dropout_p > 0 ? dropout_keep_mask(
                              probs.sizes(),
                              {dropout_p, static_cast<uint64_t>(rng.const_data_ptr<int64_t>()[0])},
                              q.options())
                        : at::Tensor();
      std::tie(dq, dk, dv, dlogits) = differentiable_attention_backward(
          grad_out, std::nullopt, q, k, v, probs, keep, saved_scale(sv, q), dropout_p);
      if (grad_lse)
        std::tie(dq, dk, dlogits) =
            add_lse_grad(dq, dk, dlogits, probs, *grad_lse, q, k, saved_scale(sv, q));
    } else {
      std::tie(dq, dk, dv, dlogits) =
          flash_attention_backward_op().call(grad_out, q, k, v, out, lse, mask, scale, causal,
                                             key_lengths, grad_mask, grad_lse, dropout_p, rng);
    }
    const at::Tensor dmask =
        grad_mask ? mask_grad(dlogits, mask->sizes(), mask->scalar_type()) : at::Tensor();
    return {dq, dk, dv, dmask, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether a recorded call takes the flash algorithm: no probs asked for, a device with both flash
// kernels; the edges (no keys, D = 0, scale 0) run the bmm node. Sizes are read as SymInts, so
// that a traced call (torch.export, torch.compile with dynamic shapes) keeps them symbolic.
bool takes_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 std::optional<double> scale, bool need_probs) {
  if (need_probs || (scale && *scale == 0)) return false;
  if (!kernels::attention_flash_fwd(q.device()) || !kernels::attention_flash_bwd(q.device()))
    return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;  // the op's checks say why
  const auto positive = [](const c10::SymInt& n) {
    return n > 0;
  };  // a guard, not a specialization
  return positive(q.sym_size(3)) && positive(v.sym_size(3)) && positive(k.sym_size(2));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, std::optional<double> scale, int64_t causal,
    const std::optional<at::Tensor>& key_lengths, double dropout_p, bool need_probs) {
  if (!recording(q, k, v, mask)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return attention_op().call(q, k, v, mask, scale, causal, key_lengths, dropout_p, need_probs);
  }
  const auto empty = [&](at::ScalarType dt) { return at::empty({0}, q.options().dtype(dt)); };
  if (takes_flash(q, k, v, scale, need_probs)) {
    const variable_list r =
        FlashAttentionFunction::apply(q, k, v, mask, scale, causal, key_lengths, dropout_p);
    return {r[0], empty(q.scalar_type()), empty(at::kBool)};
  }
  // the bmm node needs the probabilities for its backward, whether or not they are returned
  const variable_list r =
      AttentionFunction::apply(q, k, v, mask, scale, causal, key_lengths, dropout_p, true);
  if (need_probs) return {r[0], r[1], r[2]};
  return {r[0], empty(q.scalar_type()), empty(at::kBool)};
}

// flash_attention's autograd kernel: (out, lse, rng), out and lse differentiable
// (pyformer.attention's return_lse).
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, std::optional<double> scale, int64_t causal,
    const std::optional<at::Tensor>& key_lengths, double dropout_p) {
  if (!recording(q, k, v, mask)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return flash_attention_op().call(q, k, v, mask, scale, causal, key_lengths, dropout_p);
  }
  const variable_list r =
      FlashAttentionFunction::apply(q, k, v, mask, scale, causal, key_lengths, dropout_p);
  return {r[0], r[1], r[2]};
}

static void register_host(torch::Library& m) {
  m.impl("attention", &attention);
  m.impl("attention_backward", &attention_backward);
  m.impl("flash_attention", &flash_attention);
  m.impl("flash_attention_backward", &flash_attention_backward);
}
TORCH_LIBRARY_IMPL(pyformer, CPU, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, CUDA, m) { register_host(m); }
TORCH_LIBRARY_IMPL(pyformer, Autograd, m) {
  m.impl("attention", &attention_autograd);
  m.impl("flash_attention", &flash_attention_autograd);
  register_no_double_backward(m, "attention_backward");
  register_no_double_backward(m, "flash_attention_backward");
}

}  // namespace pyformer::host

namespace pyformer::kernels {
PYFORMER_DEFINE_SLOT(AttentionFwd, attention_fwd, "attention forward");
PYFORMER_DEFINE_SLOT(AttentionBwd, attention_bwd, "attention backward");
PYFORMER_DEFINE_SLOT(AttentionFlashFwd, attention_flash_fwd, "flash attention forward");
PYFORMER_DEFINE_SLOT(AttentionFlashBwd, attention_flash_bwd, "flash attention backward");
PYFORMER_DEFINE_SLOT(DropoutKeep, dropout_keep, "attention dropout mask");
}  // namespace pyformer::kernels
