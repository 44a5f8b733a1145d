// Row kernels of the fused masked softmax on the CPU, shared by masked_softmax.cpp and
// attention.cpp (which runs them on each head's scores while they are still in cache).
//
// One row of Lk scores: y[j] = exp(v_j - max) / sum_j' exp(v_j' - max), v_j = scale * x[j] + m[j],
// over the unmasked keys j < end (end folds in causal and key_lengths: keys past it are not read,
// their outputs are written as 0). Three passes over the row, two of them in a float (double for
// float64) buffer of Lk that stays in L1/L2: (1) scale + mask into the buffer, counting the
// unmasked keys; (2) max; (3) exp and sum into the buffer, then normalize into y. Memory traffic is
// the minimum: one read of the row (less where end < Lk) and one write.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../mask_layout.h"
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pyformer::cpu {

using at::vec::Vectorized;

// Accumulation type: float for float32/float16/bfloat16, double for float64.
template <typename T>
using acc_type = at::opmath_type<T>;

// Whether every one of the n values at p is finite: a value is inf or NaN exactly when its
// exponent field is all ones, that is when (~bits & exponent) == 0, so the scan is a min over
// integers, which the compiler vectorizes: it reads a KV cache's padding (attention's rule for a
// masked key's non-finite value row) at memory speed.
template <typename scalar_t>
bool all_finite(const scalar_t* p, int64_t n) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t));
  constexpr bits_t exponent = std::is_same_v<scalar_t, at::Half>       ? bits_t(0x7C00)
                              : std::is_same_v<scalar_t, at::BFloat16> ? bits_t(0x7F80)
                              : std::is_same_v<scalar_t, float> ? bits_t(0x7F800000u)
                                                                : bits_t(0x7FF0000000000000ull);
  bits_t least = exponent;
  for (int64_t e = 0; e < n; ++e) {
    bits_t b;
    std::memcpy(&b, p + e, sizeof(b));
    least = std::min<bits_t>(least, static_cast<bits_t>(~b & exponent));
  }
  return least != 0;
}

// The mask of one row: none, bool (a nonzero byte = may attend: a bool tensor viewed from uint8
// may hold any byte) or additive in the accumulation type (-inf = masked), with a stride along the
// keys (1, or 0 for a mask broadcast along the keys).
template <typename scalar_t>
struct RowMask {
  const uint8_t* b = nullptr;
  const acc_type<scalar_t>* f = nullptr;
  int64_t stride = 1;
};

// The mask of row `row` of scores described by a MaskLayout (csrc/mask_layout.h).
template <typename scalar_t>
inline RowMask<scalar_t> row_mask(const MaskLayout& m, int64_t row) {
  RowMask<scalar_t> rm;
  if (m.kind == 0) return rm;
  const int64_t off = m.offset(row);
  if (m.kind == 1)
    rm.b = static_cast<const uint8_t*>(m.data) + off;
  else
    rm.f = static_cast<const acc_type<scalar_t>*>(m.data) + off;
  rm.stride = m.mlast;
  return rm;
}

// Stage 1: buf[j] = scale * x[j] (+ mask), -inf where masked, for j < end. Returns the number of
// unmasked keys. KIND: 0 none, 1 bool, 2 additive; UNIT: the mask's key stride is 1.
template <int KIND, bool UNIT, typename scalar_t, typename in_t, typename acc_t>
inline int64_t scale_mask_row(const in_t* x, acc_t* buf, int64_t end, acc_t scale,
                              const RowMask<scalar_t>& m) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t ms = UNIT ? 1 : m.stride;
  int64_t count = 0;
  if constexpr (KIND == 0) {
    for (int64_t j = 0; j < end; ++j) buf[j] = scale * static_cast<acc_t>(x[j]);
    count = end;
  } else if constexpr (KIND == 1) {
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (UNIT && std::is_same_v<in_t, float> && std::is_same_v<acc_t, float>) {
      // 8 keys at a time: 8 mask bytes -> a lane mask (byte != 0) -> blend of scale * x and
      // -inf; the unmasked keys are counted by a popcount of the lane mask.
      const __m256 vs = _mm256_set1_ps(scale), vninf = _mm256_set1_ps(ninf);
      const __m256i zero = _mm256_setzero_si256();
      for (; j + 8 <= end; j += 8) {
        uint64_t bits;
        std::memcpy(&bits, m.b + j, 8);
        const __m256i m32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bits)));
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(m32, zero));
        _mm256_storeu_ps(buf + j,
                         _mm256_blendv_ps(vninf, _mm256_mul_ps(_mm256_loadu_ps(x + j), vs), keep));
        count += __builtin_popcount(_mm256_movemask_ps(keep));
      }
    }
#endif
    for (; j < end; ++j) {
      const bool ok = m.b[j * ms] != 0;
      buf[j] = ok ? scale * static_cast<acc_t>(x[j]) : ninf;
      count += ok;
    }
  } else {
    for (int64_t j = 0; j < end; ++j) {
      const acc_t a = static_cast<acc_t>(m.f[j * ms]);
      const bool ok = a != ninf;
      buf[j] = ok ? scale * static_cast<acc_t>(x[j]) + a : ninf;
      count += ok;
    }
  }
  return count;
}

// NaN-propagating max of buf[0:n].
template <typename acc_t>
inline acc_t row_max(const acc_t* buf, int64_t n) {
  using Vec = Vectorized<acc_t>;
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if (n >= Vec::size()) {
    Vec vm(mx);
    for (; j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(buf + j));
    acc_t tmp[Vec::size()];
    vm.store(tmp);
    for (int64_t t = 0; t < Vec::size(); ++t)
      mx = (std::isnan(tmp[t]) || tmp[t] > mx) ? tmp[t] : mx;
  }
  for (; j < n; ++j) mx = (std::isnan(buf[j]) || buf[j] > mx) ? buf[j] : mx;
  return mx;
}

