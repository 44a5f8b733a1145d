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
// Philox4x32-10 of the kPhiloxLanes counters g0, g0 + 1, ... at once, words[w][l] word w of
// counter g0 + l. With AVX2 (the CPU kernels' AVX2 build) the rounds run 8 counters per vector:
// vpmuludq forms the 32 x 32 -> 64-bit products of the even and the odd lanes, about 8x the
// throughput of one counter at a time; elsewhere the counters run one after another.
constexpr int kPhiloxLanes = 16;
inline void philox4x32_10_lanes(uint64_t g0, uint64_t seed, uint32_t (&words)[4][kPhiloxLanes]) {
#if defined(__AVX2__)
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  // (high, low) 32-bit halves of a * m in each 32-bit lane of a
  const auto mulhilo = [](__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
    const __m256i even = _mm256_mul_epu32(a, m),
                  odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  };
  for (int half = 0; half < kPhiloxLanes; half += 8) {
    alignas(32) uint32_t lo32[8], hi32[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t g = g0 + static_cast<uint64_t>(half + l);
      lo32[l] = static_cast<uint32_t>(g), hi32[l] = static_cast<uint32_t>(g >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(c0, m0, hi0, lo0);
      mulhilo(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0] + half), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1] + half), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2] + half), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3] + half), c3);
  }
#else
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const Philox4 r = philox4x32_10(g0 + static_cast<uint64_t>(l), seed);
    for (int w = 0; w < 4; ++w) words[w][l] = r.x[w];
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
  if (((n + static_cast<uint64_t>(e)) & 3) != 0 && e < count) one_counter();  // align to a counter
  constexpr int64_t kRun = 4 * kPhiloxLanes;
  uint32_t words[4][kPhiloxLanes];
  for (; e + kRun <= count; e += kRun) {
    philox4x32_10_lanes((n + static_cast<uint64_t>(e)) >> 2, seed, words);
    for (int l = 0; l < kPhiloxLanes; ++l)
      for (int w = 0; w < 4; ++w) f[e + 4 * l + w] = words[w][l] >= threshold ? keep_scale : T(0);
  }
  while (e < count) one_counter();
}
#endif

}  // namespace pyformer
