// attention on the CPU: bmm-based multi-head attention, forward and backward.
//
//   q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv)
//   -> out (B, H, Lq, Dv), probs (B, H, Lq, Lk), keep (B, H, Lq, Lk) bool or (0,) without dropout
//   probs = masked_softmax(scale * q @ k^T + M);  out = (probs * keep / (1 - p)) @ v
//
// Algorithm (forward, float32/float64): heads are split across threads; each head runs
// GEMM -> fused masked softmax -> GEMM while its scores are still in cache (a per-thread (Lq, Lk)
// float buffer, 1 MB at Lq = Lk = 512), so the scores make one trip to memory (the write of
// probs, which backward and need_weights need) instead of the textbook's five. The GEMMs are
// BLAS sgemm/dgemm called directly on each head (resolved at load time from the BLAS that torch
// links; without one, and for float16/bfloat16, the same composition runs as whole-batch ATen
// GEMMs around the same row kernel). With key_lengths, keys past len[b] are skipped by all three
// steps: the GEMMs run on the first len[b] keys only and the softmax writes zeros past them.
// Napkin math: 4 * B * H * Lq * Lk * D flops (times len/Lk with key_lengths); memory: q, k, v and
// out once, probs written once.
// Backward, per head in the same way (float32/float64 with a BLAS; whole-batch ATen GEMMs
// otherwise), around the softmax backward row kernel (softmax_row.h):
//   dP = dout @ v^T (through dropout, + grad_probs), dS = P * (dP - sum(dP * P)),
//   dq = scale * dS @ k, dk = scale * dS^T @ q, dv = P_dropped^T @ dout;
// dP and the dropout stay in a per-thread buffer, probs are read once and dS (dlogits, an output
// of the op) written once. Napkin math: 8 * B * H * Lq * Lk * D flops (four GEMMs).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <dlfcn.h>

#include <climits>
#include <vector>

#include "../pyformer.h"
#include "memory.h"
#include "softmax_row.h"

namespace pyformer::cpu {

at::Tensor masked_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& out, double scale);

namespace {

// ---- BLAS, column-major (Fortran) interface, looked up in the process at first use ------------
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*,
                         double*, const int*);

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  Blas() {
    sgemm = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
  }
};
const Blas& blas() {
  static const Blas b;
  return b;
}

