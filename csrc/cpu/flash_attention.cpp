// Flash attention on the CPU, forward and backward: kernels::attention_flash_fwd / _bwd.
//
//   q (B, H_kv, G * Lq, D), k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv), contiguous: the query side
//   grouped by kv head (csrc/host/attention.cpp, grouped), so one kv head serves G * Lq rows
//   -> out (B, H_kv, G * Lq, Dv), and lse (B, H_kv, G * Lq) in the accumulation type (float32;
//      float64 for float64) when asked for
//   out = (softmax(scale * q @ k^T + M) * Z) @ v,  lse = log(sum_j exp(scale * q k_j + M_j)) per
//   row, Z the dropout factors (0 or 1 / (1 - p); 1 without dropout)
//
// Algorithm (FlashAttention's, on BLAS GEMMs): the rows of a head are cut into query blocks of
// kBlockQ, the keys into key blocks of kBlockK. A task (batch, kv head, query block) keeps a
// running max m, sum l and unnormalized output O (kBlockQ x Dv, float) per row and, for each key
// block: S = scale * Q_blk @ K_blk^T (GEMM), the mask applied in place (the row kernels of
// softmax_row.h: bool, additive, causal and key_lengths limits), the block's row max m', the
// rescale O *= exp(m - m'), l = l * exp(m - m') + sum exp(S - m'), then O += exp(S - m') @ V_blk
// (GEMM, beta = 1), with dropout's factors (0 or 1 / (1 - p), csrc/philox.h: the element's
// (B, H, Lq, Lk) index, so any blocking draws the same) applied to exp(S - m') after the sum and
// before the product. Key blocks at or past the largest limit of the block's rows (causal, key
// lengths) are skipped. The scores never leave a kBlockQ x kBlockK buffer: memory is O(L), not
// O(Lq * Lk). bfloat16 goes through the BLAS's mixed-precision GEMM where torch's BLAS has it and
// the CPU computes in bfloat16 (MKL on AMX / AVX512-BF16: blas.h), reading q, k, v in place, with
// the probabilities rounded to bfloat16 for P @ V as in the composition (float accumulation; the
// running max, sum, O and lse stay float); elsewhere, and for float16, the blocks are converted to
// float on the way in.
//
// Parallelism: tasks over (batch, kv head, query block); when there are fewer tasks than twice the
// threads (decode: one query row against a long cache), each task's keys are split into chunks
// run as tasks of their own, whose partial (m, l, O) are merged exactly afterwards
// (flash-decoding). The split depends only on the sizes and the thread count, and the merge runs
// in a fixed order: results are bitwise reproducible at a fixed thread count.
//
// The edges are the composition's (docs/ops.md): a row whose every key is masked gives zeros (lse
// -inf); NaN or +inf among a row's unmasked scores, or every unmasked score -inf, gives NaN; a
// masked key's probability is 0 and multiplies its value row (and, in dq, its key row) in IEEE
// arithmetic, so the keys past the skipped limit are read when one of their rows is not finite.
//
// Backward (Flash::backward): per kv head, P recomputed from lse block by block and the dropout
// factors regenerated; see there.
//
// Napkin math: 4 * B * H * Lq * Lk_eff * D flops (backward: 10, five GEMMs per block) (Lk_eff: the
// keys not skipped; about half of Lk with causal masking); memory: q and out once, k and v once per
// query block (from L2/L3 for short heads), nothing of size Lq x Lk.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../kernels.h"
#include "blas.h"
#include "softmax_row.h"

