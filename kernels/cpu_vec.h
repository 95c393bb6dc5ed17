// Vectors, bfloat16 and lane reductions for the FFI kernels of this directory. Vectors are GCC
// vector extensions, so the kernels carry no intrinsics (but for widening bytes, see
// widen_bytes) and build for any -march (the build uses -march=native).
#ifndef JAXLLM_KERNELS_CPU_VEC_H_
#define JAXLLM_KERNELS_CPU_VEC_H_

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace jaxllm {

// Floats per vector: one AVX-512 register, else 8 (one AVX2 register, two NEON ones).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
// Unaligned, aliasing views of rows in memory, which start at any element.
typedef float vf_row __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
typedef uint16_t vh_row
    __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2), may_alias));

struct BF16 {
  uint16_t bits;
};

// float8_e4m3fn (OCP E4M3: 4 exponent bits, bias 7, 3 mantissa bits, no infinities), as a
// quantized KV cache stores it: only ever widened here.
struct F8E4M3 {
  uint8_t bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(BF16 x) {
  uint32_t bits = uint32_t{x.bits} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void from_f32(float x, float* dst) { *dst = x; }
inline void from_f32(float x, BF16* dst) {  // round to nearest even, as XLA's convert
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN: keep it one (rounding could carry out)
    dst->bits = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return;
  }
  dst->bits = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// kLanes elements from memory as float32 (bfloat16 is the top half of a float32: widen, shift).
inline vf load_vec(const float* src) { return *reinterpret_cast<const vf_row*>(src); }
inline vf load_vec(const BF16* src) {
  return (vf)(__builtin_convertvector(*reinterpret_cast<const vh_row*>(src), vi) << 16);
}

// kLanes bytes widened to 32-bit lanes, sign- or zero-extended. The one place with intrinsics:
// GCC 12 turns __builtin_convertvector of a byte vector (and byte shuffles into lanes) into
// scalar code, ~20 ns a vector on this machine against ~2 for vpmovsxbd: a 64-row SmolLM2
// decode's attention on an int8 cache took 1.5-2x the float32 cache's time through it. Other
// targets get the portable element loop.
template <bool kSigned>
inline vi widen_bytes(const void* src) {
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(static_cast<const __m128i*>(src));
  return (vi)(kSigned ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(static_cast<const __m128i*>(src));
  return (vi)(kSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
#else
  vi lanes;
  for (int i = 0; i < kLanes; ++i)
    lanes[i] = kSigned ? static_cast<const int8_t*>(src)[i] : static_cast<const uint8_t*>(src)[i];
  return lanes;
#endif
}

inline vf load_vec(const int8_t* src) { return __builtin_convertvector(widen_bytes<true>(src), vf); }
// E4M3 -> float32 exactly: a normal number's exponent and mantissa bits moved into float32's
// place with the bias changed from 7 to 127 (+120 in the exponent field); a subnormal one
// (exponent 0) is mantissa * 2^-9. (The NaN pattern 0x7F, never written, reads as 480.)
inline vf load_vec(const F8E4M3* src) {
  const vi bits = widen_bytes<false>(src);
  const vi magnitude = bits & 0x7F;
  const vf normal = (vf)((magnitude << 20) + (120 << 23));
  const vf subnormal = __builtin_convertvector(magnitude, vf) * (1.0f / 512);
  const vf value = magnitude < 8 ? subnormal : normal;
  return (vf)((vi)value | ((bits & 0x80) << 24));
}

inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// Sum or max over the lanes, by log2(kLanes) halvings: lane l meets lane l ^ h.
template <int h, typename Op, int... l>
inline vf lane_halving(vf v, Op op, std::integer_sequence<int, l...>) {
  v = op(v, __builtin_shufflevector(v, v, (l ^ h)...));
  if constexpr (h > 1) v = lane_halving<h / 2>(v, op, std::integer_sequence<int, l...>{});
  return v;
}
template <typename Op>
inline float lane_reduce(vf v, Op op) {
  return lane_halving<kLanes / 2>(v, op, std::make_integer_sequence<int, kLanes>{})[0];
}
inline float lane_sum(vf v) { return lane_reduce(v, [](vf a, vf b) { return a + b; }); }
inline float lane_max(vf v) { return lane_reduce(v, vmax); }

// Lane sums of kLanes vectors as one vector, in kLanes - 1 folds of two shuffles and an add
// (against kLanes separate halving sums). A fold of two vectors made of blocks of 2h lanes (each
// block the partial sums of one input) halves every block and interleaves the halves: within
// each block, h lanes from a then h from b. The levels h = kLanes / 2, ..., 1 leave lane l
// holding the sum of input bit_reversed(l); callers feed the inputs in that order to get sums
// in natural order.
constexpr int bit_reversed(int l) {
  int r = 0;
  for (int bit = 1; bit < kLanes; bit <<= 1, l >>= 1) r = (r << 1) | (l & 1);
  return r;
}

// Index, into the concatenation of a and b, of the element that output lane l takes in the
// first (offset 0) or second (offset h) shuffle of a fold.
constexpr int fold_source(int h, int l, int offset) {
  const int block = l / (2 * h) * (2 * h), within = l % (2 * h);
  return within < h ? block + within + offset : kLanes + block + within - h + offset;
}

template <int h, int... l>
inline vf fold(vf a, vf b, std::integer_sequence<int, l...>) {
  return __builtin_shufflevector(a, b, fold_source(h, l, 0)...) +
         __builtin_shufflevector(a, b, fold_source(h, l, h)...);
}

// Folds x[0 .. 2h) into x[0 .. h), then on down to x[0].
template <int h>
inline void fold_level(vf* x) {
  for (int i = 0; i < h; ++i)
    x[i] = fold<h>(x[2 * i], x[2 * i + 1], std::make_integer_sequence<int, kLanes>{});
  if constexpr (h > 1) fold_level<h / 2>(x);
}

inline vf transposed_sums(vf (&x)[kLanes]) {
  fold_level<kLanes / 2>(x);
  return x[0];
}

}  // namespace jaxllm

#endif  // JAXLLM_KERNELS_CPU_VEC_H_
