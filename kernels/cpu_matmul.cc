// Matrix products of few rows for XLA:CPU (decode steps), called from JAX through the XLA FFI
// (see cpu_matmul.py).
//
// Shape legend: R rows of x, D contracted dim, F output columns. Two layouts of the weights:
//   NN: y [R, F] = x [R, D] @ w [D, F]      (a Dense kernel as stored: [in, out])
//   NT: y [R, F] = x [R, D] @ w [F, D]^T    (a tied embedding table as stored: [V, D])
// x and w are float32 or bfloat16 (each its own); products accumulate in float32 and y is
// float32 or bfloat16 (rounded to nearest even).
//
// Why: with few rows a product is a stream over the weights, bound by memory bandwidth, and
// XLA:CPU's dot does not stream them at it. On SmolLM2-135M's shapes (2-core AVX-512 VM, 30
// products chained as in a model), XLA read the weights at ~21 GB/s for one row, ~14 GB/s for
// two and ~8.5 GB/s for four, against ~30 GB/s that a plain reduction reads.
//
// Layout of the work: the weights are cut into contiguous pieces shared out over the threads
// (NN: ranges of d, each summing into its own [R, F] float32 partial, added up at the end; NT:
// ranges of whole 64-column groups). Each weight vector is loaded from memory once and used for
// every row of x:
//   NN: passes of kRowsPerPass rows of w (as many sequential streams), read across in register
//       blocks of kBlockVecs vectors x up to 4 rows of x, the partial sums loaded and stored
//       once per pass; the next pass's rows are prefetched as the block goes;
//   NT: kLanes / RG output columns (contiguous rows of w) at a time against RG = 1, 2 or 4 rows
//       of x: kLanes vector accumulators, summed by one transposing reduction tree; the next
//       block's columns are prefetched as it goes.
// The summation order of an output does not depend on R (batch invariant up to kMaxRows).

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_ffi_common.h"
#include "cpu_vec.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllm;  // vectors (cpu_vec.h) and the pool and dims_str (cpu_ffi_common.h)

constexpr int kColumnMultiple = 16;  // NN: F, NT: D must be multiples of it (cpu_matmul.py)
static_assert(kColumnMultiple % kLanes == 0, "whole vectors");
constexpr int kMaxRows = 16;         // most rows of x (cpu_matmul.py routes more to XLA)
constexpr int kRowsPerPass = 16;     // NN: rows of w per pass
constexpr int kBlockVecs = 4;        // NN: vectors of columns per register block
constexpr int kColumnsPerPiece = 64; // work is shared out in pieces of whole 64-column groups

// Prefetches the line of p[offset]; the address may lie past the weights (a prefetch never
// faults), so it is computed as an integer, not as a pointer out of bounds.
template <typename T>
inline void prefetch(const T* p, int64_t offset) {
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + offset * sizeof(T)));
}