namespace pyformer::cpu {
namespace {

constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

// The running state of the rows of one query block over a range of keys.
template <typename acc_t>
struct RowState {
  std::vector<acc_t> m, l, o;  // per row: max, sum; O (rows x Dv)
  std::vector<int64_t> count;  // unmasked keys seen per row
  void reset(int64_t rows, int64_t dv) {
    m.assign(rows, -std::numeric_limits<acc_t>::infinity());
    l.assign(rows, acc_t(0));
    o.assign(rows * dv, acc_t(0));
    count.assign(rows, 0);
  }
};

// x[0, n) *= z[0, n) (the dropout factors).
template <typename acc_t>
void scale_row(acc_t* x, const acc_t* z, int64_t n) {
  using Vec = Vectorized<acc_t>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size())
    (Vec::loadu(x + j) * Vec::loadu(z + j)).store(x + j);
  for (; j < n; ++j) x[j] *= z[j];
}

// Apply row `row`'s mask to the block buf[0:n] (keys kb .. kb + n), in place, -inf where masked;
// returns the number of unmasked keys.
template <typename scalar_t, typename acc_t>
int64_t mask_block(acc_t* buf, int64_t n, int64_t kb, int64_t lim, RowMask<scalar_t> rm) {
  const int64_t end = std::clamp<int64_t>(lim - kb, 0, n);
  int64_t count;
  if (rm.b) {
    rm.b += kb * rm.stride;
    count = rm.stride == 1 ? scale_mask_row<1, true, scalar_t>(buf, buf, end, acc_t(1), rm)
                           : scale_mask_row<1, false, scalar_t>(buf, buf, end, acc_t(1), rm);
  } else if (rm.f) {
    rm.f += kb * rm.stride;
    count = rm.stride == 1 ? scale_mask_row<2, true, scalar_t>(buf, buf, end, acc_t(1), rm)
                           : scale_mask_row<2, false, scalar_t>(buf, buf, end, acc_t(1), rm);
  } else {
    count = end;
  }
  std::fill(buf + end, buf + n, -std::numeric_limits<acc_t>::infinity());
  return count;
}

template <typename scalar_t>
struct Flash {
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;

  const scalar_t *Q, *K, *V;
  scalar_t* O;
  acc_type<scalar_t>* LSE;
  const MaskLayout& m;
  int64_t BH, R, Lk, D, Dv;  // R = G * Lq rows per kv head
  acc_t scale;
  Dropout drop;        // dropout, when on: its factors multiply P on the way to V
  uint64_t threshold;  // dropout_threshold(drop.p)
  acc_t keep_scale;    // 1 / (1 - p)
  // bfloat16 through the BLAS's mixed-precision GEMM (blas.h, half_gemm): q, k and v are read in
  // place, and the forward rounds the probabilities to the dtype for P @ V (float accumulation).
  // Otherwise half types are converted to float block by block.
  bool half = false;

  // The kernel over q (B, H_kv, R, D), k, v of the op, writing out (and lse when not null).
  static Flash of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, scalar_t* out,
                  acc_t* lse, const MaskLayout& mask, double scale, const Dropout& drop) {
    Flash f{q.const_data_ptr<scalar_t>(),
            k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(),
            out,
            lse,
            mask,
            q.size(0) * q.size(1),
            q.size(2),
            k.size(2),
            q.size(3),
            v.size(3),
            static_cast<acc_t>(scale),
            drop,
            dropout_threshold(drop.p),
            static_cast<acc_t>(dropout_keep_scale(drop.p))};
    f.half = half_gemm<scalar_t>() != nullptr;
    return f;
  }

  // Keys [kb, kb + n) of one head's k and v (rows kh, vh) as acc_t: in place, or converted into
  // the buffers bk, bv (float16/bfloat16).
  std::pair<const acc_t*, const acc_t*> kv_block(const scalar_t* kh, const scalar_t* vh, int64_t kb,
                                                 int64_t n, std::vector<acc_t>& bk,
                                                 std::vector<acc_t>& bv) const {
    if constexpr (kConvert) {
      bk.resize(n * D), bv.resize(n * Dv);
      for (int64_t e = 0; e < n * D; ++e) bk[e] = static_cast<acc_t>(kh[kb * D + e]);
      for (int64_t e = 0; e < n * Dv; ++e) bv[e] = static_cast<acc_t>(vh[kb * Dv + e]);
      return {bk.data(), bv.data()};
    } else {
      return {kh + kb * D, vh + kb * Dv};
    }
  }