// Row-major C (m x n, ldc) = alpha * op(A) @ op(B), op(X) = X^T when trans_x. A is stored
// (m x k) or, transposed, (k x m) with leading dimension lda; B (k x n) or (n x k) with ldb. In
// the BLAS's column-major terms that is C^T = op(B)^T @ op(A)^T, hence the swapped operands.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* A, int lda,
             const T* B, int ldb, T* C, int ldc) {
  const char tb = trans_b ? 'T' : 'N', ta = trans_a ? 'T' : 'N';
  const T beta = 0;
  if constexpr (std::is_same_v<T, float>) {
    blas().sgemm(&tb, &ta, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
  } else {
    blas().dgemm(&tb, &ta, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
  }
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) return blas().sgemm != nullptr;
  else if constexpr (std::is_same_v<T, double>) return blas().dgemm != nullptr;
  else return false;
}

struct MaskView {
  at::Tensor m;  // the mask as a stride-0 broadcast view of (B, H, Lq, Lk): no copy
  const bool* b = nullptr;
  const void* f = nullptr;
  int64_t stride = 1;
};

// Per-head fused path (float32 / float64 with a BLAS).
template <typename scalar_t>
void attention_fused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     at::Tensor& out, at::Tensor* probs, const at::Tensor& keep,
                     const MaskView& mv, const RowIndex& idx, double scale, bool causal,
                     const int64_t* lens, double dropout_p, double keep_scale) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Dv = v.size(3);
  const scalar_t *Q = q.data_ptr<scalar_t>(), *K = k.data_ptr<scalar_t>(), *V = v.data_ptr<scalar_t>();
  scalar_t* P = probs ? probs->data_ptr<scalar_t>() : nullptr;  // null: probs not wanted
  scalar_t* O = out.data_ptr<scalar_t>();
  const bool* KEEP = dropout_p > 0 ? keep.data_ptr<bool>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end_bh) {
    // Inside this OpenMP region the BLAS (MKL, OpenBLAS built with OpenMP) runs single-threaded.
    std::vector<acc_t> S(Lq * Lk), buf(Lk), pd(KEEP ? Lq * Lk : 0);
    for (int64_t bh = begin; bh < end_bh; ++bh) {
      const int64_t b = bh / H;
      const int64_t len = lens ? lens[b] : Lk;
      const scalar_t* qh = Q + bh * Lq * D;
      const scalar_t* kh = K + bh * Lk * D;
      const scalar_t* vh = V + bh * Lk * Dv;
      scalar_t* ph = P ? P + bh * Lq * Lk : nullptr;
      scalar_t* oh = O + bh * Lq * Dv;
      // S (Lq, len), compact = scale * q_h @ k_h[:len]^T
      if (len > 0 && D > 0) gemm_rm<acc_t>(false, true, Lq, len, D, scale, qh, D, kh, D, S.data(), len);
      else std::fill(S.begin(), S.begin() + Lq * len, acc_t(0));
      // softmax in place in the cached scores, rows of `len` (keys past len are not stored)
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t r = bh * Lq + i;
        RowMask<scalar_t> rm;
        if (mv.m.defined()) {
          const int64_t off = idx.mask_offset(r);
          rm.b = mv.b ? mv.b + off : nullptr;
          rm.f = mv.f ? static_cast<const scalar_t*>(mv.f) + off : nullptr;
          rm.stride = mv.stride;
        }
        acc_t* srow = S.data() + i * len;
        masked_softmax_row<acc_t, acc_t>(srow, srow, len, causal ? std::min(len, i + 1) : len,
                                         acc_t(1), rm, buf.data());
        // probs row: the len values, then zeros. A row that
        // came out NaN (NaN or inf among its unmasked scores) is NaN throughout, as torch.softmax.
        if (!ph) continue;
        if (len > 0 && std::isnan(srow[0]))
          std::fill(ph + i * Lk, ph + (i + 1) * Lk, scalar_t(std::numeric_limits<acc_t>::quiet_NaN()));
        else
          store_scaled<scalar_t, acc_t>(ph + i * Lk, srow, len, Lk, acc_t(1));
      }
      if (len == 0 || Dv == 0) {
        std::fill(oh, oh + Lq * Dv, scalar_t(0));
        continue;
      }
      const acc_t* pv = S.data();
      if (KEEP) {  // dropout: probs * keep / (1 - p), compact
        const bool* kp = KEEP + bh * Lq * Lk;
        for (int64_t i = 0; i < Lq; ++i)
          for (int64_t j = 0; j < len; ++j)
            pd[i * len + j] = kp[i * Lk + j] ? S[i * len + j] * static_cast<acc_t>(keep_scale) : acc_t(0);
        pv = pd.data();
      }
      gemm_rm<acc_t>(false, false, Lq, Dv, len, acc_t(1), pv, len, vh, Dv, oh, Dv);
    }
  });
}

