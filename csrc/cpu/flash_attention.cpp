// Flash attention on the CPU, forward: the kernel behind kernels::attention_flash_fwd.
//
//   q (B, H_kv, G * Lq, D), k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv), contiguous: the query side
//   grouped by kv head (csrc/host/attention.cpp, grouped), so one kv head serves G * Lq rows
//   -> out (B, H_kv, G * Lq, Dv), and lse (B, H_kv, G * Lq) float32 when asked for
//   out = softmax(scale * q @ k^T + M) @ v,  lse = log(sum_j exp(scale * q k_j + M_j)) per row
//
// Algorithm (FlashAttention's, on BLAS GEMMs): the rows of a head are cut into query blocks of
// kBlockQ, the keys into key blocks of kBlockK. A task (batch, kv head, query block) keeps a
// running max m, sum l and unnormalized output O (kBlockQ x Dv, float) per row and, for each key
// block: S = scale * Q_blk @ K_blk^T (GEMM), the mask applied in place (the row kernels of
// softmax_row.h: bool, additive, causal and key_lengths limits), the block's row max m', the
// rescale O *= exp(m - m'), l = l * exp(m - m') + sum exp(S - m'), then O += exp(S - m') @ V_blk
// (GEMM, beta = 1). Key blocks at or past the largest limit of the block's rows (causal, key
// lengths) are skipped. The scores never leave a kBlockQ x kBlockK buffer: memory is O(L), not
// O(Lq * Lk). float16/bfloat16 blocks are converted to float on the way in (float accumulation).
//
// Parallelism: tasks over (batch, kv head, query block); when there are fewer tasks than twice the
// threads (decode: one query row against a long cache), each task's keys are split into chunks
// run as tasks of their own, whose partial (m, l, O) are merged exactly afterwards
// (flash-decoding). The split depends only on the sizes and the thread count, and the merge runs
// in a fixed order: results are bitwise reproducible at a fixed thread count.
//
// The edges are the composition's (docs/ops.md): a row whose every key is masked gives zeros (lse
// -inf); NaN or +inf among a row's unmasked scores, or every unmasked score -inf, gives NaN; a
// masked key's probability is 0 and multiplies its value row in IEEE arithmetic, so the keys past
// the skipped limit are read (not skipped) when one of their value rows is not finite.
//
// Napkin math: 4 * B * H * Lq * Lk_eff * D flops (Lk_eff: the keys not skipped; about half of Lk
// with causal masking); memory: q and out once, k and v once per query block (from L2/L3 for
// short heads), nothing of size Lq x Lk.
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <vector>

#include "../kernels.h"
#include "blas.h"
#include "softmax_row.h"

namespace pyformer::cpu {
namespace {

constexpr int64_t kBlockQ = 64;
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
  float* LSE;
  const MaskLayout& m;
  int64_t BH, R, Lk, D, Dv;  // R = G * Lq rows per kv head
  acc_t scale;

  // Per-thread buffers.
  struct Work {
    std::vector<acc_t> s, q, k, v;
  };