  // Every block GEMM of the forward and the backward: row-major C (acc_t) = alpha * op(A) @ op(B)
  // + beta * C, each operand given in the dtype (ah, bh) and as acc_t (aa, ba; null when half):
  // the mixed-precision GEMM on the dtype's (half), else the BLAS's on acc_t. The forward and the
  // backward compute S through here alike, so that the backward's S is the forward's, bit for bit.
  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, acc_t alpha, const scalar_t* ah,
            const acc_t* aa, int64_t lda, const scalar_t* bh, const acc_t* ba, int64_t ldb,
            acc_t* C, int64_t ldc, acc_t beta) const {
    if constexpr (kConvert) {
      if (half)
        return gemm_rm_half<scalar_t>(ta, tb, m, n, k, alpha, ah, lda, bh, ldb, C, ldc, beta);
    }
    gemm_rm<acc_t>(ta, tb, m, n, k, alpha, aa, lda, ba, ldb, C, ldc, beta);
  }

  // x[0, n) rounded to the dtype into buf, for the mixed-precision GEMM (half); null otherwise.
  const scalar_t* in_dtype(const acc_t* x, int64_t n, std::vector<scalar_t>& buf) const {
    if (!half) return nullptr;
    buf.resize(n);
    for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<scalar_t>(x[e]);
    return buf.data();
  }

  // Row `row`'s dropout factors for keys [kb, kb + n) into z.
  void dropout_row(int64_t row, int64_t kb, int64_t n, acc_t* z) const {
    dropout_factors(static_cast<uint64_t>(row * Lk + kb), n, drop.seed, threshold, keep_scale, z);
  }

  // Per-thread buffers.
  struct Work {
    std::vector<acc_t> s, q, k, v, z;
    std::vector<scalar_t> p;  // the probabilities in the dtype (half)
  };

  // Rows [r0, r0 + nr) of head bh, keys [k0, k1): the running state, from `st` as it is.
  void run(int64_t bh, int64_t r0, int64_t nr, int64_t k0, int64_t k1, RowState<acc_t>& st,
           Work& w) const {
    const scalar_t* kh = K + bh * Lk * D;
    const scalar_t* vh = V + bh * Lk * Dv;
    const scalar_t* qh = Q + (bh * R + r0) * D;
    const acc_t* qb = nullptr;
    if constexpr (kConvert) {
      if (!half) {
        w.q.resize(nr * D);
        for (int64_t e = 0; e < nr * D; ++e) w.q[e] = static_cast<acc_t>(qh[e]);
        qb = w.q.data();
      }
    } else {
      qb = qh;
    }
    w.s.resize(nr * std::min(kBlockK, Lk));  // no larger than the call needs: tiny calls stay cheap
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t kb = k0; kb < k1; kb += kBlockK) {
      const int64_t n = std::min(kBlockK, k1 - kb);
      const acc_t *kp = nullptr, *vp = nullptr;
      if (!half) std::tie(kp, vp) = kv_block(kh, vh, kb, n, w.k, w.v);
      acc_t* S = w.s.data();
      gemm(false, true, nr, n, D, scale, qh, qb, D, kh + kb * D, kp, D, S, n, acc_t(0));
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t row = bh * R + r0 + i;
        acc_t* srow = S + i * n;
        const int64_t c =
            mask_block<scalar_t>(srow, n, kb, m.limit(row, Lk), row_mask<scalar_t>(m, row));
        st.count[i] += c;
        const acc_t mb = row_max(srow, n);
        const acc_t mo = st.m[i];
        const acc_t mn = (std::isnan(mb) || mb > mo) ? mb : mo;
        acc_t* orow = st.o.data() + i * Dv;
        if (mn == ninf) {  // nothing unmasked and finite yet: this block adds 0 * v
          std::fill(srow, srow + n, acc_t(0));
          continue;
        }
        // mo == -inf: alpha 0 (O holds only 0 * v terms: 0, or NaN that must stay NaN)
        const acc_t alpha = mo == ninf ? acc_t(0) : std::exp(mo - mn);
        const acc_t sum = exp_sum_row(srow, n, mn);
        st.l[i] = st.l[i] * alpha + sum;
        st.m[i] = mn;
        if (alpha != acc_t(1))
          for (int64_t d = 0; d < Dv; ++d) orow[d] *= alpha;
        if (drop.on()) {  // l sums the probabilities before dropout; only P @ V is dropped
          w.z.resize(n);
          dropout_row(row, kb, n, w.z.data());
          scale_row(srow, w.z.data(), n);
        }
      }
      const scalar_t* P = in_dtype(S, nr * n, w.p);
      gemm(false, false, nr, Dv, n, acc_t(1), P, S, n, vh + kb * Dv, vp, Dv, st.o.data(), Dv,
           acc_t(1));
    }
  }

  // The key range of each query block of head bh, kends[b] for the block of rows [b * kBlockQ,
  // ...): [0, kend), kend the largest limit among its rows, or Lk when a key or value row past it
  // is not finite: its 0 * NaN reaches the output (a value) or dq (a key), as in the reference.
  // One scan of the head's keys past the smallest of the limits serves every block.
  void key_ends(int64_t bh, std::vector<int64_t>& kends) const {
    kends.resize((R + kBlockQ - 1) / kBlockQ);
    int64_t lo = Lk;
    for (size_t b = 0; b < kends.size(); ++b) {
      const int64_t r0 = static_cast<int64_t>(b) * kBlockQ, nr = std::min(kBlockQ, R - r0);
      int64_t kend = 0;
      for (int64_t i = 0; i < nr; ++i) kend = std::max(kend, m.limit(bh * R + r0 + i, Lk));
      kends[b] = kend, lo = std::min(lo, kend);
    }
    int64_t bad = -1;  // the last key row at or past lo that is not finite
    const bool finite = lo >= Lk || (all_finite(K + (bh * Lk + lo) * D, (Lk - lo) * D) &&
                                     all_finite(V + (bh * Lk + lo) * Dv, (Lk - lo) * Dv));
    for (int64_t j = Lk - 1; !finite && j >= lo && bad < 0; --j)  // rare: find the row
      if (!all_finite(K + (bh * Lk + j) * D, D) || !all_finite(V + (bh * Lk + j) * Dv, Dv)) bad = j;
    for (int64_t& kend : kends)
      if (bad >= kend) kend = Lk;
  }

  // out and lse of the rows from their final state.
  void finish(int64_t bh, int64_t r0, int64_t nr, const RowState<acc_t>& st) const {
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t row = bh * R + r0 + i;
      scalar_t* out = O + row * Dv;
      const acc_t* o = st.o.data() + i * Dv;
      acc_t lse;
      if (st.count[i] == 0) {  // fully masked: zeros (or the NaN of 0 * NaN value rows)
        for (int64_t d = 0; d < Dv; ++d) out[d] = static_cast<scalar_t>(o[d]);
        lse = ninf;
      } else if (st.m[i] == ninf) {  // every unmasked score -inf: NaN, as torch.softmax
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        for (int64_t d = 0; d < Dv; ++d) out[d] = static_cast<scalar_t>(nan);
        lse = nan;
      } else {
        const acc_t inv = acc_t(1) / st.l[i];
        for (int64_t d = 0; d < Dv; ++d) out[d] = static_cast<scalar_t>(o[d] * inv);
        lse = st.m[i] + std::log(st.l[i]);
      }
      if (LSE) LSE[row] = lse;
    }
  }

  // ---- backward ------------------------------------------------------------------------------
  // Head bh's dq, dk, dv from dout and the forward's out and lse (FlashAttention-2): for each key
  // block, over the query blocks whose rows reach it, P = exp(S - lse) is recomputed and
  //   dV += (P Z)^T dO,  dP = Z dO V^T,  dS = P * (dP - delta),  dQ += scale dS K,
  //   dK += scale dS^T Q,
  // with Z the forward's dropout factors (regenerated; 1 without dropout), delta = rowsum(dO *
  // out) - grad_lse (the gradient flowing into lse, when given: d lse /
  // d S = P). dS is exactly 0 where P is 0 (a masked key), grad_lse where P is 1. The task owns
  // every row and key of its kv head, so nothing is shared between threads and no sum races.
  // With the mixed-precision GEMM (half), P and dS are rounded to the dtype for the GEMMs they
  // feed, as FlashAttention does on GPUs; dS itself, the accumulators and delta stay float.
  struct BwdWork {
    std::vector<acc_t> s, dp, q, go, k, v, dq, dk, dv, delta, z, pz;
    std::vector<scalar_t> ph;  // P, then dS, in the dtype (half)
    std::vector<int64_t> kend;
  };

  // DL (rows x Lk), when not null, receives dS, the gradient w.r.t. the logits (for a mask that
  // requires grad), at the keys each row reaches; the host has zeroed the rest.
  // Returns false, leaving the gradients unwritten, when a row's delta is not finite: an output
  // (or its gradient) holding NaN/inf, whose rule the probabilities carry (docs/ops.md); the host
  // then runs the bmm backward.
  bool backward(int64_t bh, const scalar_t* GO, const acc_t* lse, const acc_t* GL, scalar_t* DQ,
                scalar_t* DK, scalar_t* DV, scalar_t* DL, BwdWork& w) const {
    using Vec = Vectorized<acc_t>;
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const scalar_t* qh = Q + bh * R * D;
    const scalar_t* goh = GO + bh * R * Dv;
    const scalar_t* oh = O + bh * R * Dv;
    const scalar_t* kh = K + bh * Lk * D;
    const scalar_t* vh = V + bh * Lk * Dv;
    const acc_t* lh = lse + bh * R;
    // q and dO as acc_t (converted, for half types without the mixed-precision GEMM); with it
    // (half) the GEMMs read q, k, v and dO in place and take P and dS rounded to the dtype
    const acc_t *qa = nullptr, *goa = nullptr;
    if constexpr (kConvert) {
      if (!half) {
        w.q.resize(R * D), w.go.resize(R * Dv);
        for (int64_t e = 0; e < R * D; ++e) w.q[e] = static_cast<acc_t>(qh[e]);
        for (int64_t e = 0; e < R * Dv; ++e) w.go[e] = static_cast<acc_t>(goh[e]);
        qa = w.q.data(), goa = w.go.data();
      }
    } else {
      qa = qh, goa = goh;
    }
    w.delta.assign(R, acc_t(0));
    for (int64_t r = 0; r < R; ++r) {
      acc_t d = 0;
      for (int64_t c = 0; c < Dv; ++c)
        d += static_cast<acc_t>(goh[r * Dv + c]) * static_cast<acc_t>(oh[r * Dv + c]);
      // d lse / d S = P: dS = P * (dP - delta + grad_lse); a fully masked row has none
      if (GL && lh[r] != ninf) d -= GL[bh * R + r];
      if (!std::isfinite(d)) return false;
      w.delta[r] = d;
    }
    w.dq.assign(R * D, acc_t(0));
    std::vector<int64_t>& kends = w.kend;
    key_ends(bh, kends);
    const int64_t bq = std::min(kBlockQ, R), bk = std::min(kBlockK, Lk);
    w.s.resize(bq * bk), w.dp.resize(bq * bk), w.dk.resize(bk * D), w.dv.resize(bk * Dv);
    for (int64_t kb = 0; kb < Lk; kb += kBlockK) {
      const int64_t n = std::min(kBlockK, Lk - kb);
      const acc_t *kp = nullptr, *vp = nullptr;
      if (!half) std::tie(kp, vp) = kv_block(kh, vh, kb, n, w.k, w.v);
      std::fill(w.dk.begin(), w.dk.begin() + n * D, acc_t(0));
      std::fill(w.dv.begin(), w.dv.begin() + n * Dv, acc_t(0));
      for (int64_t r0 = 0; r0 < R; r0 += kBlockQ) {
        const int64_t nr = std::min(kBlockQ, R - r0);
        // the forward's key range of this query block, so that S is recomputed by GEMMs of the
        // same shapes, bit for bit (a row with one key then has P exactly 1, and dS exactly
        // grad_lse: 0 without it)
        const int64_t kend = kends[r0 / kBlockQ];
        if (kend <= kb) continue;
        const int64_t nq = std::min(kBlockK, kend - kb);
        acc_t* S = w.s.data();
        acc_t* dP = w.dp.data();
        const acc_t* qab = qa ? qa + r0 * D : nullptr;
        const acc_t* gob = goa ? goa + r0 * Dv : nullptr;
        gemm(false, true, nr, nq, D, scale, qh + r0 * D, qab, D, kh + kb * D, kp, D, S, nq,
             acc_t(0));
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t row = bh * R + r0 + i;
          acc_t* srow = S + i * nq;
          mask_block<scalar_t>(srow, nq, kb, m.limit(row, Lk), row_mask<scalar_t>(m, row));
          const acc_t l = lh[r0 + i];
          if (l == ninf) {  // a fully masked row: no gradient
            std::fill(srow, srow + nq, acc_t(0));
            continue;
          }
          const Vec vl(l), vninf(ninf), zero(0);
          int64_t j = 0;
          for (; j + Vec::size() <= nq; j += Vec::size()) {
            const Vec sv = Vec::loadu(srow + j);
            Vec::blendv((sv - vl).exp_u20(), zero, sv == vninf).store(srow + j);
          }
          for (; j < nq; ++j) srow[j] = srow[j] == ninf ? acc_t(0) : std::exp(srow[j] - l);
        }
        // dV += (P Z)^T dO;  dP = Z dO V^T
        const acc_t* PZ = S;
        if (drop.on()) {
          w.z.resize(nr * nq), w.pz.resize(nr * nq);
          for (int64_t i = 0; i < nr; ++i) {
            acc_t* z = w.z.data() + i * nq;
            dropout_row(bh * R + r0 + i, kb, nq, z);
            for (int64_t j = 0; j < nq; ++j) w.pz[i * nq + j] = S[i * nq + j] * z[j];
          }
          PZ = w.pz.data();
        }
        const scalar_t* goh_b = goh + r0 * Dv;
        gemm(true, false, nq, Dv, nr, acc_t(1), in_dtype(PZ, nr * nq, w.ph), PZ, nq, goh_b, gob, Dv,
             w.dv.data(), Dv, acc_t(1));
        gemm(false, true, nr, nq, Dv, acc_t(1), goh_b, gob, Dv, vh + kb * Dv, vp, Dv, dP, nq,
             acc_t(0));
        for (int64_t i = 0; i < nr; ++i) {
          const acc_t* prow = S + i * nq;
          acc_t* drow = dP + i * nq;
          if (drop.on()) scale_row(drow, w.z.data() + i * nq, nq);
          // P == 1: the row's only key (of weight), where dS is exactly grad_lse (dP - dO . out
          // cancels; dO . out rounds otherwise than dP = dO . v and would leave noise)
          const acc_t delta = w.delta[r0 + i], gl = GL ? GL[bh * R + r0 + i] : acc_t(0);
          const Vec vd(delta), vgl(gl), zero(0), one(1);
          int64_t j = 0;
          for (; j + Vec::size() <= nq; j += Vec::size()) {
            const Vec pv = Vec::loadu(prow + j);
            const Vec ds = Vec::blendv(pv * (Vec::loadu(drow + j) - vd), zero, pv == zero);
            Vec::blendv(ds, vgl, pv == one).store(drow + j);
          }
          for (; j < nq; ++j)
            drow[j] = prow[j] == 0 ? acc_t(0) : prow[j] == 1 ? gl : prow[j] * (drow[j] - delta);
          if (DL) {
            scalar_t* dl = DL + (bh * R + r0 + i) * Lk + kb;
            for (j = 0; j < nq; ++j) dl[j] = static_cast<scalar_t>(drow[j]);
          }
        }
        // dQ += scale dS K;  dK += scale dS^T Q
        const scalar_t* dsh = in_dtype(dP, nr * nq, w.ph);
        gemm(false, false, nr, D, nq, scale, dsh, dP, nq, kh + kb * D, kp, D, w.dq.data() + r0 * D,
             D, acc_t(1));
        gemm(true, false, nq, D, nr, scale, dsh, dP, nq, qh + r0 * D, qab, D, w.dk.data(), D,
             acc_t(1));
      }
      scalar_t* dkh = DK + (bh * Lk + kb) * D;
      scalar_t* dvh = DV + (bh * Lk + kb) * Dv;
      for (int64_t e = 0; e < n * D; ++e) dkh[e] = static_cast<scalar_t>(w.dk[e]);
      for (int64_t e = 0; e < n * Dv; ++e) dvh[e] = static_cast<scalar_t>(w.dv[e]);
    }
    scalar_t* dqh = DQ + bh * R * D;
    for (int64_t e = 0; e < R * D; ++e) dqh[e] = static_cast<scalar_t>(w.dq[e]);
    return true;
  }
};

