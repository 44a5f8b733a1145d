// layer_norm, add_layer_norm, rms_norm and add_rms_norm on the CPU: the row kernels behind
// kernels::layer_norm_fwd / _bwd.
//
//   x (..., *normalized_shape) viewed as (R, N) rows; weight, bias (*normalized_shape) optional
//   y = (x - mean) * rstd * weight + bias, mean and rstd (float32; float64 for float64 x) per row
//   add_layer_norm: s = x + residual (written out, rounded to x's dtype) and y = layer_norm(s)
//   RMS norm (no mean tensor): mean = 0 and rstd = 1 / sqrt(mean(x^2) + eps), no bias; one pass
//   fewer over the cached row in the forward, and no mean(g) term and no dbias in the backward
//
// Algorithm (forward): rows are split across threads; each row is read once from memory into a
// float buffer (for float32/float64 the row itself, or the just-written s, serves), then the mean
// and the biased variance in two vectorized passes over the cached row (a corrected two-pass: exact
// where the one-pass E[x^2] - E[x]^2 formula cancels, and the centred sum refines the mean, so a
// constant row normalizes to exactly 0), then y in a third. Row sums are blocked and compensated
// (vsum below), so their error does not grow with the row length. Napkin math: 4 bytes read + 4
// written per float32 element (+ 4 + 4 for the residual and s), ~8 flops per element. Backward: dx
// = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, per row; dweight = sum_rows
// dy * xhat and dbias = sum_rows dy through per-block partial sums over a fixed number of
// contiguous row blocks, then one reduction over the blocks in a fixed order: deterministic run to
// run, whatever the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>
#include <vector>

#include "../kernels.h"
#include "softmax_row.h"  // acc_type, Vectorized

namespace pyformer::cpu {

namespace {

// The sum of a vector's lanes, in lane order.
template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  acc_t t[Vectorized<acc_t>::size()];
  v.store(t);
  acc_t r = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) r += t[i];
  return r;
}

// Row sums whose error does not grow with the row length N: blocks of kSumBlock elements are
// summed in one vector accumulator (at most kSumBlock / lanes adds per lane), and the block totals
// are combined by Neumaier's compensated sum, so the relative error stays at the level of one
// block's, ~(kSumBlock / lanes) eps at worst, for any N (one running vector over the whole row
// grows as (N / lanes) eps: 1e-5 at N = 2^20 in float32). The block fits in L1 and the
// compensation costs a few flops per block: no measurable time.
constexpr int64_t kSumBlock = 2048;

template <typename acc_t>
struct CompensatedSum {
  acc_t sum = 0, comp = 0;
  void add(acc_t v) {
    const acc_t t = sum + v;
    comp += std::abs(sum) >= std::abs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  acc_t value() const { return sum + comp; }
};

// sum a[0:n] in one vector accumulator (n <= kSumBlock)
template <typename acc_t>
inline acc_t vsum_block(const acc_t* a, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec s(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) s = s + Vec::loadu(a + j);
  acc_t r = hsum(s);
  for (; j < n; ++j) r += a[j];
  return r;
}

template <typename acc_t>
inline acc_t vsum(const acc_t* a, int64_t n) {
  if (n <= kSumBlock) return vsum_block(a, n);
  CompensatedSum<acc_t> total;
  for (int64_t j = 0; j < n; j += kSumBlock)
    total.add(vsum_block(a + j, std::min(kSumBlock, n - j)));
  return total.value();
}

// sum (a - c) and sum (a - c)^2 over a[0:n] (n <= kSumBlock)
template <typename acc_t>
inline std::pair<acc_t, acc_t> vsum_dev_block(const acc_t* a, int64_t n, acc_t c) {
  using Vec = Vectorized<acc_t>;
  const Vec vc(c);
  Vec s1(0), s2(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec d = Vec::loadu(a + j) - vc;
    s1 = s1 + d;
    s2 = at::vec::fmadd(d, d, s2);
  }
  acc_t r1 = hsum(s1), r2 = hsum(s2);
  for (; j < n; ++j) {
    r1 += a[j] - c;
    r2 += (a[j] - c) * (a[j] - c);
  }
  return {r1, r2};
}

template <typename acc_t>
inline std::pair<acc_t, acc_t> vsum_dev(const acc_t* a, int64_t n, acc_t c) {
  if (n <= kSumBlock) return vsum_dev_block(a, n, c);
  CompensatedSum<acc_t> t1, t2;
  for (int64_t j = 0; j < n; j += kSumBlock) {
    const auto [b1, b2] = vsum_dev_block(a + j, std::min(kSumBlock, n - j), c);
    t1.add(b1);
    t2.add(b2);
  }
  return {t1.value(), t2.value()};
}

// sum a * b over a[0:n], b[0:n], blocked and compensated as vsum
template <typename acc_t>
inline acc_t vdot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  CompensatedSum<acc_t> total;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    Vec s(0);
    int64_t j = j0;
    for (; j + Vec::size() <= j1; j += Vec::size())
      s = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), s);
    acc_t r = hsum(s);
    for (; j < j1; ++j) r += a[j] * b[j];
    total.add(r);
  }
  return total.value();
}