// buf[j] = exp(buf[j] - mx) in place; returns the sum.
template <typename acc_t>
inline acc_t exp_sum_row(acc_t* buf, int64_t n, acc_t mx) {
  using Vec = Vectorized<acc_t>;
  const Vec vmx(mx);
  Vec vs(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(buf + j) - vmx).exp_u20();
    e.store(buf + j);
    vs = vs + e;
  }
  acc_t tmp[Vec::size()];
  vs.store(tmp);
  acc_t s = 0;
  for (int64_t t = 0; t < Vec::size(); ++t) s += tmp[t];
  for (; j < n; ++j) {
    buf[j] = std::exp(buf[j] - mx);
    s += buf[j];
  }
  return s;
}

// y[0:n] = buf[0:n] * c (converted to scalar_t), then y[n:lk] = 0.
template <typename scalar_t, typename acc_t>
inline void store_scaled(scalar_t* y, const acc_t* buf, int64_t n, int64_t lk, acc_t c) {
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = Vectorized<acc_t>;
    const Vec vc(c);
    for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(buf + j) * vc).store(y + j);
  }
  for (; j < n; ++j) y[j] = static_cast<scalar_t>(buf[j] * c);
  std::fill(y + n, y + lk, scalar_t(0));
}

// The whole row. `buf` holds at least `end` accumulators; x may be the scores in scalar_t or, in
// attention, the float scores straight out of the GEMM (in_t = acc_t); x and y may alias.
template <typename scalar_t, typename in_t = scalar_t, typename acc_t = acc_type<scalar_t>>
inline void masked_softmax_row(const in_t* x, scalar_t* y, int64_t lk, int64_t end, acc_t scale,
                               const RowMask<scalar_t>& m, acc_t* buf) {
  int64_t count;
  const bool unit = m.stride == 1;
  if (m.b) {
    count = unit ? scale_mask_row<1, true, scalar_t>(x, buf, end, scale, m)
                 : scale_mask_row<1, false, scalar_t>(x, buf, end, scale, m);
  } else if (m.f) {
    count = unit ? scale_mask_row<2, true, scalar_t>(x, buf, end, scale, m)
                 : scale_mask_row<2, false, scalar_t>(x, buf, end, scale, m);
  } else {
    count = scale_mask_row<0, true, scalar_t>(x, buf, end, scale, m);
  }
  if (count == 0) {  // every key masked: a defined answer, zeros
    std::fill(y, y + lk, scalar_t(0));
    return;
  }
  const acc_t mx = row_max(buf, end);
  if (!std::isfinite(mx)) {
    // NaN or +-inf among the unmasked scores: NaN at every unmasked key, as torch.softmax; a
    // masked key stays exactly 0 (docs/ops.md), so it is told apart from an unmasked -inf score
    // by reading the mask again (a rare row)
    constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t j = 0; j < lk; ++j) {
      bool masked = j >= end;
      if (!masked && m.b) masked = m.b[j * m.stride] == 0;
      if (!masked && m.f) masked = static_cast<acc_t>(m.f[j * m.stride]) == ninf;
      y[j] = masked ? scalar_t(0) : nan;
    }
    return;
  }
  const acc_t sum = exp_sum_row(buf, end, mx);
  store_scaled(y, buf, end, lk, acc_t(1) / sum);
}

// Backward of one row: dx[j] = scale * y[j] * (dy[j] - sum_j' dy[j'] y[j']), and exactly 0 where
// y[j] == 0 (a masked key: its gradient is 0 even in a row whose sum is NaN, as the reference's
// masked_fill gives; docs/ops.md). The dy of a key with y == 0 is not read at all, so a NaN
// there (attention's dP at a masked key whose value row is NaN) does not reach the row's sum.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void masked_softmax_backward_row(const scalar_t* dy, const scalar_t* y, scalar_t* dx,
                                        int64_t n, acc_t scale) {
  acc_t dot = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = Vectorized<acc_t>;
    Vec vd(0);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec vy = Vec::loadu(y + j);
      vd = at::vec::fmadd(Vec::blendv(Vec::loadu(dy + j), Vec(0), vy == Vec(0)), vy, vd);
    }
    acc_t tmp[Vec::size()];
    vd.store(tmp);
    for (int64_t t = 0; t < Vec::size(); ++t) dot += tmp[t];
    for (; j < n; ++j) dot += y[j] == 0 ? acc_t(0) : dy[j] * y[j];
    const Vec vdot(dot), vs(scale), zero(0);
    j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec vy = Vec::loadu(y + j);
      Vec::blendv(vs * vy * (Vec::loadu(dy + j) - vdot), zero, vy == zero).store(dx + j);
    }
    for (; j < n; ++j) dx[j] = y[j] == 0 ? acc_t(0) : scale * y[j] * (dy[j] - dot);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t yj = static_cast<acc_t>(y[j]);
      if (yj != 0) dot += static_cast<acc_t>(dy[j]) * yj;
    }
    for (int64_t j = 0; j < n; ++j) {
      const acc_t yj = static_cast<acc_t>(y[j]);
      dx[j] = static_cast<scalar_t>(yj == 0 ? acc_t(0)
                                            : scale * yj * (static_cast<acc_t>(dy[j]) - dot));
    }
  }
}

}  // namespace pyformer::cpu
