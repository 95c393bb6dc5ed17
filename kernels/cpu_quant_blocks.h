// GGUF block types decoded to float32 vectors, for cpu_quant_matmul.cc: each type's
// decode(block, f) calls f(c, w) for the chunks c of one block in order, w holding weights
// [32c, 32c + 32) of the block as float32 (32 / kLanes vectors), computed as the gguf package
// dequantizes (gguf/quants.py). Byte layouts are GGUF's (ggml-common.h).
#ifndef JAXLLM_KERNELS_CPU_QUANT_BLOCKS_H_
#define JAXLLM_KERNELS_CPU_QUANT_BLOCKS_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_vec.h"

namespace jaxllm::quant {

constexpr int kChunk = 32;                // weights decoded at once
constexpr int kVecs = kChunk / kLanes;    // vectors of a chunk
constexpr int kHalf = kVecs / 2;          // vectors of 16 weights
static_assert(kVecs % 2 == 0, "a chunk is two halves of 16 weights");

// kLanes bytes from p, unsigned or signed, widened to int32 lanes: one vpmovzxbd / vpmovsxbd
// (GCC 12 widens a byte vector through __builtin_convertvector a byte at a time).
inline vi load_u8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  vi v;
  for (int l = 0; l < kLanes; ++l) v[l] = p[l];
  return v;
#endif
}
inline vi load_s8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  vi v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<int8_t>(p[l]);
  return v;
#endif
}
inline vf to_vf(vi v) { return __builtin_convertvector(v, vf); }

inline float f16(const uint8_t* p) {
  _Float16 h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
}

// The float16 at p in every lane: one broadcast and one conversion.
inline vf f16_splat(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h)));
#elif defined(__AVX2__) && defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(h)));
#else
  return splat(f16(p));
#endif
}

// Lane indices 0, 1, ..., kLanes - 1 plus an offset (shift counts for the high bits).
inline vi lane_ids(int offset) {
  vi ids;
  for (int l = 0; l < kLanes; ++l) ids[l] = l + offset;
  return ids;
}

// The two float16 scales at p and p + 2 (d and m) in every lane: one conversion for both.
inline void f16_pair_splat(const uint8_t* p, vf& d, vf& m) {
#if defined(__AVX512F__)
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  const __m128 both = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(bits)));
  d = (vf)_mm512_broadcastss_ps(both);
  m = (vf)_mm512_broadcastss_ps(_mm_movehdup_ps(both));
#else
  d = f16_splat(p);
  m = f16_splat(p + 2);
#endif
}

// A 4-bit weight's float, q d + m, for the nibble in the low 4 bits of each lane of q (higher
// bits ignored). AVX-512: one vpermps from the block's table of the 16 values, instead of a
// mask, a conversion and a multiply-add (one row of SmolLM2's q|k|v: 11% faster).
struct Nibbles {
#if defined(__AVX512F__)
  vf table;
  Nibbles(vf d, vf m) {
    vf ids;
    for (int l = 0; l < kLanes; ++l) ids[l] = static_cast<float>(l);
    table = ids * d + m;
  }
  vf operator()(vi q) const { return (vf)_mm512_permutexvar_ps((__m512i)q, (__m512)table); }
#else
  vf d, m;
  Nibbles(vf d, vf m) : d(d), m(m) {}
  vf operator()(vi q) const { return to_vf(q & 15) * d + m; }
#endif
};

struct Q4_0 {  // d f16, 16 bytes: weight j low nibble of byte j, weight 16 + j high; (q - 8) d
  static constexpr int kWeights = 32, kBytes = 18;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    const vf d = f16_splat(b);
    const Nibbles value(d, d * -8.0f);  // q d - 8 d: rounded once, as (q - 8) d (exact 8 d)
    vf w[kVecs];
    for (int v = 0; v < kHalf; ++v) {
      const vi q = load_u8(b + 2 + v * kLanes);
      w[v] = value(q);
      w[kHalf + v] = value(q >> 4);
    }
    f(0, w);
  }
};

