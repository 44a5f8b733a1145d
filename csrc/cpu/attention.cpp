// attention on the CPU: the fused per-head kernels behind kernels::attention_fwd / _bwd.
//
//   q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> out (B, H, Lq, Dv), probs (B, H, Lq, Lk)
//   probs = masked_softmax(scale * q @ k^T + M);  out = (probs * keep * keep_scale) @ v
//
// Algorithm (forward, float32/float64): heads are split across threads; each head runs
// GEMM -> fused masked softmax -> GEMM while its scores are still in cache (a per-thread (Lq, Lk)
// float buffer, 1 MB at Lq = Lk = 512), so the scores make one trip to memory (the write of
// probs, which backward and need_weights need; none at all when probs are not wanted) instead of
// the textbook's five. With key_lengths, keys past len[b] are skipped by all three steps: the
// GEMMs run on the first len[b] keys only and the softmax writes zeros past them (the second GEMM
// reads all Lk value rows when one past len[b] is not finite, so that 0 * NaN is NaN there as in
// the reference). float16 and
// bfloat16 are declined (return false): the host's composition of batched ATen GEMMs around the
// same softmax row kernel runs them.
// Napkin math: 4 * B * H * Lq * Lk * D flops (times len/Lk with key_lengths); memory: q, k, v and
// out once, probs written once.
// Backward, per head in the same way, around the softmax backward row kernel (softmax_row.h):
//   dP = dout @ v^T (through dropout, + grad_probs), dS = P * (dP - sum(dP * P)),
//   dq = scale * dS @ k, dk = scale * dS^T @ q, dv = P_dropped^T @ dout;
// dP and the dropout stay in a per-thread buffer, probs are read once and dS (dlogits, an output
// of the op) written once. Napkin math: 8 * B * H * Lq * Lk * D flops (four GEMMs).
//
// The GEMMs are the BLAS's sgemm/dgemm called directly on each head's pointers (blas.h).
//
// The dropout keep mask (kernels::dropout_keep) of csrc/philox.h, for the bmm algorithm: chunks of
// elements in parallel, each element's word from its own index, so the mask does not depend on
// the thread count. Napkin math: one Philox4x32-10 per 4 elements, 1 byte written per element.
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "../kernels.h"
#include "blas.h"
#include "softmax_row.h"