// Merge partial states a (in place) and b over disjoint key ranges of the same rows.
template <typename acc_t>
void merge_into(RowState<acc_t>& a, const RowState<acc_t>& b, int64_t nr, int64_t dv) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < nr; ++i) {
    a.count[i] += b.count[i];
    const acc_t ma = a.m[i], mb = b.m[i];
    const acc_t mn = (std::isnan(mb) || mb > ma) ? mb : ma;
    // a side still at -inf holds only 0 * v terms: they add unscaled (0, or NaN kept NaN)
    const acc_t fa = ma == ninf ? acc_t(mn == ninf ? 1 : 0) : std::exp(ma - mn);
    const acc_t fb = mb == ninf ? acc_t(mn == ninf ? 1 : 0) : std::exp(mb - mn);
    a.l[i] = (ma == ninf ? acc_t(0) : a.l[i] * fa) + (mb == ninf ? acc_t(0) : b.l[i] * fb);
    a.m[i] = mn;
    acc_t* oa = a.o.data() + i * dv;
    const acc_t* ob = b.o.data() + i * dv;
    for (int64_t d = 0; d < dv; ++d) oa[d] = oa[d] * fa + ob[d] * fb;
  }
}

template <typename scalar_t>
void flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const MaskLayout& mask,
                   double scale, const Dropout& drop) {
  using acc_t = acc_type<scalar_t>;
  const Flash<scalar_t> f = Flash<scalar_t>::of(
      q, k, v, out.mutable_data_ptr<scalar_t>(),
      lse.defined() ? lse.mutable_data_ptr<acc_t>() : nullptr, mask, scale, drop);
  const int64_t nqb = (f.R + kBlockQ - 1) / kBlockQ;
  const int64_t tasks = f.BH * nqb;
  const int64_t threads = at::get_num_threads();
  const int64_t nkb = (f.Lk + kBlockK - 1) / kBlockK;
  // split the keys when the tasks alone cannot keep every thread busy
  const int64_t split =
      tasks >= 2 * threads
          ? 1
          : std::max<int64_t>(1, std::min<int64_t>(nkb, (2 * threads + tasks - 1) / tasks));
  std::vector<int64_t> kends(tasks);  // each task's key end (Flash::key_ends), head by head
  at::parallel_for(0, f.BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> head;
    for (int64_t bh = begin; bh < end; ++bh) {
      f.key_ends(bh, head);
      std::copy(head.begin(), head.end(), kends.begin() + bh * nqb);
    }
  });
  if (split == 1) {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      RowState<acc_t> st;
      typename Flash<scalar_t>::Work w;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nqb, r0 = (t % nqb) * kBlockQ, nr = std::min(kBlockQ, f.R - r0);
        st.reset(nr, f.Dv);
        f.run(bh, r0, nr, 0, kends[t], st, w);
        f.finish(bh, r0, nr, st);
      }
    });
    return;
  }
  // split-K: chunk c of a task covers key blocks [c * per, (c + 1) * per) below its key end
  std::vector<RowState<acc_t>> parts(tasks * split);
  at::parallel_for(0, tasks * split, 1, [&](int64_t begin, int64_t end) {
    typename Flash<scalar_t>::Work w;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t t = p / split, c = p % split;
      const int64_t bh = t / nqb, r0 = (t % nqb) * kBlockQ, nr = std::min(kBlockQ, f.R - r0);
      const int64_t kend = kends[t];
      const int64_t blocks = (kend + kBlockK - 1) / kBlockK;
      const int64_t per = (blocks + split - 1) / split;
      const int64_t k0 = std::min(kend, c * per * kBlockK);
      const int64_t k1 = std::min(kend, (c + 1) * per * kBlockK);
      parts[p].reset(nr, f.Dv);
      f.run(bh, r0, nr, k0, k1, parts[p], w);
    }
  });
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, r0 = (t % nqb) * kBlockQ, nr = std::min(kBlockQ, f.R - r0);
      for (int64_t c = 1; c < split; ++c)
        merge_into(parts[t * split], parts[t * split + c], nr, f.Dv);
      f.finish(bh, r0, nr, parts[t * split]);
    }
  });
}