// y[r0:r0+RG, f:f+NB*W] += x[r0:r0+RG, d:d+nd] @ w[d:d+nd, f:f+NB*W], the accumulators in
// registers: per row of w, NB vector loads, RG broadcasts and RG x NB fused multiply-adds.
template <int RG, int NB, typename WT>
inline void nn_block(const float* x, const WT* w, float* y, int D, int F, int r0, int d, int nd,
                     int f) {
  vf acc[RG][NB];
  for (int i = 0; i < RG; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = load_vec(y + (r0 + i) * F + f + j * kLanes);
  for (int k = 0; k < nd; ++k) {
    const WT* row = w + int64_t{d + k} * F + f;
    vf v[NB];
    for (int j = 0; j < NB; ++j) {
      v[j] = load_vec(row + j * kLanes);
      prefetch(row, int64_t{kRowsPerPass} * F + j * kLanes);  // the next pass's
    }
    for (int i = 0; i < RG; ++i) {
      const vf a = vf{} + x[(r0 + i) * D + d + k];
      for (int j = 0; j < NB; ++j) acc[i][j] += a * v[j];
    }
  }
  for (int i = 0; i < RG; ++i)
    for (int j = 0; j < NB; ++j)
      *reinterpret_cast<vf_row*>(y + (r0 + i) * F + f + j * kLanes) = acc[i][j];
}

template <int NB, typename WT>
inline void nn_rows(const float* x, const WT* w, float* y, int R, int D, int F, int d, int nd,
                    int f) {
  int r = 0;
  for (; r + 4 <= R; r += 4) nn_block<4, NB>(x, w, y, D, F, r, d, nd, f);
  switch (R - r) {
    case 3: nn_block<3, NB>(x, w, y, D, F, r, d, nd, f); break;
    case 2: nn_block<2, NB>(x, w, y, D, F, r, d, nd, f); break;
    case 1: nn_block<1, NB>(x, w, y, D, F, r, d, nd, f); break;
    default: break;
  }
}

// y[R, F] += x[R, d0:d1] @ w[d0:d1, F]; x as float32 [R, D], y float32 accumulators. Rows of w
// kRowsPerPass at a time, read across in blocks of kBlockVecs vectors: kRowsPerPass sequential
// streams, and y is loaded and stored once per pass. Rows of x four at a time (the weights of
// a block, read from memory by the first group, come from L1 for the others).
template <typename WT>
void nn_range(const float* x, const WT* w, float* y, int R, int D, int F, int d0, int d1) {
  for (int d = d0; d < d1; d += kRowsPerPass) {
    const int nd = std::min(kRowsPerPass, d1 - d);
    int f = 0;
    for (; f + kBlockVecs * kLanes <= F; f += kBlockVecs * kLanes)
      nn_rows<kBlockVecs>(x, w, y, R, D, F, d, nd, f);
    for (; f < F; f += kLanes) nn_rows<1>(x, w, y, R, D, F, d, nd, f);
  }
}

// y[r0:r0+RG, f:f+NC] = x[r0:r0+RG] . w[f:f+NC] (NC = kLanes / RG columns, each a row of w):
// kLanes accumulators, one vector of x and NC of w per step along D, and one transposing
// reduction tree for all kLanes sums. Columns past F repeat the last one and are not stored;
// x has at least r0 + RG rows (zero padded).
template <int RG, typename WT, typename YT>
inline void nt_block(const float* x, const WT* w, YT* y, int R, int D, int F, int r0, int f) {
  constexpr int NC = kLanes / RG;
  const WT* rows[NC];
  for (int j = 0; j < NC; ++j) rows[j] = w + int64_t{std::min(f + j, F - 1)} * D;
  vf acc[RG][NC] = {};
  for (int d = 0; d < D; d += kLanes) {
    vf v[NC];
    for (int j = 0; j < NC; ++j) {
      v[j] = load_vec(rows[j] + d);
      // The next block's columns (the rows of w after these), a line at a time: more reads in
      // flight than the hardware prefetcher keeps for NC streams. (A prefetch never faults.)
      prefetch(rows[j], int64_t{NC} * D + d);
    }
    for (int i = 0; i < RG; ++i) {
      const vf xv = load_vec(x + (r0 + i) * D + d);
      for (int j = 0; j < NC; ++j) acc[i][j] += xv * v[j];
    }
  }
  vf in[kLanes];  // lane l of the sums is input bit_reversed(l): feed (i, j) there
  for (int i = 0; i < RG; ++i)
    for (int j = 0; j < NC; ++j) in[bit_reversed(i * NC + j)] = acc[i][j];
  const vf sums = transposed_sums(in);
  for (int i = 0; i < RG && r0 + i < R; ++i)
    for (int j = 0; j < NC && f + j < F; ++j) from_f32(sums[i * NC + j], y + int64_t{r0 + i} * F + f + j);
}

// Columns [f0, f1) of y: one row of x (R = 1), two, or groups of four (x zero padded to them).
template <typename WT, typename YT>
void nt_range(const float* x, const WT* w, YT* y, int R, int D, int F, int f0, int f1) {
  if (R == 1) {
    for (int f = f0; f < f1; f += kLanes) nt_block<1>(x, w, y, R, D, F, 0, f);
  } else if (R == 2) {
    for (int f = f0; f < f1; f += kLanes / 2) nt_block<2>(x, w, y, R, D, F, 0, f);
  } else {
    for (int f = f0; f < f1; f += kLanes / 4)
      for (int r = 0; r < R; r += 4) nt_block<4>(x, w, y, R, D, F, r, f);
  }
}

// x [R, D] as float32, zero rows appended up to a multiple of 4 (NT's groups of rows).
template <typename XT>
std::vector<float> x_as_f32(const ffi::AnyBuffer& x, int64_t rows, int64_t cols) {
  const XT* p = static_cast<const XT*>(x.untyped_data());
  std::vector<float> out((rows + 3) / 4 * 4 * cols, 0.0f);
  for (int64_t i = 0; i < rows * cols; ++i) out[i] = to_f32(p[i]);
  return out;
}

struct NoState {};

template <typename WT, typename YT>
void nn(ffi::ThreadPool& pool, int workers, const float* x, const void* w_data, void* y_data,
        int R, int D, int F) {
  const WT* w = static_cast<const WT*>(w_data);
  // Pieces of d at least 64 rows long, one per worker, each summing into its slice of `sums`.
  // (More, smaller pieces, claimed as threads come free, measured 5-25% slower.)
  const int pieces = std::max(1, std::min(workers, D / 64));
  std::vector<float> sums(int64_t{pieces} * R * F, 0.0f);
  jaxllm::parallel_for(pool, workers, pieces, [] { return NoState{}; },
                       [&](int64_t i, NoState&) {
                         const int d0 = int64_t{D} * i / pieces, d1 = int64_t{D} * (i + 1) / pieces;
                         nn_range(x, w, sums.data() + i * R * F, R, D, F, d0, d1);
                       });
  YT* y = static_cast<YT*>(y_data);
  for (int64_t j = 0; j < int64_t{R} * F; ++j) {
    float s = sums[j];
    for (int i = 1; i < pieces; ++i) s += sums[int64_t{i} * R * F + j];
    from_f32(s, y + j);
  }
}

template <typename WT, typename YT>
void nt(ffi::ThreadPool& pool, int workers, const float* x, const void* w_data, void* y_data,
        int R, int D, int F) {
  const WT* w = static_cast<const WT*>(w_data);
  YT* y = static_cast<YT*>(y_data);
  // Pieces of whole column groups, a few per thread so that a late thread is not waited on.
  const int groups = (F + kColumnsPerPiece - 1) / kColumnsPerPiece;
  const int pieces = std::max(1, std::min(groups, 4 * workers));
  jaxllm::parallel_for(pool, workers, pieces, [] { return NoState{}; },
                       [&](int64_t i, NoState&) {
                         const int f0 = int64_t{groups} * i / pieces * kColumnsPerPiece;
                         const int f1 = std::min<int64_t>(
                             F, int64_t{groups} * (i + 1) / pieces * kColumnsPerPiece);
                         nt_range(x, w, y, R, D, F, f0, f1);
                       });
}

using Fn = void (*)(ffi::ThreadPool&, int, const float*, const void*, void*, int, int, int);

template <typename WT>
Fn pick_out(bool transposed, ffi::DataType y) {
  switch (y) {
    case ffi::DataType::F32: return transposed ? nt<WT, float> : nn<WT, float>;
    case ffi::DataType::BF16: return transposed ? nt<WT, BF16> : nn<WT, BF16>;
    default: return nullptr;
  }
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, bool transposed,
                      int32_t num_threads, ffi::Result<ffi::AnyBuffer> y) {
  auto bad = [](std::string what) { return ffi::Error::InvalidArgument("cpu matmul: " + what); };
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return bad("expected x [R, D], w [D, F] or [F, D], y [R, F]; got x " + dims_str(xd) +
               ", w " + dims_str(wd) + ", y " + dims_str(yd));
  const int64_t R = xd[0], D = xd[1], F = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != D || yd[0] != R || yd[1] != F)
    return bad("inconsistent shapes: x " + dims_str(xd) + ", w " + dims_str(wd) + ", y " +
               dims_str(yd) + (transposed ? " (w transposed)" : ""));
  if (R > kMaxRows) return bad("at most " + std::to_string(kMaxRows) + " rows; got " + std::to_string(R));
  if ((transposed ? D : F) % kColumnMultiple != 0)
    return bad((transposed ? "D " + std::to_string(D) : "F " + std::to_string(F)) +
               " is not a multiple of " + std::to_string(kColumnMultiple));
  std::vector<float> x32;
  switch (x.element_type()) {
    case ffi::DataType::F32: x32 = x_as_f32<float>(x, R, D); break;
    case ffi::DataType::BF16: x32 = x_as_f32<BF16>(x, R, D); break;
    default: return bad("x must be float32 or bfloat16");
  }
  Fn fn = nullptr;
  switch (w.element_type()) {
    case ffi::DataType::F32: fn = pick_out<float>(transposed, y->element_type()); break;
    case ffi::DataType::BF16: fn = pick_out<BF16>(transposed, y->element_type()); break;
    default: break;
  }
  if (fn == nullptr) return bad("w and y must be float32 or bfloat16");
  if (R == 0 || F == 0) return ffi::Error::Success();
  fn(pool, jaxllm::num_workers(pool, num_threads), x32.data(), w.untyped_data(),
     y->untyped_data(), static_cast<int>(R), static_cast<int>(D), static_cast<int>(F));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x [R, D]
                                  .Arg<ffi::AnyBuffer>()   // w [D, F], or [F, D] if transposed
                                  .Attr<bool>("transposed")
                                  .Attr<int32_t>("num_threads")
                                  .Ret<ffi::AnyBuffer>());  // y [R, F]