struct Q4_1 {  // d f16, m f16, nibbles as Q4_0; q d + m
  static constexpr int kWeights = 32, kBytes = 20;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    vf d, m;
    f16_pair_splat(b, d, m);
    const Nibbles value(d, m);
    vf w[kVecs];
    for (int v = 0; v < kHalf; ++v) {
      const vi q = load_u8(b + 4 + v * kLanes);
      w[v] = value(q);
      w[kHalf + v] = value(q >> 4);
    }
    f(0, w);
  }
};

struct Q5_0 {  // d f16, qh u32 (bit j: 5th bit of weight j), nibbles as Q4_0; (q - 16) d
  static constexpr int kWeights = 32, kBytes = 22;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    const vf d = f16_splat(b);
    uint32_t bits;
    std::memcpy(&bits, b + 2, sizeof(bits));
    vf w[kVecs];
#if defined(__AVX512F__)
    // The 32 values (q - 16) d as two tables, q's 5th bit set under a lane mask tested on qh,
    // and one two-table vpermt2ps per 16 weights (Gemma 3's gate/up, one row: 1.2x faster).
    vf low_ids, high_ids;
    for (int l = 0; l < kLanes; ++l) {
      low_ids[l] = static_cast<float>(l - 16);
      high_ids[l] = static_cast<float>(l);
    }
    const __m512 low = (__m512)(low_ids * d), high = (__m512)(high_ids * d);
    const __m512i qh = _mm512_set1_epi32(static_cast<int>(bits)), sixteen = _mm512_set1_epi32(16);
    const __m512i q = (__m512i)load_u8(b + 6), lo = _mm512_and_si512(q, _mm512_set1_epi32(15));
    const __m512i hi = _mm512_srli_epi32(q, 4);
    const __m512i lo_bit = _mm512_sllv_epi32(_mm512_set1_epi32(1), (__m512i)lane_ids(0));
    const __m512i hi_bit = _mm512_slli_epi32(lo_bit, 16);
    const __m512i lo5 = _mm512_mask_or_epi32(lo, _mm512_test_epi32_mask(qh, lo_bit), lo, sixteen);
    const __m512i hi5 = _mm512_mask_or_epi32(hi, _mm512_test_epi32_mask(qh, hi_bit), hi, sixteen);
    w[0] = (vf)_mm512_permutex2var_ps(low, lo5, high);
    w[1] = (vf)_mm512_permutex2var_ps(low, hi5, high);
#else
    const vi qh = vi{} + static_cast<int32_t>(bits);
    for (int v = 0; v < kHalf; ++v) {
      const vi q = load_u8(b + 6 + v * kLanes);
      const vi lo = (q & 15) | ((qh >> lane_ids(v * kLanes)) & 1) << 4;
      const vi hi = (q >> 4) | ((qh >> lane_ids(16 + v * kLanes)) & 1) << 4;
      w[v] = to_vf(lo - 16) * d;
      w[kHalf + v] = to_vf(hi - 16) * d;
    }
#endif
    f(0, w);
  }
};

struct Q8_0 {  // d f16, 32 int8; q d
  static constexpr int kWeights = 32, kBytes = 34;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    const vf d = f16_splat(b);
    vf w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = to_vf(load_s8(b + 2 + v * kLanes)) * d;
    f(0, w);
  }
};

struct Int8 {  // a row of int8 weights; the row's scale is applied to the sums
  static constexpr int kWeights = 32, kBytes = 32;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    vf w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = to_vf(load_s8(b + v * kLanes));
    f(0, w);
  }
};

