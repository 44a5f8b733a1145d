// swiglu on the CPU: the elementwise kernels behind kernels::swiglu_fwd / _bwd.
//
//   out = silu(gate) * up = gate * sigmoid(gate) * up                     gate, up, out (n,)
//   backward: dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * gate * s, s =
//   sigmoid(gate)
//
// Algorithm: one pass over the flat, contiguous tensors, split across threads in chunks of
// kChunk elements; each chunk is converted to the accumulation type (float32 for the half types)
// in a stack buffer, computed with at::vec (Sleef's exp, 1 ulp), and rounded once on the way out.
// Napkin math (float32): the forward reads 8 bytes and writes 4 per element and does ~6 flops and
// one exp, so it runs at memory speed where PyTorch's F.silu(gate) * up makes two passes (reads
// 12 bytes, writes 8: the silu result goes to memory and back); the backward reads 12 and writes
// 8 bytes, where PyTorch's silu_backward and two products make four passes.
#include <ATen/Parallel.h>

#include <algorithm>

#include "../kernels.h"
#include "softmax_row.h"  // acc_type, Vectorized

namespace pyformer::cpu {

namespace {

constexpr int64_t kChunk = 512;  // elements per step: 3 float buffers of 2 KiB stay in L1

// s = sigmoid(g) = 1 / (1 + exp(-g)): exp(-g) = inf for g < -88 gives s = 0, and then
// silu = g * 0 = -0 (NaN only for g = -inf, as torch's silu).
template <typename acc_t>
inline Vectorized<acc_t> vsigmoid(const Vectorized<acc_t>& g) {
  using Vec = Vectorized<acc_t>;
  return Vec(acc_t(1)) / (Vec(acc_t(1)) + g.neg().exp());
}

template <typename acc_t>
inline acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + std::exp(-g));
}

// Converts n elements of src to acc_t in dst (the identity when scalar_t is acc_t: dst = src).
template <typename scalar_t, typename acc_t>
inline const acc_t* load(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
    return dst;
  }
}

// Writes n elements of the acc_t results in buf (or directly, when the types agree) to dst.
template <typename scalar_t, typename acc_t>
inline acc_t* target(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buf;
  }
}
template <typename scalar_t, typename acc_t>
inline void store(const acc_t* buf, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>)
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
}

template <typename scalar_t>
void swiglu_forward(const scalar_t* gate, const scalar_t* up, scalar_t* out, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t c0, int64_t c1) {
    acc_t gb[kChunk], ub[kChunk], ob[kChunk];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o = c * kChunk, m = std::min(kChunk, n - o);
      const acc_t* g = load(gate + o, gb, m);
      const acc_t* u = load(up + o, ub, m);
      acc_t* y = target(out + o, ob);
      int64_t j = 0;
      for (; j + Vec::size() <= m; j += Vec::size()) {
        const Vec gv = Vec::loadu(g + j);
        (gv * vsigmoid(gv) * Vec::loadu(u + j)).store(y + j);
      }
      for (; j < m; ++j) y[j] = g[j] * sigmoid(g[j]) * u[j];
      store(ob, out + o, m);
    }
  });
}

template <typename scalar_t>
void swiglu_backward(const scalar_t* grad, const scalar_t* gate, const scalar_t* up,
                     scalar_t* dgate, scalar_t* dup, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t c0, int64_t c1) {
    acc_t db[kChunk], gb[kChunk], ub[kChunk], dgb[kChunk], dub[kChunk];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o = c * kChunk, m = std::min(kChunk, n - o);
      const acc_t* d = load(grad + o, db, m);
      const acc_t* g = load(gate + o, gb, m);
      const acc_t* u = load(up + o, ub, m);
      acc_t* dg = target(dgate + o, dgb);
      acc_t* du = target(dup + o, dub);
      const Vec one(acc_t(1));
      int64_t j = 0;
      for (; j + Vec::size() <= m; j += Vec::size()) {
        const Vec dv = Vec::loadu(d + j), gv = Vec::loadu(g + j), uv = Vec::loadu(u + j);
        const Vec s = vsigmoid(gv);
        (dv * uv * s * (one + gv * (one - s))).store(dg + j);
        (dv * gv * s).store(du + j);
      }
      for (; j < m; ++j) {
        const acc_t s = sigmoid(g[j]);
        dg[j] = d[j] * u[j] * s * (acc_t(1) + g[j] * (acc_t(1) - s));
        du[j] = d[j] * g[j] * s;
      }
      store(dgb, dgate + o, m);
      store(dub, dup + o, m);
    }
  });
}

void swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_cpu", [&] {
    swiglu_forward<scalar_t>(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(), gate.numel());
  });
}

void swiglu_bwd_cpu(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                    const at::Tensor& dgate, const at::Tensor& dup) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_backward_cpu", [&] {
        swiglu_backward<scalar_t>(grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                                  up.const_data_ptr<scalar_t>(), dgate.mutable_data_ptr<scalar_t>(),
                                  dup.mutable_data_ptr<scalar_t>(), gate.numel());
      });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(swiglu_fwd, CPU, &swiglu_fwd_cpu);
PYFORMER_REGISTER_KERNEL(swiglu_bwd, CPU, &swiglu_bwd_cpu);

}  // namespace pyformer::cpu
