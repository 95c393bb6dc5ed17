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
// accumulators' loads of x). K is cut in slices whose rows of x stay in L1. An output's
// summation order does not depend on R (batch invariant: row i of a product is bitwise the
// same whatever the other rows).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_ffi_common.h"
#include "cpu_quant_blocks.h"
#include "cpu_vec.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllm;         // vectors (cpu_vec.h), the pool and dims_str (cpu_ffi_common.h)
using namespace jaxllm::quant;  // block types (cpu_quant_blocks.h)

// Weights of K per slice: 4 rows of x over a slice take half of a 32 kB L1, so that the slice
// stays there while a group's features are read against it (4 rows of K = 4096: 64 kB). The
// same for every row group, so that an output's summation order does not depend on R.
constexpr int kSliceWeights = 1024;

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
// groups of up to 4 (a group of RG rows takes NC features at a time), and K in slices of
// kSliceWeights, each read against the group's kLanes features.
template <typename T>
void feature_range(const float* x, const uint8_t* data, const float* scale, float* y, int R,
                   int K, int N, int64_t row_bytes, int f0, int f1) {
  const int num_blocks = K / T::kWeights;
  for (int g = f0; g < f1; g += kLanes) {
    for (int r0 = 0; r0 < R;) {
      const int left = R - r0;
      auto run = [&]<int RG>() {
        constexpr int slice = kSliceWeights / T::kWeights;  // blocks
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
                         const int f1 = std::min<int64_t>(
                             N, int64_t{groups} * (i + 1) / pieces * kLanes);
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
  const bool int8 = qtype == kInt8;
  auto xd = x.dimensions(), wd = data.dimensions();
  const std::string error = jaxllm::quantized_operands_error(
      type.name, type.weights, type.bytes, 1, int8, xd, data, scale, *y);
  if (!error.empty()) return bad(error);
  const int64_t R = xd[0], K = xd[1], N = wd[0];
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
