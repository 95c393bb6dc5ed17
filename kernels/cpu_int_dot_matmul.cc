// Products of few rows of x with quantized weights as integer dot products, for XLA:CPU decode
// steps (AVX-512 VNNI), called from JAX through the XLA FFI (see cpu_int_dot_matmul.py).
//
// Shape legend: R rows of x, K contracted dim, N output features, G = N / 16 feature groups,
// NB = K / 32 blocks of 32 weights along K.
//   y [R, N] float32 = x [R, K] @ dequant(w [N, K])^T
//
// Why: the float kernel (cpu_quant_matmul.cc) decodes every weight to float32 and is bound by
// that arithmetic, not by memory (SmolLM2's Q4_1 at one row: ~7 GB/s of a ~25 GB/s machine).
// Here each row of x is quantized once per call to int16 in blocks of 32 (scale dx = max |x| /
// 32767, q = round(x / dx)), and one vpdpwssd multiplies 32 weights, widened to int16, by x's
// and sums them in pairs into 16 int32 lanes, one lane per output feature. x's rounding to 16
// bits changes a product by ~1e-5 of a block's magnitude: the result is a float32 product up to
// rounding, where llama.cpp's 8-bit activations move it by ~0.5% (enough to change greedy
// text; measured on the README's demo prompt). The integer sums are exact.
//
// Layout ("interleaved", made at load by jaxllm/quantization/interleaved.py): the weights of
// 16 consecutive features for one block of 32 weights along K are one "block group" of 16 x
// the GGUF block's bytes, so that lane f of a vector is feature f:
//   the float16 scales d of the 16 features (32 bytes), for Q4_1 then their float16 mins m;
//   then the payload words: word c of every feature in turn, [c][feature 0..15][2 bytes].
// Q4_0/Q4_1 payload: GGUF's 16 nibble bytes (byte j: weight j low, weight j + 16 high), words
// c = 0..7. Q8_0 and int8: the 32 int8 weights, words c = 0..15. int8 has no block header: its
// scale is per feature (float32 [N]). Groups follow each other along N; a group's NB block
// groups along K.
//
// Per block b, row r and 16 features: the int32 lanes start at -offset * sum(q_x of block b)
// (offset 8 for Q4_0's unsigned nibbles, else 0) and take 16 vpdpwssd, each with 2 x values
// broadcast: the exact integer sum of q_w q_x. Then y += float(sum) * dx_b * d (Q4_1: + m *
// dx_b * sum(q_x)). Every output's order of summation is the block order, whatever R: row i of
// a product is bitwise the same whatever the other rows (batch invariant).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_ffi_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define JAXLLM_INT_DOT 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kGroup = 16;   // features per group (one 512-bit vector of float32)
constexpr int kBlock = 32;   // weights per block along K
constexpr int kMaxRowGroup = 8;

// x quantized per block: int16 [R, K] (read as int32 words of 2), and per (row, block) the
// scale dx and the sum of the block's q.
struct QuantizedX {
  int rows, blocks;
  std::vector<int16_t> q;
  std::vector<float> dx;
  std::vector<int32_t> sum;
  const int32_t* words(int r) const {
    return reinterpret_cast<const int32_t*>(q.data()) + int64_t{r} * blocks * (kBlock / 2);
  }
};

// Rows past R (padding of the last row group) stay zero: dx = 0, q = 0.
QuantizedX quantize_x(const float* x, int R, int K, int padded_rows) {
  QuantizedX out{padded_rows, K / kBlock, std::vector<int16_t>(int64_t{padded_rows} * K),
                 std::vector<float>(int64_t{padded_rows} * (K / kBlock)),
                 std::vector<int32_t>(int64_t{padded_rows} * (K / kBlock))};
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < K / kBlock; ++b) {
      const float* xb = x + int64_t{r} * K + b * kBlock;
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::abs(xb[i]));
      const float d = amax / 32767.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
      int16_t* qb = out.q.data() + int64_t{r} * K + b * kBlock;
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        qb[i] = static_cast<int16_t>(std::nearbyint(xb[i] * inv));
        sum += qb[i];
      }
      out.dx[int64_t{r} * out.blocks + b] = d;
      out.sum[int64_t{r} * out.blocks + b] = sum;
    }
  return out;
}

#ifdef JAXLLM_INT_DOT