template <typename scalar_t>
bool flash_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& grad_lse, const MaskLayout& mask, double scale,
                    const Dropout& drop, const at::Tensor& dq, const at::Tensor& dk,
                    const at::Tensor& dv, const at::Tensor& dlogits) {
  using acc_t = acc_type<scalar_t>;
  // out is read only here (delta = rowsum(dO * out))
  const Flash<scalar_t> f = Flash<scalar_t>::of(
      q, k, v, const_cast<scalar_t*>(out.const_data_ptr<scalar_t>()), nullptr, mask, scale, drop);
  const scalar_t* GO = grad_out.const_data_ptr<scalar_t>();
  const acc_t* L = lse.const_data_ptr<acc_t>();
  const acc_t* GL = grad_lse.defined() ? grad_lse.const_data_ptr<acc_t>() : nullptr;
  scalar_t *DQ = dq.mutable_data_ptr<scalar_t>(), *DK = dk.mutable_data_ptr<scalar_t>(),
           *DV = dv.mutable_data_ptr<scalar_t>();
  scalar_t* DL = dlogits.defined() ? dlogits.mutable_data_ptr<scalar_t>() : nullptr;
  std::atomic<bool> ok{true};
  at::parallel_for(0, f.BH, 1, [&](int64_t begin, int64_t end) {
    typename Flash<scalar_t>::BwdWork w;
    for (int64_t bh = begin; bh < end && ok.load(std::memory_order_relaxed); ++bh)
      if (!f.backward(bh, GO, L, GL, DQ, DK, DV, DL, w)) ok = false;
  });
  return ok;
}