  // Rows [r0, r0 + nr) of head bh, keys [k0, k1): the running state, from `st` as it is.
  void run(int64_t bh, int64_t r0, int64_t nr, int64_t k0, int64_t k1, RowState<acc_t>& st,
           Work& w) const {
    const scalar_t* kh = K + bh * Lk * D;
    const scalar_t* vh = V + bh * Lk * Dv;
    const acc_t* qb;
    if constexpr (kConvert) {
      w.q.resize(nr * D);
      const scalar_t* src = Q + (bh * R + r0) * D;
      for (int64_t e = 0; e < nr * D; ++e) w.q[e] = static_cast<acc_t>(src[e]);
      qb = w.q.data();
    } else {
      qb = Q + (bh * R + r0) * D;
    }
    w.s.resize(kBlockQ * kBlockK);
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t kb = k0; kb < k1; kb += kBlockK) {
      const int64_t n = std::min(kBlockK, k1 - kb);
      const acc_t *kp, *vp;
      if constexpr (kConvert) {
        w.k.resize(n * D), w.v.resize(n * Dv);
        for (int64_t e = 0; e < n * D; ++e) w.k[e] = static_cast<acc_t>(kh[kb * D + e]);
        for (int64_t e = 0; e < n * Dv; ++e) w.v[e] = static_cast<acc_t>(vh[kb * Dv + e]);
        kp = w.k.data(), vp = w.v.data();
      } else {
        kp = kh + kb * D, vp = vh + kb * Dv;
      }
      acc_t* S = w.s.data();
      gemm_rm<acc_t>(false, true, nr, n, D, scale, qb, D, kp, D, S, n);
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
      }
      gemm_rm<acc_t>(false, false, nr, Dv, n, acc_t(1), S, n, vp, Dv, st.o.data(), Dv, acc_t(1));
    }
  }

  // The rows' key range: [0, kend), kend the largest limit among them, or Lk when a value row
  // past it is not finite (its 0 * NaN must reach the output, as in the reference).
  int64_t key_end(int64_t bh, int64_t r0, int64_t nr) const {
    int64_t kend = 0;
    for (int64_t i = 0; i < nr; ++i) kend = std::max(kend, m.limit(bh * R + r0 + i, Lk));
    if (kend < Lk && !tail_finite(V + (bh * Lk + kend) * Dv, (Lk - kend) * Dv)) kend = Lk;
    return kend;
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
      if (LSE) LSE[row] = static_cast<float>(lse);
    }
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
                   double scale) {
  using acc_t = acc_type<scalar_t>;
  const Flash<scalar_t> f{q.const_data_ptr<scalar_t>(),
                          k.const_data_ptr<scalar_t>(),
                          v.const_data_ptr<scalar_t>(),
                          out.mutable_data_ptr<scalar_t>(),
                          lse.defined() ? lse.mutable_data_ptr<float>() : nullptr,
                          mask,
                          q.size(0) * q.size(1),
                          q.size(2),
                          k.size(2),
                          q.size(3),
                          v.size(3),
                          static_cast<acc_t>(scale)};
  const int64_t nqb = (f.R + kBlockQ - 1) / kBlockQ;
  const int64_t tasks = f.BH * nqb;
  const int64_t threads = at::get_num_threads();
  const int64_t nkb = (f.Lk + kBlockK - 1) / kBlockK;
  // split the keys when the tasks alone cannot keep every thread busy
  const int64_t split =
      tasks >= 2 * threads ? 1 : std::min<int64_t>(nkb, (2 * threads + tasks - 1) / tasks);
  if (split == 1) {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      RowState<acc_t> st;
      typename Flash<scalar_t>::Work w;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nqb, r0 = (t % nqb) * kBlockQ, nr = std::min(kBlockQ, f.R - r0);
        st.reset(nr, f.Dv);
        f.run(bh, r0, nr, 0, f.key_end(bh, r0, nr), st, w);
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
      const int64_t kend = f.key_end(bh, r0, nr);
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

bool attention_flash_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, const at::Tensor& lse, const MaskLayout& mask,
                             double scale) {
  const at::ScalarType dt = q.scalar_type();
  const bool blas_ok = dt == at::kDouble ? have_blas<double>() : have_blas<float>();
  const bool small = std::max({q.size(2), k.size(2), q.size(3), v.size(3)}) < INT_MAX / 2;
  if (!blas_ok || !small || q.size(3) == 0 || v.size(3) == 0) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "attention_flash_cpu",
                                  [&] { flash_forward<scalar_t>(q, k, v, out, lse, mask, scale); });
  return true;
}

}  // namespace

PYFORMER_REGISTER_KERNEL(attention_flash_fwd, CPU, &attention_flash_fwd_cpu);

}  // namespace pyformer::cpu
