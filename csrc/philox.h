// Attention dropout's counter-based generator, one definition for the CPU and CUDA kernels.
//
// Element (row, j) of the (B, H, Lq, Lk) probabilities, row = (b * H + h) * Lq + i, has the index
// n = row * Lk + j. Its 32-bit word is word n % 4 of Philox4x32-10 (Salmon et al., "Parallel
// random numbers: as easy as 1, 2, 3", SC'11; the generator of curand and of torch's CUDA
// dropout) with key = the 64-bit seed and counter = (n / 4 as 64 bits, 0, 0); the element is
// kept when word >= threshold = floor(p * 2^32), so with probability 1 - p (p = 1 keeps
// nothing). The pattern depends only on (seed, p, the shape), not on the dtype, the device, the
// algorithm (bmm or flash), the blocking or the thread count: the flash backward regenerates the
// forward's mask instead of saving it, and both algorithms drop the same elements for one seed.
// pyformer.reference.dropout_keep is the same definition written independently in torch ops.
//
// Napkin math: 10 rounds of two 32x32 -> 64-bit multiplies per 4 elements; on a CPU, 16 counters
// at a time in AVX2 vectors (philox4x32_10_lanes).
#pragma once

#include <cstdint>

#if defined(__AVX2__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#if defined(__CUDACC__)
#define PYFORMER_HD __host__ __device__ __forceinline__
#else
#define PYFORMER_HD inline
#endif

namespace pyformer {

// The dropout of one call: keep probability 1 - p, and the Philox key.
struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
  bool on() const { return p > 0; }
};

struct Philox4 {
  uint32_t x[4];
};

// Philox4x32-10 of the counter (lo, hi, 0, 0) under the key seed.
PYFORMER_HD Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Dropout keeps an element with probability 1 - p and scales it by 1 / (1 - p) (0 when p == 1).
PYFORMER_HD double dropout_keep_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// floor(p * 2^32): a word at or above it keeps its element (2^32 for p = 1: none is kept).
PYFORMER_HD uint64_t dropout_threshold(double p) {
  return p >= 1.0 ? (uint64_t(1) << 32) : static_cast<uint64_t>(p * 4294967296.0);
}

#if !defined(__CUDACC__)
// Philox4x32-10 of the kPhiloxLanes counters g0, g0 + 1, ... at once, into words[4 * l + w]
// (word w of counter g0 + l: the elements' order). With AVX2 (the CPU kernels' AVX2 build) the
// rounds run 8 counters per vector, vpmuludq forming the 32 x 32 -> 64-bit products of the even
// and the odd lanes, and a 4 x 8 transpose puts the words in the elements' order; elsewhere the
// counters run one after another.
constexpr int kPhiloxLanes = 16;
inline void philox4x32_10_lanes(uint64_t g0, uint64_t seed, uint32_t* words) {
#if defined(__AVX2__)
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  // (high, low) 32-bit halves of a * m in each 32-bit lane of a
  const auto mulhilo = [](__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
    const __m256i even = _mm256_mul_epu32(a, m);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  };
  // the kPhiloxLanes / 8 vectors' rounds interleaved: independent chains hide the multiplies'
  // latency
  constexpr int kV = kPhiloxLanes / 8;
  __m256i c0[kV], c1[kV], c2[kV], c3[kV];
  for (int v = 0; v < kV; ++v) {
    alignas(32) uint32_t lo32[8], hi32[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t g = g0 + static_cast<uint64_t>(8 * v + l);
      lo32[l] = static_cast<uint32_t>(g), hi32[l] = static_cast<uint32_t>(g >> 32);
    }
    c0[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
    c1[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
    c2[v] = c3[v] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kV; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(c0[v], m0, hi0, lo0);
      mulhilo(c2[v], m1, hi1, lo1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), vk0);
      c1[v] = lo1;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), vk1);
      c3[v] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int v = 0; v < kV; ++v) {
    // transpose: counter l's four words next to each other
    const __m256i t0 = _mm256_unpacklo_epi32(c0[v], c1[v]),
                  t1 = _mm256_unpackhi_epi32(c0[v], c1[v]);
    const __m256i t2 = _mm256_unpacklo_epi32(c2[v], c3[v]),
                  t3 = _mm256_unpackhi_epi32(c2[v], c3[v]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* out = reinterpret_cast<__m256i*>(words + 32 * v);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
#else
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const Philox4 r = philox4x32_10(g0 + static_cast<uint64_t>(l), seed);
    for (int w = 0; w < 4; ++w) words[4 * l + w] = r.x[w];
  }
#endif
}

// Keep factors of the elements [n, n + count) into f: keep_scale where kept, 0 where dropped.
// Whole runs of kPhiloxLanes counters go through philox4x32_10_lanes, the ragged ends through
// philox4x32_10: the same words either way.
template <typename T>
inline void dropout_factors(uint64_t n, int64_t count, uint64_t seed, uint64_t threshold,
                            T keep_scale, T* f) {
  int64_t e = 0;
  const auto one_counter = [&] {
    const uint64_t idx = n + static_cast<uint64_t>(e);
    const Philox4 r = philox4x32_10(idx >> 2, seed);
    for (unsigned w = static_cast<unsigned>(idx & 3); w < 4 && e < count; ++w, ++e)
      f[e] = r.x[w] >= threshold ? keep_scale : T(0);
  };
  if (threshold > 0xFFFFFFFFu) {  // p = 1: nothing is kept
    for (; e < count; ++e) f[e] = T(0);
    return;
  }
  if ((n & 3) != 0) one_counter();  // up to the next counter
  constexpr int64_t kRun = 4 * kPhiloxLanes;
  {
    const uint32_t t = static_cast<uint32_t>(threshold);
    alignas(32) uint32_t words[kRun];
    for (; e + kRun <= count; e += kRun) {
      philox4x32_10_lanes((n + static_cast<uint64_t>(e)) >> 2, seed, words);
      for (int64_t j = 0; j < kRun; ++j) f[e + j] = words[j] >= t ? keep_scale : T(0);
    }
  }
  while (e < count) one_counter();
}
#endif

}  // namespace pyformer