// The calls the kernels take: sizes within the BLAS's int (without a BLAS, gemm_rm's loops run),
// and not PYFORMER_CPU_FLASH=0, which has the CPU decline every call as a device without flash
// kernels does, so that the host's composition for such a device (CUDA's today) is what runs.
bool flash_takes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  static const bool enabled = [] {
    const char* env = std::getenv("PYFORMER_CPU_FLASH");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  const bool small = std::max({q.size(2), k.size(2), q.size(3), v.size(3)}) < INT_MAX / 2;
  return enabled && small && q.size(3) > 0 && v.size(3) > 0;
}

bool attention_flash_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& grad_lse, const MaskLayout& mask, double scale,
                             const Dropout& drop, const at::Tensor& dq, const at::Tensor& dk,
                             const at::Tensor& dv, const at::Tensor& dlogits) {
  if (!flash_takes(q, k, v)) return false;
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_bwd_cpu", [&] {
    done = flash_backward<scalar_t>(grad_out, q, k, v, out, lse, grad_lse, mask, scale, drop, dq,
                                    dk, dv, dlogits);
  });
  return done;
}

bool attention_flash_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, const at::Tensor& lse, const MaskLayout& mask,
                             double scale, const Dropout& drop) {
  if (!flash_takes(q, k, v)) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_cpu", [&] {
    flash_forward<scalar_t>(q, k, v, out, lse, mask, scale, drop);
  });
  return true;
}

}  // namespace

PYFORMER_REGISTER_KERNEL(attention_flash_fwd, CPU, &attention_flash_fwd_cpu);
PYFORMER_REGISTER_KERNEL(attention_flash_bwd, CPU, &attention_flash_bwd_cpu);

}  // namespace pyformer::cpu