// One type's block group: its bytes, the x offset of its weights (Q4_0's nibbles are q + 8),
// whether it has float16 scales d (and mins m) in a header of Header bytes, and how its 16
// vectors of 16 features x 2 weights widened to int16 load (vector c pairs with x word c).
template <int Bytes, int Offset, int Header, bool Scaled, bool Min, bool Nibbles>
struct Layout {
  static constexpr int kBytes = Bytes, kOffset = Offset;
  static constexpr bool kScaled = Scaled, kMin = Min;
  static void weights(const uint8_t* p, __m512i (&w)[16]) {
    const uint8_t* words = p + Header;
    for (int c = 0; c < (Nibbles ? 8 : 16); ++c) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + 32 * c));
      if constexpr (Nibbles) {   // word c: weights 2c, 2c + 1 low nibbles; 16 + 2c, 17 + 2c high
        const __m512i v = _mm512_cvtepu8_epi16(bytes);
        w[c] = _mm512_and_si512(v, _mm512_set1_epi16(0x0F));
        w[8 + c] = _mm512_srli_epi16(v, 4);
      } else {
        w[c] = _mm512_cvtepi8_epi16(bytes);
      }
    }
  }
};
using Q4_0 = Layout<16 * 18, 8, 32, true, false, true>;
using Q4_1 = Layout<16 * 20, 0, 64, true, true, true>;
using Q8_0 = Layout<16 * 34, 0, 32, true, false, false>;
using Int8 = Layout<16 * 32, 0, 0, false, false, false>;

inline __m512 f16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Feature groups [g0, g1), rows [r0, r0 + RG) of the quantized x (padded to whole row groups).
template <typename T, int RG>
void groups(const QuantizedX& xq, const uint8_t* data, const float* scale, float* y, int R,
            int N, int g0, int g1, int r0) {
  const int nb = xq.blocks;
  for (int g = g0; g < g1; ++g) {
    const uint8_t* p = data + int64_t{g} * nb * T::kBytes;
    __m512 acc[RG];
    for (int i = 0; i < RG; ++i) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b, p += T::kBytes) {
      __m512i w[16];
      T::weights(p, w);
      __m512 d = _mm512_set1_ps(1.0f), m = d;
      if constexpr (T::kScaled) d = f16x16(p);
      if constexpr (T::kMin) m = f16x16(p + 32);
#pragma GCC unroll 16
      for (int i = 0; i < RG; ++i) {
        const int r = r0 + i;
        const int64_t rb = int64_t{r} * nb + b;
        const int32_t* xw = xq.words(r) + b * (kBlock / 2);
        __m512i s = _mm512_set1_epi32(-T::kOffset * xq.sum[rb]);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) s = _mm512_dpwssd_epi32(s, w[c], _mm512_set1_epi32(xw[c]));
        const __m512 dx = _mm512_set1_ps(xq.dx[rb]);
        acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), dx), d, acc[i]);
        if constexpr (T::kMin)
          acc[i] = _mm512_fmadd_ps(m, _mm512_mul_ps(dx, _mm512_set1_ps(xq.sum[rb])), acc[i]);
      }
    }
    const __m512 s = scale ? _mm512_loadu_ps(scale + g * kGroup) : _mm512_set1_ps(1.0f);
    for (int i = 0; i < RG && r0 + i < R; ++i)
      _mm512_storeu_ps(y + int64_t{r0 + i} * N + g * kGroup, _mm512_mul_ps(acc[i], s));
  }
}

// The last row group is computed at its own size: at 1-4 rows the kernel is bound by reading
// the weights, above by the vpdpwssd (SmolLM2's [3072, 576] Q4_1, 2 cores: 4 rows 2.1 ms, 8
// rows 4.1 ms for 30 matrices), so 5 rows padded to 8 would cost 8.
template <typename T>
void row_group(int rows, const QuantizedX& xq, const uint8_t* data, const float* scale,
               float* y, int R, int N, int g0, int g1, int r0) {
  switch (rows) {
    case 1: return groups<T, 1>(xq, data, scale, y, R, N, g0, g1, r0);
    case 2: return groups<T, 2>(xq, data, scale, y, R, N, g0, g1, r0);
    case 3: return groups<T, 3>(xq, data, scale, y, R, N, g0, g1, r0);
    case 4: return groups<T, 4>(xq, data, scale, y, R, N, g0, g1, r0);
    case 5: return groups<T, 5>(xq, data, scale, y, R, N, g0, g1, r0);
    case 6: return groups<T, 6>(xq, data, scale, y, R, N, g0, g1, r0);
    case 7: return groups<T, 7>(xq, data, scale, y, R, N, g0, g1, r0);
    default: return groups<T, kMaxRowGroup>(xq, data, scale, y, R, N, g0, g1, r0);
  }
}

