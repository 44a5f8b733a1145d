// apply_rotary on the CPU: the kernel behind kernels::rotary.
//
//   q (B, Hq, L, D), k (B, Hk, L, D): any strides on the first three dims, unit stride along D
//   (outputs likewise, with strides of their own); cos, sin (Bc, L, Dr) contiguous in the
//   accumulation type, Bc = 1 or B, Dr even and <= D. Per row x of q or k at (b, l), with the
//   pairs (x1, x2) = (x[i], x[i + Dr/2]) for rotate-half and (x[2i], x[2i + 1]) for interleaved,
//   i < Dr/2, and c1, c2, s1, s2 the cos and sin at the pair's two positions:
//     forward:    o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2     (x cos + rotate(x) sin)
//     transpose:  o1 = x1 c1 + x2 s2,  o2 = x2 c2 - x1 s1     (the backward: g cos + rotate^T(g
//     sin))
//   and o = x past Dr. Both are o1 = x1 c1 + x2 a, o2 = x2 c2 + x1 b with (a, b) = (-s1, s2) or
//   (s2, -s1), so each (b, l) first gathers its coefficients c1, c2, a, b (Dr/2 each) into a small
//   buffer, which then serves every head of q and k at that position.
//
// Algorithm: positions (b, l) are split across threads; each runs its Hq + Hk rows (adjacent in
// memory in the usual (B, L, H, D) projection layout behind a (B, H, L, D) view). Rotate-half rows
// run in at::vec vectors over i; interleaved rows in a scalar loop over pairs; half types convert
// the row to float first. Napkin math (float32): each element of q and k is read once and written
// once (8 bytes) with 2 multiply-adds, so it runs at copy speed; the coefficients are L * Dr * 8
// bytes, read once per position. PyTorch's composition (q * cos + rotate_half(q) * sin) makes
// about five passes over q.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../kernels.h"
#include "softmax_row.h"  // acc_type, Vectorized

namespace pyformer::cpu {

namespace {

// The rotation coefficients of one position: c1, c2, a, b of each pair (above).
template <typename acc_t>
struct Coeffs {
  std::vector<acc_t> buf;
  const acc_t *c1, *c2, *a, *b;
  int64_t half;

  explicit Coeffs(int64_t h) : buf(4 * h), half(h) {
    c1 = buf.data();
    c2 = c1 + h;
    a = c2 + h;
    b = a + h;
  }
  void gather(const acc_t* cos, const acc_t* sin, bool interleaved, bool transpose) {
    acc_t* w = buf.data();
    for (int64_t i = 0; i < half; ++i) {
      const int64_t p1 = interleaved ? 2 * i : i, p2 = interleaved ? 2 * i + 1 : i + half;
      w[i] = cos[p1];
      w[half + i] = cos[p2];
      w[2 * half + i] = transpose ? sin[p2] : -sin[p1];
      w[3 * half + i] = transpose ? -sin[p1] : sin[p2];
    }
  }
};

// One row in the accumulation type: o (D) from x (D); Dr = 2 * co.half.
template <typename acc_t>
inline void rotate_row(const acc_t* x, acc_t* o, const Coeffs<acc_t>& co, int64_t D,
                       bool interleaved) {
  using Vec = Vectorized<acc_t>;
  const int64_t h = co.half;
  if (interleaved) {
    for (int64_t i = 0; i < h; ++i) {
      const acc_t x1 = x[2 * i], x2 = x[2 * i + 1];
      o[2 * i] = x1 * co.c1[i] + x2 * co.a[i];
      o[2 * i + 1] = x2 * co.c2[i] + x1 * co.b[i];
    }
  } else {
    int64_t i = 0;
    for (; i + Vec::size() <= h; i += Vec::size()) {
      const Vec x1 = Vec::loadu(x + i), x2 = Vec::loadu(x + h + i);
      (x1 * Vec::loadu(co.c1 + i) + x2 * Vec::loadu(co.a + i)).store(o + i);
      (x2 * Vec::loadu(co.c2 + i) + x1 * Vec::loadu(co.b + i)).store(o + h + i);
    }
    for (; i < h; ++i) {
      const acc_t x1 = x[i], x2 = x[h + i];
      o[i] = x1 * co.c1[i] + x2 * co.a[i];
      o[h + i] = x2 * co.c2[i] + x1 * co.b[i];
    }
  }
  std::copy(x + 2 * h, x + D, o + 2 * h);
}

// A 4-dim (B, H, L, D) tensor's data and strides (in elements) of its first three dims.
template <typename T>
struct Rows {
  T* p;
  int64_t H, sb, sh, sl;
  Rows(const at::Tensor& t, T* data)
      : p(data), H(t.size(1)), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

template <typename scalar_t>
void rotary_cpu_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                      const at::Tensor& k_out, const at::Tensor& cos, const at::Tensor& sin,
                      bool interleaved, bool transpose) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), L = q.size(2), D = q.size(3);
  const int64_t Bc = cos.size(0), Dr = cos.size(2), h = Dr / 2;
  const Rows<const scalar_t> ins[2] = {{q, q.const_data_ptr<scalar_t>()},
                                       {k, k.const_data_ptr<scalar_t>()}};
  const Rows<scalar_t> outs[2] = {{q_out, q_out.mutable_data_ptr<scalar_t>()},
                                  {k_out, k_out.mutable_data_ptr<scalar_t>()}};
  const acc_t* C = cos.const_data_ptr<acc_t>();
  const acc_t* S = sin.const_data_ptr<acc_t>();
  const int64_t per_position = std::max<int64_t>(1, (q.size(1) + k.size(1)) * D);
  const int64_t grain = std::max<int64_t>(1, 16384 / per_position);
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    Coeffs<acc_t> co(h);
    std::vector<acc_t> xb(direct ? 0 : D), ob(direct ? 0 : D);
    for (int64_t bl = begin; bl < end; ++bl) {
      const int64_t b = bl / L, l = bl % L;
      const int64_t at_cs = ((Bc == 1 ? 0 : b) * L + l) * Dr;
      co.gather(C + at_cs, S + at_cs, interleaved, transpose);
      for (int t = 0; t < 2; ++t) {
        for (int64_t hh = 0; hh < ins[t].H; ++hh) {
          const scalar_t* x = ins[t].row(b, hh, l);
          scalar_t* o = outs[t].row(b, hh, l);
          if constexpr (direct) {
            rotate_row<acc_t>(x, o, co, D, interleaved);
          } else {
            for (int64_t j = 0; j < D; ++j) xb[j] = static_cast<acc_t>(x[j]);
            rotate_row<acc_t>(xb.data(), ob.data(), co, D, interleaved);
            for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(ob[j]);
          }
        }
      }
    }
  });
}

void rotary_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                const at::Tensor& k_out, const at::Tensor& cos, const at::Tensor& sin,
                bool interleaved, bool transpose) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_cpu", [&] {
    rotary_cpu_typed<scalar_t>(q, k, q_out, k_out, cos, sin, interleaved, transpose);
  });
}

}  // namespace

PYFORMER_REGISTER_KERNEL(rotary, CPU, &rotary_cpu);

}  // namespace pyformer::cpu