// Q4_K / Q5_K: 8 chunks with 6-bit scale sc and min m each, packed in 12 bytes s:
// c < 4: sc = s[c] & 63, m = s[c + 4] & 63; else sc = s[c + 4] & 15 | (s[c - 4] >> 6) << 4,
// m = s[c + 4] >> 4 | (s[c] >> 6) << 4. Weight (d sc) q - (dmin m).
inline void k_scales(const uint8_t* b, float (&ds)[8], float (&dm)[8]) {
  const float d = f16(b), dmin = f16(b + 2);
  const uint8_t* s = b + 4;
  for (int c = 0; c < 8; ++c) {
    const int sc = c < 4 ? s[c] & 63 : (s[c + 4] & 15) | (s[c - 4] >> 6) << 4;
    const int m = c < 4 ? s[c + 4] & 63 : (s[c + 4] >> 4) | (s[c] >> 6) << 4;
    ds[c] = d * static_cast<float>(sc);
    dm[c] = dmin * static_cast<float>(m);
  }
}

struct Q4_K {  // d, dmin f16, scales 12, qs 128: chunk c low (c even) or high nibbles of
               // qs[32 (c / 2) ...]
  static constexpr int kWeights = 256, kBytes = 144;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    float ds[8], dm[8];
    k_scales(b, ds, dm);
    for (int p = 0; p < 4; ++p) {
      vf lo[kVecs], hi[kVecs];
      for (int v = 0; v < kVecs; ++v) {
        const vi q = load_u8(b + 16 + 32 * p + v * kLanes);
        lo[v] = to_vf(q & 15) * ds[2 * p] - dm[2 * p];
        hi[v] = to_vf(q >> 4) * ds[2 * p + 1] - dm[2 * p + 1];
      }
      f(2 * p, lo);
      f(2 * p + 1, hi);
    }
  }
};

struct Q5_K {  // as Q4_K, then qh 32 bytes (bit c of qh[i]: 5th bit of chunk c's weight i),
               // then qs 128
  static constexpr int kWeights = 256, kBytes = 176;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    float ds[8], dm[8];
    k_scales(b, ds, dm);
    vi qh[kVecs];
    for (int v = 0; v < kVecs; ++v) qh[v] = load_u8(b + 16 + v * kLanes);
    for (int p = 0; p < 4; ++p) {
      vf lo[kVecs], hi[kVecs];
      for (int v = 0; v < kVecs; ++v) {
        const vi q = load_u8(b + 48 + 32 * p + v * kLanes);
        const vi h = qh[v] >> (2 * p);
        lo[v] = to_vf((q & 15) | (h & 1) << 4) * ds[2 * p] - dm[2 * p];
        hi[v] = to_vf((q >> 4) | (h & 2) << 3) * ds[2 * p + 1] - dm[2 * p + 1];
      }
      f(2 * p, lo);
      f(2 * p + 1, hi);
    }
  }
};

struct Q6_K {  // ql 128, qh 64, 16 int8 scales (one per 16 weights), d f16. Chunk c = 4h + k:
               // low 4 bits from ql[64h + 32 (k % 2) + i] >> 4 (k / 2), high 2 from
               // qh[32h + i] >> 2k; weight d scale (q - 32)
  static constexpr int kWeights = 256, kBytes = 210;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    const float d = f16(b + 208);
    float scales[16];
    for (int i = 0; i < 16; ++i)
      scales[i] = d * static_cast<float>(static_cast<int8_t>(b[192 + i]));
    for (int h = 0; h < 2; ++h) {
      vi qh[kVecs];
      for (int v = 0; v < kVecs; ++v) qh[v] = load_u8(b + 128 + 32 * h + v * kLanes);
      for (int k = 0; k < 4; ++k) {
        const int c = 4 * h + k;
        vf w[kVecs];
        for (int v = 0; v < kVecs; ++v) {
          const vi ql = load_u8(b + 64 * h + 32 * (k % 2) + v * kLanes) >> (4 * (k / 2));
          const vi q = ((ql & 15) | ((qh[v] >> (2 * k)) & 3) << 4) - 32;
          w[v] = to_vf(q) * scales[2 * c + v / kHalf];
        }
        f(c, w);
      }
    }
  }
};

}  // namespace jaxllm::quant

#endif  // JAXLLM_KERNELS_CPU_QUANT_BLOCKS_H_