template <typename T>
void product(ffi::ThreadPool& pool, int workers, const QuantizedX& xq, const uint8_t* data,
             const float* scale, float* y, int R, int N) {
  const int G = N / kGroup;
  const int pieces = std::max(1, std::min(G, 4 * workers));
  jaxllm::parallel_for(pool, workers, pieces, [] { return 0; }, [&](int64_t i, int&) {
    const int g0 = int64_t{G} * i / pieces, g1 = int64_t{G} * (i + 1) / pieces;
    for (int r0 = 0; r0 < R; r0 += kMaxRowGroup)
      row_group<T>(std::min(R - r0, kMaxRowGroup), xq, data, scale, y, R, N, g0, g1, r0);
  });
}

using Fn = void (*)(ffi::ThreadPool&, int, const QuantizedX&, const uint8_t*, const float*,
                    float*, int, int);

#endif  // JAXLLM_INT_DOT

struct Type {
  const char* name;
  int bytes_per_block;   // of one feature
#ifdef JAXLLM_INT_DOT
  Fn fn;
#endif
};

// Indexed by the qtype attribute; the same order as QTYPES in cpu_int_dot_matmul.py.
#ifdef JAXLLM_INT_DOT
constexpr Type kTypes[] = {{"Q4_0", 18, product<Q4_0>}, {"Q4_1", 20, product<Q4_1>},
                           {"Q8_0", 34, product<Q8_0>}, {"int8", 32, product<Int8>}};
#else
constexpr Type kTypes[] = {{"Q4_0", 18}, {"Q4_1", 20}, {"Q8_0", 34}, {"int8", 32}};
#endif
constexpr int kInt8 = 3;

ffi::Error IntDotMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer data,
                             ffi::AnyBuffer scale, int32_t qtype, int32_t num_threads,
                             ffi::Result<ffi::AnyBuffer> y) {
  auto bad = [](std::string what) {
    return ffi::Error::InvalidArgument("cpu integer-dot matmul: " + what);
  };
#ifndef JAXLLM_INT_DOT
  return bad("built without AVX-512 VNNI (this machine lacks it)");
#else
  if (qtype < 0 || qtype >= static_cast<int>(std::size(kTypes)))
    return bad("unknown qtype " + std::to_string(qtype));
  const Type& type = kTypes[qtype];
  const bool int8 = qtype == kInt8;
  auto xd = x.dimensions();
  const std::string error = jaxllm::quantized_operands_error(
      type.name, kBlock, type.bytes_per_block, kGroup, int8, xd, data, scale, *y);
  if (!error.empty()) return bad(error);
  if (x.element_type() != ffi::DataType::F32) return bad("x must be float32");
  const int64_t R = xd[0], K = xd[1], N = data.dimensions()[0];
  if (R == 0 || N == 0) return ffi::Error::Success();
  const int padded = (R + kMaxRowGroup - 1) / kMaxRowGroup * kMaxRowGroup;
  const QuantizedX xq = quantize_x(static_cast<const float*>(x.untyped_data()),
                                   static_cast<int>(R), static_cast<int>(K), padded);
  type.fn(pool, jaxllm::num_workers(pool, num_threads), xq,
          static_cast<const uint8_t*>(data.untyped_data()),
          int8 ? static_cast<const float*>(scale.untyped_data()) : nullptr,
          static_cast<float*>(y->untyped_data()), static_cast<int>(R), static_cast<int>(N));
  return ffi::Error::Success();
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmIntDotMatmul, IntDotMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x [R, K] float32
                                  .Arg<ffi::AnyBuffer>()   // data [N, row_bytes], interleaved
                                  .Arg<ffi::AnyBuffer>()   // scale [N] (int8), else unused
                                  .Attr<int32_t>("qtype")
                                  .Attr<int32_t>("num_threads")
                                  .Ret<ffi::AnyBuffer>());  // y [R, N] float32
