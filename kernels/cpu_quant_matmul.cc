// Products of few rows of x with quantized weights for XLA:CPU (decode steps), called from JAX
// through the XLA FFI (see cpu_quant_matmul.py).
//
// Shape legend: R rows of x, K contracted dim, N output features (rows of the weights).
//   y [R, N] float32 = x [R, K] @ dequant(w [N, K])^T
// The weights stay as stored: GGUF blocks (uint8 [N, row_bytes], each row K / W blocks of B
// bytes, W weights a block) or int8 [N, K] with a float32 scale per output row (w = q * scale).
//
// Why: with few rows a product is a stream over the weights, bound by memory bandwidth; a
// 4.5-bit Q4_1 row is 7x fewer bytes than float32. Each block is read from memory once for all
// rows of x and decoded in registers to float32 (32 weights = 32 / kLanes vectors at a time, a
// "chunk"), then multiplied into float32 accumulators: the result equals a float32
// dequantize-then-matmul up to float rounding (no quantization of x, unlike llama.cpp's integer
// dot products against 8-bit-quantized activations).
//
// Layout of the work: output features in pieces of whole kLanes-feature groups shared out over
// XLA's intra-op threads. Within a group, rows of x in register groups of RG = 1, 2 or 4
// against NC = kLanes / RG features: kLanes vector accumulators, summed by one transposing
// reduction tree (cpu_vec.h). More than 4 rows take several row groups, each decoding the
// group's weights again from L1 (measured on SmolLM2's q|k|v, 16 rows: groups of 4 took 11 ms
// on one core, of 8 (NC = 2) 12.4 and of 16 (NC = 1) 15.6: decoding is cheaper than the
// accumulators' loads of x). K is cut in slices whose rows of x stay in L1.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "cpu_ffi_common.h"
#include "cpu_vec.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllm;  // vectors (cpu_vec.h) and the pool and dims_str (cpu_ffi_common.h)

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

// Each type's decode(block, f) calls f(c, w) for the chunks c of one block in order, w holding
// weights [32c, 32c + 32) of the block as float32, computed as the gguf package dequantizes
// (gguf/quants.py). Byte layouts are GGUF's (ggml-common.h).

struct Q4_0 {  // d f16, 16 bytes: weight j low nibble of byte j, weight 16 + j high; (q - 8) d
  static constexpr int kWeights = 32, kBytes = 18;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    const vf d = f16_splat(b);
    vf w[kVecs];
    for (int v = 0; v < kHalf; ++v) {
      const vi q = load_u8(b + 2 + v * kLanes);
      w[v] = to_vf((q & 15) - 8) * d;
      w[kHalf + v] = to_vf((q >> 4) - 8) * d;
    }
    f(0, w);
  }
};