// weight / bias as accumulator arrays (the tensor itself for float32/float64; a converted copy
// of N elements otherwise), or an empty tensor when absent.
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  if (!t.defined()) return t;
  return t.to(acc).contiguous();
}

template <typename scalar_t>
void layer_norm_forward_rows(const scalar_t* x, const scalar_t* res, scalar_t* s, scalar_t* y,
                             const acc_type<scalar_t>* w, const acc_type<scalar_t>* b,
                             acc_type<scalar_t>* mean, acc_type<scalar_t>* rstd, int64_t R,
                             int64_t N, double eps) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(direct ? 0 : N);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * N;
      const acc_t* row;
      if (res) {  // s = x + residual, rounded to scalar_t as the reference rounds it
        const scalar_t* rr = res + r * N;
        scalar_t* sr = s + r * N;
        if constexpr (direct) {  // s itself, just written and still in cache, is the row
          int64_t j = 0;
          for (; j + Vec::size() <= N; j += Vec::size())
            (Vec::loadu(xr + j) + Vec::loadu(rr + j)).store(sr + j);
          for (; j < N; ++j) sr[j] = xr[j] + rr[j];
          row = reinterpret_cast<const acc_t*>(sr);
        } else {
          for (int64_t j = 0; j < N; ++j) {
            sr[j] = static_cast<scalar_t>(xr[j] + rr[j]);
            buf[j] = static_cast<acc_t>(sr[j]);
          }
          row = buf.data();
        }
      } else if constexpr (direct) {
        row = reinterpret_cast<const acc_t*>(xr);
      } else {
        for (int64_t j = 0; j < N; ++j) buf[j] = static_cast<acc_t>(xr[j]);
        row = buf.data();
      }
      acc_t mu = 0, rs;
      if (mean == nullptr) {  // RMS: the mean square, blocked and compensated like the variance
        rs = acc_t(1) / std::sqrt(vsum_dev(row, N, acc_t(0)).second / N + static_cast<acc_t>(eps));
      } else {
        // corrected two-pass: the centred sum refines the mean (a constant row gets its value as
        // mean exactly, so y == bias exactly) and the variance
        const acc_t mu0 = vsum(row, N) / N;
        const auto [c1, c2] = vsum_dev(row, N, mu0);
        const acc_t dm = c1 / N;
        mu = mu0 + dm;
        const acc_t var = std::max(acc_t(0), c2 / N - dm * dm);
        rs = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
        mean[r] = mu;
      }
      rstd[r] = rs;
      scalar_t* yr = y + r * N;
      auto scalar = [&](int64_t j) {
        acc_t t = (row[j] - mu) * rs;
        if (w) t *= w[j];
        if (b) t += b[j];
        yr[j] = static_cast<scalar_t>(t);
      };
      int64_t j = 0;
      if constexpr (direct) {
        const Vec vmu(mu), vrs(rs);
        auto vec = [&](int64_t j) {
          Vec t = (Vec::loadu(row + j) - vmu) * vrs;
          if (w) t = t * Vec::loadu(w + j);
          if (b) t = t + Vec::loadu(b + j);
          return t;
        };
        for (; j + Vec::size() <= N; j += Vec::size()) vec(j).store(yr + j);
      }
      for (; j < N; ++j) scalar(j);
    }
  });
}

void layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& s,
                        const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& y,
                        const at::Tensor& mean, const at::Tensor& rstd, double eps) {
  const int64_t R = rstd.numel(), N = x.numel() / R;  // R, N > 0 (the host's contract)
  const at::ScalarType acc = rstd.scalar_type();
  const at::Tensor w = as_acc(weight, acc), b = as_acc(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    layer_norm_forward_rows<scalar_t>(
        x.const_data_ptr<scalar_t>(),
        residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
        s.defined() ? s.mutable_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
        w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
        mean.defined() ? mean.mutable_data_ptr<acc_t>() : nullptr, rstd.mutable_data_ptr<acc_t>(),
        R, N, eps);
  });
}

void layer_norm_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                        const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& dx,
                        const at::Tensor& dweight, const at::Tensor& dbias) {
  const int64_t R = rstd.numel(), N = x.numel() / R;
  const at::ScalarType acc = rstd.scalar_type();
  // Fixed block count (independent of the thread count), capped so the partials stay <= 256 MB.
  const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>({R, 32, (int64_t(32) << 20) / N}));
  const at::Tensor w = as_acc(weight, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward_cpu", [&] {
        using acc_t = acc_type<scalar_t>;
        const scalar_t* X = x.const_data_ptr<scalar_t>();
        const scalar_t* G = grad.const_data_ptr<scalar_t>();
        // no mean: the RMS norm (mean 0, no mean(g) term, no dbias)
        const acc_t* MU = mean.defined() ? mean.const_data_ptr<acc_t>() : nullptr;
        const bool center = MU != nullptr;
        const acc_t* RS = rstd.const_data_ptr<acc_t>();
        const acc_t* W = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
        scalar_t* DX = dx.mutable_data_ptr<scalar_t>();
        // the per-block partials, uninitialized (each block zeroes its own)
        const std::unique_ptr<acc_t[]> part(new acc_t[2 * nblk * N]);
        acc_t* DW = part.get();
        acc_t* DB = DW + nblk * N;
        at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
          constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
          std::vector<acc_t> xh(direct ? 0 : N), g(direct ? 0 : N);
          for (int64_t blk = b0; blk < b1; ++blk) {
            acc_t* dw = DW + blk * N;
            acc_t* db = DB + blk * N;
            std::fill(dw, dw + N, acc_t(0));
            std::fill(db, db + N, acc_t(0));
            const int64_t r0 = R * blk / nblk, r1 = R * (blk + 1) / nblk;
            for (int64_t r = r0; r < r1; ++r) {
              const scalar_t* xr = X + r * N;
              const scalar_t* gr = G + r * N;
              scalar_t* dxr = DX + r * N;
              const acc_t mu = center ? MU[r] : acc_t(0), rs = RS[r];
              if constexpr (std::is_same_v<scalar_t, acc_t>) {
                // float32 / float64: two vectorized passes over the cached row; xhat and g are
                // recomputed in the second rather than stored
                using Vec = Vectorized<acc_t>;
                const Vec vmu(mu), vrs(rs);
                // sum g and sum g * xhat by blocks (as vsum: the error does not grow with N)
                CompensatedSum<acc_t> tsg, tsgx;
                for (int64_t j0 = 0; j0 < N; j0 += kSumBlock) {
                  const int64_t j1 = std::min(N, j0 + kSumBlock);
                  Vec vsg(0), vsgx(0);
                  int64_t j = j0;
                  for (; j + Vec::size() <= j1; j += Vec::size()) {
                    const Vec dy = Vec::loadu(gr + j), xhv = (Vec::loadu(xr + j) - vmu) * vrs;
                    const Vec gv = W ? dy * Vec::loadu(W + j) : dy;
                    at::vec::fmadd(dy, xhv, Vec::loadu(dw + j)).store(dw + j);
                    if (center) {
                      (Vec::loadu(db + j) + dy).store(db + j);
                      vsg = vsg + gv;
                    }
                    vsgx = at::vec::fmadd(gv, xhv, vsgx);
                  }
                  acc_t sg = hsum(vsg), sgx = hsum(vsgx);
                  for (; j < j1; ++j) {
                    const acc_t dy = gr[j], xhv = (xr[j] - mu) * rs, gv = W ? dy * W[j] : dy;
                    dw[j] += dy * xhv;
                    if (center) {
                      db[j] += dy;
                      sg += gv;
                    }
                    sgx += gv * xhv;
                  }
                  tsg.add(sg);
                  tsgx.add(sgx);
                }
                const acc_t a = center ? tsg.value() / N : acc_t(0), c = tsgx.value() / N;
                const Vec va(a), vc(c);
                int64_t j = 0;
                for (; j + Vec::size() <= N; j += Vec::size()) {
                  const Vec dy = Vec::loadu(gr + j), xhv = (Vec::loadu(xr + j) - vmu) * vrs;
                  const Vec gv = W ? dy * Vec::loadu(W + j) : dy;
                  (vrs * (gv - va - xhv * vc)).store(dxr + j);
                }
                for (; j < N; ++j) {
                  const acc_t dy = gr[j], xhv = (xr[j] - mu) * rs, gv = W ? dy * W[j] : dy;
                  dxr[j] = rs * (gv - a - xhv * c);
                }
              } else {  // float16 / bfloat16: convert once into float buffers
                for (int64_t j = 0; j < N; ++j) {
                  const acc_t dy = static_cast<acc_t>(gr[j]);
                  xh[j] = (static_cast<acc_t>(xr[j]) - mu) * rs;
                  g[j] = W ? dy * W[j] : dy;
                  dw[j] += dy * xh[j];
                  if (center) db[j] += dy;
                }
                const acc_t sg = center ? vsum(g.data(), N) : acc_t(0);
                const acc_t sgx = vdot(g.data(), xh.data(), N);
                const acc_t a = sg / N, c = sgx / N;
                for (int64_t j = 0; j < N; ++j)
                  dxr[j] = static_cast<scalar_t>(rs * (g[j] - a - xh[j] * c));
              }
            }
          }
        });
        // a fixed-order reduction over the blocks (block 0 first), columns in chunks so the
        // inner loop runs along contiguous partials
        scalar_t* GW = dweight.mutable_data_ptr<scalar_t>();
        scalar_t* GB = dbias.defined() ? dbias.mutable_data_ptr<scalar_t>() : nullptr;
        constexpr int64_t kChunk = 256;
        at::parallel_for(0, (N + kChunk - 1) / kChunk, 16, [&](int64_t c0, int64_t c1) {
          acc_t sw[kChunk], sb[kChunk];
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t j0 = c * kChunk, n = std::min(kChunk, N - j0);
            std::fill(sw, sw + n, acc_t(0));
            std::fill(sb, sb + n, acc_t(0));
            for (int64_t blk = 0; blk < nblk; ++blk) {
              const acc_t* dw = DW + blk * N + j0;
              const acc_t* db = DB + blk * N + j0;
              for (int64_t j = 0; j < n; ++j) {
                sw[j] += dw[j];
                sb[j] += db[j];
              }
            }
            for (int64_t j = 0; j < n; ++j) GW[j0 + j] = static_cast<scalar_t>(sw[j]);
            if (GB)
              for (int64_t j = 0; j < n; ++j) GB[j0 + j] = static_cast<scalar_t>(sb[j]);
          }
        });
      });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(layer_norm_fwd, CPU, &layer_norm_fwd_cpu);
PYFORMER_REGISTER_KERNEL(layer_norm_bwd, CPU, &layer_norm_bwd_cpu);

}  // namespace pyformer::cpu