namespace pyformer::cpu {
namespace {

// Per-head fused path (float32 / float64 with a BLAS).
template <typename scalar_t>
void attention_fused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& probs, const at::Tensor& keep,
                     const MaskLayout& m, double scale, double keep_scale) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Dv = v.size(3);
  const int64_t BH = q.size(0) * H;
  const scalar_t *Q = q.const_data_ptr<scalar_t>(), *K = k.const_data_ptr<scalar_t>(),
                 *V = v.const_data_ptr<scalar_t>();
  scalar_t* P = probs.defined() ? probs.mutable_data_ptr<scalar_t>() : nullptr;  // null: not wanted
  scalar_t* O = out.mutable_data_ptr<scalar_t>();
  const bool* KEEP = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end_bh) {
    // Inside this OpenMP region the BLAS (MKL, OpenBLAS built with OpenMP) runs single-threaded.
    std::vector<acc_t> S(Lq * Lk), buf(Lk), pd;
    for (int64_t bh = begin; bh < end_bh; ++bh) {
      // the keys that any row of this head may read: key_lengths' limit (rows differ only by
      // their causal limit, applied per row below)
      const int64_t len = m.klen ? std::min<int64_t>(Lk, m.klen[m.batch(bh * Lq)]) : Lk;
      const scalar_t* qh = Q + bh * Lq * D;
      const scalar_t* kh = K + bh * Lk * D;
      const scalar_t* vh = V + bh * Lk * Dv;
      scalar_t* ph = P ? P + bh * Lq * Lk : nullptr;
      scalar_t* oh = O + bh * Lq * Dv;
      // S (Lq, len), compact = scale * q_h @ k_h[:len]^T
      if (len > 0 && D > 0)
        gemm_rm<acc_t>(false, true, Lq, len, D, scale, qh, D, kh, D, S.data(), len);
      else
        std::fill(S.begin(), S.begin() + Lq * len, acc_t(0));
      // softmax in place in the cached scores, rows of `len` (keys past len are not stored)
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t r = bh * Lq + i;
        acc_t* srow = S.data() + i * len;
        masked_softmax_row<acc_t, acc_t>(srow, srow, len, m.limit(r, len), acc_t(1),
                                         row_mask<scalar_t>(m, r), buf.data());
        // probs row: the len values, then zeros (the masked keys, also in a NaN row)
        if (ph) store_scaled<scalar_t, acc_t>(ph + i * Lk, srow, len, Lk, acc_t(1));
      }
      if (Dv == 0) continue;
      // The keys past len have probability 0, and out = probs @ v multiplies that 0 by their
      // value rows: a NaN or inf there gives NaN (0 * inf), as in the reference (docs/ops.md). So
      // the product skips them only when their value rows are finite, which one read of those
      // rows settles; otherwise it runs over all Lk keys with the zeros spelled out.
      const int64_t n = all_finite(vh + len * Dv, (Lk - len) * Dv) ? len : Lk;
      if (n == 0) {
        std::fill(oh, oh + Lq * Dv, scalar_t(0));
        continue;
      }
      const acc_t* pv = S.data();
      if (KEEP || n > len) {
        pd.resize(Lq * Lk);  // probs * keep / (1 - p) (a multiply: NaN * 0 is NaN), n wide
        const bool* kp = KEEP ? KEEP + bh * Lq * Lk : nullptr;
        const acc_t ks = static_cast<acc_t>(keep_scale);
        for (int64_t i = 0; i < Lq; ++i) {
          for (int64_t j = 0; j < len; ++j)
            pd[i * n + j] =
                KEEP ? S[i * len + j] * (kp[i * Lk + j] ? ks : acc_t(0)) : S[i * len + j];
          std::fill(pd.begin() + i * n + len, pd.begin() + (i + 1) * n, acc_t(0));
        }
        pv = pd.data();
      }
      gemm_rm<acc_t>(false, false, Lq, Dv, n, acc_t(1), pv, n, vh, Dv, oh, Dv);
    }
  });
}

