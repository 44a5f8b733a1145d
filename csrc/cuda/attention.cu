// pyformer CUDA: bmm-based multi-head attention, forward and backward.
//
// What it computes (ops.md), the same composition as csrc/cpu/attention.cpp:
//   scores = scale * q @ k^T                   cuBLAS (at::baddbmm_out, alpha = scale, beta = 0)
//   probs  = masked_softmax(scores, mask, causal, key_lengths)      masked_softmax.cu's kernel
//   keep   = rand < 1 - p (bool), only when dropout_p > 0
//   out    = (probs * keep / (1 - p)) @ v            cuBLAS (at::bmm_out)
// backward, from the saved probs and keep:
//   dP  = grad_out @ v^T, through dropout (* keep / (1 - p)), + grad_probs when given
//   dS  = probs * (dP - sum(dP * probs, -1))         masked_softmax.cu's backward kernel, scale 1
//   dq  = scale * dS @ k,  dk = scale * dS^T @ q,  dv = (probs * keep / (1 - p))^T @ grad_out
//   returns (dq, dk, dv, dS); dS is the gradient w.r.t. the logits scale * q @ k^T + M, which the
//   Python wrapper reduces to a floating mask's shape when that mask requires grad.
//
// Shapes: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv); out (B, H, Lq, Dv); probs and keep
// (B, H, Lq, Lk), keep an empty (0,) bool tensor when dropout_p == 0.
//
// Algorithm: the three steps above as separate launches on the current stream. The GEMMs go to
// cuBLAS rather than scaled_qk.cu's WMMA kernel: at these shapes cuBLAS's pipelined tensor-core
// kernels are the faster choice (`pyformer bench` reports scaled_qk's own kernel separately), and
// the scale rides along as alpha, so no extra pass. The softmax reads the scores once and writes
// probs once (the probs are an output anyway: need_weights and the backward use them).
//
// Napkin math, forward (8, 16, 1024, 64) bf16, padding mask: GEMMs 4 * 128 * 1024^2 * 64 = 34
// GFLOP (~0.05 ms of tensor-core time at ~700 TFLOP/s); memory: scores written and read once (256
// MiB each way), probs written once (256 MiB), q/k/v/out 64 MiB: ~0.8 GiB, ~0.28 ms at 3 TB/s.
// The textbook composition (matmul, divide, masked_fill, softmax, matmul) moves the (B,H,Lq,Lk)
// tensor ~4 more times, hence the expected ~2x. A fused flash-style kernel would not write scores
// or probs at all; that is SDPA's advantage, reported by the benchmark without a target.
// Unmeasured: no GPU was lent to the session that wrote this.
//
// Sections: helpers, ops + registration (no kernels of its own).
#include "common.cuh"

