// pyformer: the schema of every op, in one TORCH_LIBRARY block, and the `pyformer._C` module.
//
// Semantics: docs/ops.md. Each op's host entry and autograd live in csrc/host/<op>.cpp, its kernels
// in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, its fake kernel in pyformer/ops/<op>.py. Backward
// passes are ops of their own so that torch.compile sees (and can trace) every piece of the graph.
#include <torch/library.h>

#include "pyformer.h"

TORCH_LIBRARY(pyformer, m) {
  // scores = scale * q @ k^T.  q (..., Lq, D), k (..., Lk, D) -> (..., Lq, Lk)
  // scale None: 1/sqrt(D), resolved by the host, so D may stay symbolic under torch.compile
  m.def("scaled_qk(Tensor q, Tensor k, float? scale) -> Tensor");
  // (dq, dk) = (scale * grad @ k, scale * grad^T @ q)
  m.def("scaled_qk_backward(Tensor grad, Tensor q, Tensor k, float scale) -> (Tensor, Tensor)");

  // probs = softmax(scale * scores + M) over the last dim; M from mask / causal / key_lengths.
  // causal: 0 none, 1 top-left (key j <= i), 2 bottom-right (key j <= i + Lk - Lq).
  m.def(
      "masked_softmax(Tensor scores, Tensor? mask, float scale, int causal, Tensor? "
      "key_lengths)"
      " -> Tensor");
  // dscores = scale * out * (grad - sum(grad * out, -1))
  m.def("masked_softmax_backward(Tensor grad, Tensor out, float scale) -> Tensor");

  // (y, mean, rstd); mean and rstd are float32 (float64 for float64 x), one per row.
  // normalized_shape is SymInt[] so that it stays symbolic under torch.compile(dynamic=True) (the
  // autograd kernels take SymInts; the device kernels, concrete sizes).
  m.def(
      "layer_norm(Tensor x, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  // (dx, dweight, dbias); dweight and dbias have normalized_shape and are always computed.
  m.def(
      "layer_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight,"
      " SymInt[] normalized_shape) -> (Tensor, Tensor, Tensor)");
  // (y, s, mean, rstd) with s = x + residual and y = layer_norm(s).
  m.def(
      "add_layer_norm(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight,"
      " Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");

  // (y, rstd): y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) per row (float32; float64
  // for float64 x). eps None: the machine epsilon of the statistics dtype (torch's F.rms_norm).
  m.def(
      "rms_norm(Tensor x, SymInt[] normalized_shape, Tensor? weight, float? eps)"
      " -> (Tensor, Tensor)");
  // (dx, dweight); dweight has normalized_shape and is always computed.
  m.def(
      "rms_norm_backward(Tensor grad, Tensor x, Tensor rstd, Tensor? weight,"
      " SymInt[] normalized_shape) -> (Tensor, Tensor)");
  // (y, s, rstd) with s = x + residual and y = rms_norm(s).
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight,"
      " float? eps) -> (Tensor, Tensor, Tensor)");

  // (q_rot, k_rot) = (q cos + rotate(q) sin, k cos + rotate(k) sin) on the first Dr dims of each
  // head; q (B, H, L, D), k (B, H_kv, L, D), cos and sin (B or 1, L, Dr) or (L, Dr).
  m.def(
      "apply_rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False)"
      " -> (Tensor, Tensor)");
  // (dq, dk) = (g cos + rotate^T(g sin)) for each of grad_q, grad_k.
  m.def(
      "apply_rotary_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin,"
      " bool interleaved) -> (Tensor, Tensor)");

  // silu(gate) * up, elementwise; the backward returns (dgate, dup).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");

  // (out, probs, keep): out = dropout(probs) @ v, probs = masked_softmax(scaled_qk(q, k, scale)).
  // keep is the bool dropout mask (shape of probs; csrc/philox.h, from a key drawn per call) with
  // need_probs and dropout_p > 0, an empty bool tensor otherwise. need_probs=False (no
  // need_weights) returns an empty probs; outside autograd the device's flash kernel then runs
  // where it has one (the CPU), and the fused CPU kernel otherwise never writes the (B,H,Lq,Lk)
  // probs. When autograd records the call, its kernel either takes the flash algorithm
  // (flash_attention below: no need_probs, a device with flash kernels) or asks for the probs
  // itself, which the backward needs. Random with dropout: tagged nondeterministic_seeded, so that
  // a graph never merges two calls.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float? scale, int causal,"
      " Tensor? key_lengths, float dropout_p, bool need_probs=True) -> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // (dq, dk, dv, dlogits); grad_probs is the gradient flowing into the returned probs
  // (need_weights); dlogits is the gradient w.r.t. the logits scale * q @ k^T + M, which the
  // Python wrapper sums to the shape of a floating mask that requires grad (and otherwise drops).
  m.def(
      "attention_backward(Tensor grad_out, Tensor? grad_probs, Tensor q, Tensor k, Tensor v,"
      " Tensor probs, Tensor keep, float scale, float dropout_p) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  // The flash algorithm of attention (no probabilities): out, the log-sum-exp of each query
  // row, lse (B, H, Lq) in the statistics dtype (float32; float64 for float64), -inf for a fully
  // masked row, and rng, the dropout's Philox key (a CPU int64 tensor of 1 element; empty without
  // dropout; csrc/philox.h). The backward recomputes the probabilities from lse, regenerates the
  // dropout from rng, and returns (dq, dk, dv, dlogits), dlogits (B, H, Lq, Lk) the gradient
  // w.r.t. the logits when logits_grad (for a mask that requires grad; an empty tensor
  // otherwise); grad_lse, when given, is the gradient flowing into lse (d lse / d logits =
  // probs). k and v may have fewer heads than q (grouped-query attention). The CPU has the
  // kernels; pyformer.attention takes this path itself where it applies
  // (csrc/host/attention.cpp).
  m.def(
      "flash_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float? scale, int causal,"
      " Tensor? key_lengths, float dropout_p=0.0) -> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
      " Tensor lse, Tensor? mask, float? scale, int causal, Tensor? key_lengths,"
      " bool logits_grad=False, Tensor? grad_lse=None, float dropout_p=0.0, Tensor? rng=None)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}