// Per-head fused backward (float32 / float64 with a BLAS): dP, the softmax backward and the
// dropout all happen in a per-thread (Lq, Lk) buffer while it is in cache; only dlogits is
// written out, and probs, keep and grad_probs are read once.
template <typename scalar_t>
void attention_backward_fused(const at::Tensor& g, const at::Tensor& gp, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs,
                              const at::Tensor& keep, double scale, double keep_scale,
                              const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                              const at::Tensor& dS) {
  using acc_t = acc_type<scalar_t>;
  const int64_t BH = q.size(0) * q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2),
                Dv = v.size(3);
  const scalar_t *G = g.const_data_ptr<scalar_t>(), *Q = q.const_data_ptr<scalar_t>(),
                 *K = k.const_data_ptr<scalar_t>();
  const scalar_t *V = v.const_data_ptr<scalar_t>(), *P = probs.const_data_ptr<scalar_t>();
  const scalar_t* GP = gp.defined() ? gp.const_data_ptr<scalar_t>() : nullptr;
  const bool* KEEP = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  scalar_t *DQ = dq.mutable_data_ptr<scalar_t>(), *DK = dk.mutable_data_ptr<scalar_t>(),
           *DV = dv.mutable_data_ptr<scalar_t>();
  scalar_t* DS = dS.mutable_data_ptr<scalar_t>();
  const acc_t ks = static_cast<acc_t>(keep_scale);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dP(Lq * Lk), pd(KEEP ? Lq * Lk : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t off = bh * Lq * Lk;
      const scalar_t* gh = G + bh * Lq * Dv;
      const scalar_t* ph = P + off;
      scalar_t* dsh = DS + off;
      // dP = dO @ V^T (Lq, Lk), through dropout, plus the gradient flowing into probs
      if (Dv > 0)
        gemm_rm<acc_t>(false, true, Lq, Lk, Dv, acc_t(1), gh, Dv, V + bh * Lk * Dv, Dv, dP.data(),
                       Lk);
      else
        std::fill(dP.begin(), dP.end(), acc_t(0));
      if (KEEP) {
        const bool* kh = KEEP + off;
        for (int64_t e = 0; e < Lq * Lk; ++e) {
          // a multiply, not a select: a dropped NaN stays NaN, as in probs * keep * keep_scale
          dP[e] = dP[e] * (kh[e] ? ks : acc_t(0));
          pd[e] = ph[e] * (kh[e] ? ks : acc_t(0));
        }
      }
      if (GP) {
        const scalar_t* gph = GP + off;
        for (int64_t e = 0; e < Lq * Lk; ++e) dP[e] += gph[e];
      }
      // dS = P * (dP - sum(dP * P)), row by row, written out as dlogits
      for (int64_t i = 0; i < Lq; ++i)
        masked_softmax_backward_row<scalar_t>(dP.data() + i * Lk, ph + i * Lk, dsh + i * Lk, Lk,
                                              acc_t(1));
      if (D > 0) {
        // dq = scale * dS @ K (Lq, D);  dk = scale * dS^T @ Q (Lk, D)
        gemm_rm<acc_t>(false, false, Lq, D, Lk, static_cast<acc_t>(scale), dsh, Lk, K + bh * Lk * D,
                       D, DQ + bh * Lq * D, D);
        gemm_rm<acc_t>(true, false, Lk, D, Lq, static_cast<acc_t>(scale), dsh, Lk, Q + bh * Lq * D,
                       D, DK + bh * Lk * D, D);
      }
      // dv = P_dropped^T @ dO (Lk, Dv)
      if (Dv > 0)
        gemm_rm<acc_t>(true, false, Lk, Dv, Lq, acc_t(1), KEEP ? pd.data() : ph, Lk, gh, Dv,
                       DV + bh * Lk * Dv, Dv);
    }
  });
}

// Whether the fused kernels take these inputs: float32/float64 with a BLAS, sizes within the
// BLAS's int.
bool fused_takes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const bool small = std::max({q.size(2), k.size(2), q.size(3), v.size(3)}) < INT_MAX / 2;
  return small && ((q.scalar_type() == at::kFloat && have_blas<float>()) ||
                   (q.scalar_type() == at::kDouble && have_blas<double>()));
}

bool attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& probs, const at::Tensor& keep,
                       const MaskLayout& mask, double scale, double keep_scale) {
  if (!fused_takes(q, k, v)) return false;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_cpu", [&] {
    attention_fused<scalar_t>(q, k, v, out, probs, keep, mask, scale, keep_scale);
  });
  return true;
}

bool attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& grad_probs,
                       const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& probs, const at::Tensor& keep, double scale,
                       double keep_scale, const at::Tensor& dq, const at::Tensor& dk,
                       const at::Tensor& dv, const at::Tensor& dlogits) {
  if (!fused_takes(q, k, v)) return false;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward_cpu", [&] {
    attention_backward_fused<scalar_t>(grad_out, grad_probs, q, k, v, probs, keep, scale,
                                       keep_scale, dq, dk, dv, dlogits);
  });
  return true;
}

void dropout_keep_cpu(const at::Tensor& keep, const Dropout& drop) {
  bool* out = keep.mutable_data_ptr<bool>();
  const uint64_t threshold = dropout_threshold(drop.p);
  constexpr int64_t kChunk = 1 << 16;  // a multiple of 4: each Philox block in one chunk
  at::parallel_for(0, (keep.numel() + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e0 = c * kChunk, n = std::min(kChunk, keep.numel() - e0);
      dropout_factors(static_cast<uint64_t>(e0), n, drop.seed, threshold, true, out + e0);
    }
  });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(attention_fwd, CPU, &attention_fwd_cpu);
PYFORMER_REGISTER_KERNEL(dropout_keep, CPU, &dropout_keep_cpu);
PYFORMER_REGISTER_KERNEL(attention_bwd, CPU, &attention_bwd_cpu);

}  // namespace pyformer::cpu