namespace pyformer {
namespace cuda {
namespace {

// ---- helpers ------------------------------------------------------------------------------------

// (B, H, L, D) -> (B*H, L, D); sizes spelled out, since reshape cannot infer a -1 when D == 0.
inline at::Tensor bh3(const at::Tensor& t) {
  return t.reshape({t.size(0) * t.size(1), t.size(2), t.size(3)});
}

inline double keep_scale_for(double dropout_p) {
  return dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
}

}  // namespace

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& mask, double scale, bool causal,
    const std::optional<at::Tensor>& key_lengths, double dropout_p, bool need_probs) {
  check_attention(q_in, k_in, v_in, mask, scale, causal, key_lengths, dropout_p);
  check_same_cuda_device("attention", {{"q", &q_in},
                                       {"k", &k_in},
                                       {"v", &v_in},
                                       {"mask", opt_ptr(mask)},
                                       {"key_lengths", opt_ptr(key_lengths)}});
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Lk = k.size(2), Dv = v.size(3);
  const bool dropped = dropout_p > 0.0;

  at::Tensor out = at::empty({B, H, Lq, Dv}, q.options());
  // keep ~ Bernoulli(1 - p), drawn as csrc/cpu/attention.cpp does (uniform < 1 - p)
  at::Tensor keep =
      dropped ? at::rand({B, H, Lq, Lk}, q.options().dtype(at::kFloat)) < (1.0 - dropout_p)
              : at::empty({0}, q.options().dtype(at::kBool));
  const auto no_probs = [&] { return at::empty(need_probs ? at::IntArrayRef({B, H, Lq, Lk}) : at::IntArrayRef({0}), q.options()); };
  if (B * H * Lq == 0) return {out, no_probs(), keep};
  if (Lk == 0) {  // no keys: every row fully masked, zero output rows
    out.zero_();
    return {out, no_probs(), keep};
  }

  // scores (B*H, Lq, Lk) = scale * q @ k^T
  at::Tensor scores = at::empty({B * H, Lq, Lk}, q.options());
  if (D == 0) {
    scores.zero_();
  } else {
    at::baddbmm_out(scores, scores, q.view({B * H, Lq, D}), k.view({B * H, Lk, D}).transpose(1, 2),
                    /*beta=*/0.0, /*alpha=*/scale);
  }
  // probs = fused masked softmax (scale already applied)
  at::Tensor probs = masked_softmax_forward_launch(scores.view({B, H, Lq, Lk}), mask, 1.0, causal,
                                                   key_lengths);
  scores.reset();  // let the caching allocator reuse it for the output product below

  const at::Tensor pd = dropped ? probs * keep * keep_scale_for(dropout_p) : probs;
  if (Dv > 0) {
    at::Tensor out3 = out.view({B * H, Lq, Dv});
    at::bmm_out(out3, pd.view({B * H, Lq, Lk}), v.view({B * H, Lk, Dv}));
  }
  // need_probs=False: the probs were the product's input anyway; they are just not returned
  return {out, need_probs ? probs : at::empty({0}, q.options()), keep};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_probs, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs, const at::Tensor& keep,
    double scale, double dropout_p) {
  check_attention_backward(grad_out, grad_probs, q, k, v, probs, keep, scale, dropout_p);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), Dv = v.size(3);
  const bool dropped = dropout_p > 0.0;
  check_same_cuda_device("attention_backward", {{"grad_out", &grad_out},
                                                {"grad_probs", opt_ptr(grad_probs)},
                                                {"q", &q},
                                                {"k", &k},
                                                {"v", &v},
                                                {"probs", &probs},
                                                {"keep", dropped ? &keep : nullptr}});
  c10::cuda::CUDAGuard guard(q.device());

  if (B * H * Lq * Lk == 0) {  // nothing flows: zero gradients of the right shapes
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous),
            at::zeros(probs.sizes(), probs.options())};
  }
  const double keep_scale = keep_scale_for(dropout_p);
  const at::Tensor g = bh3(grad_out), q3 = bh3(q), k3 = bh3(k), v3 = bh3(v);

  // dP = grad_out @ v^T, through dropout, plus the gradient flowing into the returned probs
  at::Tensor dP = at::bmm(g, v3.transpose(1, 2)).view(probs.sizes());
  if (dropped) dP.mul_(keep).mul_(keep_scale);
  if (const at::Tensor* gp = opt_ptr(grad_probs)) dP.add_(*gp);

  // dS = probs * (dP - sum(dP * probs)): the fused softmax backward, scale 1
  const at::Tensor dS = masked_softmax_backward_launch(dP, probs, 1.0);
  dP.reset();
  const at::Tensor dS3 = bh3(dS);

  at::Tensor dq = at::empty_like(q3, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k3, at::MemoryFormat::Contiguous);
  at::baddbmm_out(dq, dq, dS3, k3, /*beta=*/0.0, /*alpha=*/scale);
  at::baddbmm_out(dk, dk, dS3.transpose(1, 2), q3, /*beta=*/0.0, /*alpha=*/scale);
  const at::Tensor pd = dropped ? probs * keep * keep_scale : probs;
  at::Tensor dv = at::bmm(bh3(pd).transpose(1, 2), g);
  return {dq.view(q.sizes()), dk.view(k.sizes()), dv.view(v.sizes()), dS};
}

}  // namespace cuda
}  // namespace pyformer

TORCH_LIBRARY_IMPL(pyformer, CUDA, m) {
  m.impl("attention", &pyformer::cuda::attention_cuda);
  m.impl("attention_backward", &pyformer::cuda::attention_backward_cuda);
}