// Per-head fused backward (float32 / float64 with a BLAS): dP, the softmax backward and the
// dropout all happen in a per-thread (Lq, Lk) buffer while it is in cache; only dlogits is
// written out, and probs, keep and grad_probs are read once.
template <typename scalar_t>
void attention_backward_fused(const at::Tensor& g, const at::Tensor* gp, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs,
                              const at::Tensor& keep, double scale, double keep_scale, bool dropped,
                              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dS) {
  using acc_t = acc_type<scalar_t>;
  const int64_t BH = q.size(0) * q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Dv = v.size(3);
  const scalar_t *G = g.data_ptr<scalar_t>(), *Q = q.data_ptr<scalar_t>(), *K = k.data_ptr<scalar_t>();
  const scalar_t *V = v.data_ptr<scalar_t>(), *P = probs.data_ptr<scalar_t>();
  const scalar_t* GP = gp ? gp->data_ptr<scalar_t>() : nullptr;
  const bool* KEEP = dropped ? keep.data_ptr<bool>() : nullptr;
  scalar_t *DQ = dq.data_ptr<scalar_t>(), *DK = dk.data_ptr<scalar_t>(), *DV = dv.data_ptr<scalar_t>();
  scalar_t* DS = dS.data_ptr<scalar_t>();
  const acc_t ks = static_cast<acc_t>(keep_scale);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dP(Lq * Lk), pd(KEEP ? Lq * Lk : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t off = bh * Lq * Lk;
      const scalar_t* gh = G + bh * Lq * Dv;
      const scalar_t* ph = P + off;
      scalar_t* dsh = DS + off;
      // dP = dO @ V^T (Lq, Lk), through dropout, plus the gradient flowing into probs
      if (Dv > 0) gemm_rm<acc_t>(false, true, Lq, Lk, Dv, acc_t(1), gh, Dv, V + bh * Lk * Dv, Dv, dP.data(), Lk);
      else std::fill(dP.begin(), dP.end(), acc_t(0));
      if (KEEP) {
        const bool* kh = KEEP + off;
        for (int64_t e = 0; e < Lq * Lk; ++e) {
          dP[e] = kh[e] ? dP[e] * ks : acc_t(0);
          pd[e] = kh[e] ? ph[e] * ks : acc_t(0);
        }
      }
      if (GP) {
        const scalar_t* gph = GP + off;
        for (int64_t e = 0; e < Lq * Lk; ++e) dP[e] += gph[e];
      }
      // dS = P * (dP - sum(dP * P)), row by row, written out as dlogits
      for (int64_t i = 0; i < Lq; ++i)
        masked_softmax_backward_row<scalar_t>(dP.data() + i * Lk, ph + i * Lk, dsh + i * Lk, Lk, acc_t(1));
      if (D > 0) {
        // dq = scale * dS @ K (Lq, D);  dk = scale * dS^T @ Q (Lk, D)
        gemm_rm<acc_t>(false, false, Lq, D, Lk, static_cast<acc_t>(scale), dsh, Lk, K + bh * Lk * D, D, DQ + bh * Lq * D, D);
        gemm_rm<acc_t>(true, false, Lk, D, Lq, static_cast<acc_t>(scale), dsh, Lk, Q + bh * Lq * D, D, DK + bh * Lk * D, D);
      }
      // dv = P_dropped^T @ dO (Lk, Dv)
      if (Dv > 0) gemm_rm<acc_t>(true, false, Lk, Dv, Lq, acc_t(1), KEEP ? pd.data() : ph, Lk, gh, Dv, DV + bh * Lk * Dv, Dv);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& mask, double scale, bool causal,
    const std::optional<at::Tensor>& key_lengths, double dropout_p, bool need_probs) {
  check_attention(q_, k_, v_, mask, scale, causal, key_lengths, dropout_p);
  const BelowAutograd below_autograd;
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), Dv = v.size(3);
  const bool small = std::max({Lq, Lk, q.size(3), Dv}) < INT_MAX / 2;
  const bool fused = small && ((q.scalar_type() == at::kFloat && have_blas<float>()) ||
                               (q.scalar_type() == at::kDouble && have_blas<double>()));
  // The fused path writes probs only when they are wanted; otherwise a meta tensor stands in
  // for their shape and dtype (the mask's broadcast view and the row index need no storage).
  at::Tensor probs = (fused && !need_probs) ? at::empty({B, H, Lq, Lk}, q.options().device(at::kMeta))
                                            : empty_output({B, H, Lq, Lk}, q.options());
  at::Tensor out = empty_output({B, H, Lq, Dv}, q.options());
  at::Tensor keep = dropout_p > 0 ? at::rand({B, H, Lq, Lk}, q.options().dtype(at::kFloat)) < (1.0 - dropout_p)
                                  : at::empty({0}, q.options().dtype(at::kBool));
  const double keep_scale = dropout_p < 1 ? 1.0 / (1.0 - dropout_p) : 0.0;
  auto result = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    return {out, need_probs ? probs : at::empty({0}, q.options()), keep};
  };
  if (B * H * Lq == 0) return result();
  at::Tensor kl;
  if (key_lengths) kl = key_lengths->to(at::kLong).contiguous();
  const int64_t* lens = key_lengths ? kl.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cpu", [&] {
    constexpr bool blas_type = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
    if constexpr (blas_type) if (fused) {
      MaskView mv;
      if (mask) {
        mv.m = mask_for_kernel(*mask, probs).expand(probs.sizes());
        if (mv.m.scalar_type() == at::kBool) mv.b = mv.m.data_ptr<bool>();
        else mv.f = mv.m.data_ptr<scalar_t>();
        mv.stride = mv.m.stride(-1);
      }
      const RowIndex idx(probs, mask ? &mv.m : nullptr);
      attention_fused<scalar_t>(q, k, v, out, need_probs ? &probs : nullptr, keep, mv, idx, scale,
                                causal, lens, dropout_p, keep_scale);
      return;
    }
    {  // whole-batch composition: GEMM, the same fused softmax rows, GEMM
      at::Tensor s = at::empty({B * H, Lq, Lk}, q.options());
      const int64_t D = q.size(3);
      at::baddbmm_out(s, s, q.view({B * H, Lq, D}), k.view({B * H, Lk, D}).transpose(1, 2), 0, scale);
      masked_softmax_rows<scalar_t>(s.view(probs.sizes()), probs, mask ? &*mask : nullptr, 1.0, causal,
                                    key_lengths ? &*key_lengths : nullptr);
      const at::Tensor pd = dropout_p > 0 ? probs * keep * keep_scale : probs;
      at::Tensor out3 = out.view({B * H, Lq, Dv});
      at::bmm_out(out3, pd.view({B * H, Lq, Lk}), v.view({B * H, Lk, Dv}));
    }
  });
  return result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_probs, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs, const at::Tensor& keep,
    double scale, double dropout_p) {
  check_attention_backward(grad_out, grad_probs, q, k, v, probs, keep, scale, dropout_p);
  const BelowAutograd below_autograd;
  const bool dropped = dropout_p > 0;
  const double keep_scale = dropout_p < 1 ? 1.0 / (1.0 - dropout_p) : 0.0;
  const int64_t BH = q.size(0) * q.size(1), Lq = q.size(2), Lk = k.size(2);
  const bool small = std::max({Lq, Lk, q.size(3), v.size(3)}) < INT_MAX / 2;
  if (BH * Lq * Lk > 0 && small && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble)) {
    const at::Tensor g = grad_out.contiguous(), qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor pc = probs.contiguous(), kp = dropped ? keep.contiguous() : keep;
    const at::Tensor gp = grad_probs ? grad_probs->contiguous() : at::Tensor();
    at::Tensor dq = empty_output_like(qc), dk = empty_output_like(kc), dv = empty_output_like(vc),
               dS = empty_output_like(pc);
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward_cpu", [&] {
      if (have_blas<scalar_t>()) {
        attention_backward_fused<scalar_t>(g, grad_probs ? &gp : nullptr, qc, kc, vc, pc, kp, scale,
                                           keep_scale, dropped, dq, dk, dv, dS);
        done = true;
      }
    });
    if (done) return {dq, dk, dv, dS};
  }
  // whole-batch composition (float16/bfloat16, or without a BLAS)
  auto bh3 = [](const at::Tensor& t) { return t.reshape({t.size(0) * t.size(1), t.size(-2), t.size(-1)}); };
  const at::Tensor g = bh3(grad_out), v3 = bh3(v), q3 = bh3(q), k3 = bh3(k);
  at::Tensor dP = at::bmm(g, v3.transpose(1, 2)).view(probs.sizes());
  if (dropped) dP.mul_(keep).mul_(keep_scale);
  if (grad_probs) dP.add_(*grad_probs);
  at::Tensor dS = masked_softmax_backward_cpu(dP, probs, 1.0);
  const at::Tensor dS3 = bh3(dS);
  at::Tensor dq = at::empty_like(q3), dk = at::empty_like(k3);
  at::baddbmm_out(dq, dq, dS3, k3, 0, scale);
  at::baddbmm_out(dk, dk, dS3.transpose(1, 2), q3, 0, scale);
  const at::Tensor Pd = dropped ? probs * keep * keep_scale : probs;
  at::Tensor dv = at::bmm(bh3(Pd).transpose(1, 2), g);
  return {dq.view(q.sizes()), dk.view(k.sizes()), dv.view(v.sizes()), dS};
}

TORCH_LIBRARY_IMPL(pyformer, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace pyformer::cpu