struct Q4_1 {  // d f16, m f16, nibbles as Q4_0; q d + m
  static constexpr int kWeights = 32, kBytes = 20;
  template <typename F>
  static void decode(const uint8_t* b, F&& f) {
    const vf d = f16_splat(b), m = f16_splat(b + 2);
    vf w[kVecs];
    for (int v = 0; v < kHalf; ++v) {
      const vi q = load_u8(b + 4 + v * kLanes);
      w[v] = to_vf(q & 15) * d + m;
      w[kHalf + v] = to_vf(q >> 4) * d + m;
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
    const vi qh = vi{} + static_cast<int32_t>(bits);
    vf w[kVecs];
    for (int v = 0; v < kHalf; ++v) {
      const vi q = load_u8(b + 6 + v * kLanes);
      const vi lo = (q & 15) | ((qh >> lane_ids(v * kLanes)) & 1) << 4;
      const vi hi = (q >> 4) | ((qh >> lane_ids(16 + v * kLanes)) & 1) << 4;
      w[v] = to_vf(lo - 16) * d;
      w[kHalf + v] = to_vf(hi - 16) * d;
    }
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
    for (int i = 0; i < 16; ++i) scales[i] = d * static_cast<float>(static_cast<int8_t>(b[192 + i]));
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

// Bytes of x a row group's slice of K may take: half of a 32 kB L1, so that the slice stays
// there while the group's features are read against it (4 rows of a K = 4096 product: 64 kB).
constexpr int kSliceBytes = 16 << 10;

// y[r0:r0+RG, f:f+NC] (+)= x[r0:r0+RG, blocks b0..b1) . w[f:f+NC, same] for NC = kLanes / RG
// features: per block of each feature's row, the decoded chunks times RG rows of x (padded
// with zero rows), kLanes accumulators, then one transposing reduction tree; stored for the
// first slice of K (b0 == 0), added after. Features past N repeat the last one, not stored.
template <typename T, int RG>
inline void block(const float* x, const uint8_t* data, const float* scale, float* y, int R,
                  int K, int N, int64_t row_bytes, int r0, int f, int b0, int b1) {
  constexpr int NC = kLanes / RG;
  const uint8_t* rows[NC];
  for (int j = 0; j < NC; ++j) rows[j] = data + int64_t{std::min(f + j, N - 1)} * row_bytes;
  vf acc[RG][NC] = {};
  for (int blk = b0; blk < b1; ++blk) {
    auto feature = [&](int j) {
      const uint8_t* p = rows[j] + int64_t{blk} * T::kBytes;
      // The same block of the next features, every line of it (a prefetch never faults:
      // integer address). Without, one row ran at half the speed.
      for (int offset = 0; offset < T::kBytes; offset += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(
            reinterpret_cast<uintptr_t>(p) + NC * row_bytes + offset));
      const float* xb = x + int64_t{r0} * K + blk * T::kWeights;
      T::decode(p, [&](int c, const vf (&w)[kVecs]) {
        for (int i = 0; i < RG; ++i) {
          const float* xc = xb + int64_t{i} * K + c * kChunk;
          for (int v = 0; v < kVecs; ++v) acc[i][j] += w[v] * load_vec(xc + v * kLanes);
        }
      });
    };
    // Unrolled over features, the accumulators stay in registers; but a 256-weight block
    // unrolled over 16 features overflows the instruction cache (Q4_K, one row: 2x slower).
    if constexpr (T::kWeights == 32 || NC <= 4) {
#pragma GCC unroll 16
      for (int j = 0; j < NC; ++j) feature(j);
    } else {
#pragma GCC unroll 1
      for (int j = 0; j < NC; ++j) feature(j);
    }
  }
  vf in[kLanes];  // lane l of the sums is input bit_reversed(l): feed (i, j) there
  for (int i = 0; i < RG; ++i)
    for (int j = 0; j < NC; ++j) in[bit_reversed(i * NC + j)] = acc[i][j];
  const vf sums = transposed_sums(in);
  for (int i = 0; i < RG && r0 + i < R; ++i)
    for (int j = 0; j < NC && f + j < N; ++j) {
      float& out = y[int64_t{r0 + i} * N + f + j];
      const float sum = sums[i * NC + j] * (scale ? scale[f + j] : 1.0f);
      out = b0 == 0 ? sum : out + sum;
    }
}

// Features [f0, f1) (whole kLanes groups but the last): per group, rows of x in register
// groups of up to 4 (a group of RG rows takes NC features at a time), and K in
// slices whose RG rows of x fit kSliceBytes, each read against the group's kLanes features.
template <typename T>
void feature_range(const float* x, const uint8_t* data, const float* scale, float* y, int R,
                   int K, int N, int64_t row_bytes, int f0, int f1) {
  const int num_blocks = K / T::kWeights;
  for (int g = f0; g < f1; g += kLanes) {
    for (int r0 = 0; r0 < R;) {
      const int left = R - r0;
      auto run = [&]<int RG>() {
        constexpr int slice = std::max(1, kSliceBytes / (RG * 4 * T::kWeights));  // blocks
        for (int b0 = 0; b0 < num_blocks; b0 += slice)
          for (int f = g; f < std::min(g + kLanes, f1); f += kLanes / RG)
            block<T, RG>(x, data, scale, y, R, K, N, row_bytes, r0, f, b0,
                         std::min(num_blocks, b0 + slice));
        r0 += RG;
      };
      if (left == 1) run.template operator()<1>();
      else if (left == 2) run.template operator()<2>();
      else run.template operator()<4>();
    }
  }
}

struct NoState {};

template <typename T>
void product(ffi::ThreadPool& pool, int workers, const float* x, const uint8_t* data,
             const float* scale, float* y, int R, int K, int N, int64_t row_bytes) {
  // Pieces of whole feature groups, a few per thread so that a late thread is not waited on.
  const int groups = (N + kLanes - 1) / kLanes;
  const int pieces = std::max(1, std::min(groups, 4 * workers));
  jaxllm::parallel_for(pool, workers, pieces, [] { return NoState{}; },
                       [&](int64_t i, NoState&) {
                         const int f0 = int64_t{groups} * i / pieces * kLanes;
                         const int f1 = std::min<int64_t>(N, int64_t{groups} * (i + 1) / pieces * kLanes);
                         feature_range<T>(x, data, scale, y, R, K, N, row_bytes, f0, f1);
                       });
}

using Fn = void (*)(ffi::ThreadPool&, int, const float*, const uint8_t*, const float*, float*,
                    int, int, int, int64_t);

struct Type {
  const char* name;
  int weights, bytes;
  Fn fn;
};

// Indexed by the qtype attribute; the same order as _QTYPES in cpu_quant_matmul.py.
constexpr Type kTypes[] = {
    {"Q4_0", Q4_0::kWeights, Q4_0::kBytes, product<Q4_0>},
    {"Q4_1", Q4_1::kWeights, Q4_1::kBytes, product<Q4_1>},
    {"Q5_0", Q5_0::kWeights, Q5_0::kBytes, product<Q5_0>},
    {"Q8_0", Q8_0::kWeights, Q8_0::kBytes, product<Q8_0>},
    {"Q4_K", Q4_K::kWeights, Q4_K::kBytes, product<Q4_K>},
    {"Q5_K", Q5_K::kWeights, Q5_K::kBytes, product<Q5_K>},
    {"Q6_K", Q6_K::kWeights, Q6_K::kBytes, product<Q6_K>},
    {"int8", Int8::kWeights, Int8::kBytes, product<Int8>},
};
constexpr int kInt8 = 7;

// x [R, K] as float32, kLanes zero rows appended (the last register group's padding).
template <typename XT>
std::vector<float> x_as_f32(const ffi::AnyBuffer& x, int64_t rows, int64_t cols) {
  const XT* p = static_cast<const XT*>(x.untyped_data());
  std::vector<float> out((rows + kLanes) * cols, 0.0f);
  for (int64_t i = 0; i < rows * cols; ++i) out[i] = to_f32(p[i]);
  return out;
}

ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer data,
                           ffi::AnyBuffer scale, int32_t qtype, int32_t num_threads,
                           ffi::Result<ffi::AnyBuffer> y) {
  auto bad = [](std::string what) {
    return ffi::Error::InvalidArgument("cpu quantized matmul: " + what);
  };
  if (qtype < 0 || qtype >= static_cast<int>(std::size(kTypes)))
    return bad("unknown qtype " + std::to_string(qtype));
  const Type& type = kTypes[qtype];
  auto xd = x.dimensions(), wd = data.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return bad("expected x [R, K], data [N, row_bytes], y [R, N]; got x " + dims_str(xd) +
               ", data " + dims_str(wd) + ", y " + dims_str(yd));
  const int64_t R = xd[0], K = xd[1], N = wd[0];
  if (K % type.weights != 0 || wd[1] != K / type.weights * type.bytes || yd[0] != R ||
      yd[1] != N)
    return bad(std::string(type.name) + ": inconsistent shapes x " + dims_str(xd) + ", data " +
               dims_str(wd) + ", y " + dims_str(yd));
  const bool int8 = qtype == kInt8;
  if (data.element_type() != (int8 ? ffi::DataType::S8 : ffi::DataType::U8))
    return bad(std::string("data must be ") + (int8 ? "int8" : "uint8"));
  if (y->element_type() != ffi::DataType::F32) return bad("y must be float32");
  if (int8 && (scale.element_type() != ffi::DataType::F32 || scale.dimensions().size() != 1 ||
               scale.dimensions()[0] != N))
    return bad("int8 needs a float32 scale [N]; got " + dims_str(scale.dimensions()));
  std::vector<float> x32;
  switch (x.element_type()) {
    case ffi::DataType::F32: x32 = x_as_f32<float>(x, R, K); break;
    case ffi::DataType::BF16: x32 = x_as_f32<BF16>(x, R, K); break;
    default: return bad("x must be float32 or bfloat16");
  }
  if (R == 0 || N == 0) return ffi::Error::Success();
  type.fn(pool, jaxllm::num_workers(pool, num_threads), x32.data(),
          static_cast<const uint8_t*>(data.untyped_data()),
          int8 ? static_cast<const float*>(scale.untyped_data()) : nullptr,
          static_cast<float*>(y->untyped_data()), static_cast<int>(R), static_cast<int>(K),
          static_cast<int>(N), wd[1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQuantMatmul, QuantMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x [R, K]
                                  .Arg<ffi::AnyBuffer>()   // data [N, row_bytes] (int8: [N, K])
                                  .Arg<ffi::AnyBuffer>()   // scale [N] (int8), else unused
                                  .Attr<int32_t>("qtype")
                                  .Attr<int32_t>("num_threads")
                                  .Ret<ffi::AnyBuffer>());  // y [R, N] float32
