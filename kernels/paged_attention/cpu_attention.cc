// Ragged paged attention for XLA:CPU, called from JAX through the XLA FFI (see cpu_ffi.py).
//
// Shape legend: T tokens, N query heads, K kv heads, G = N / K, H head dim, L layers, B blocks in
// the pool, Z block size, S rows, P blocks per row. Kernel: W = kLanes floats per vector (16
// with AVX-512, else 8), M = tile tokens x G query rows (Mp: M rounded up to W), C = W keys per
// online-softmax step.
//
// Same semantics as reference.paged_attention, cache write included: token t's k_new / v_new go
// to slot slot_mapping[t] of layer `layer`, in place (the cache outputs alias the inputs). Token
// t of row r = token_rows[t] (-1 = padding, output zeros) attends, in one softmax, to the row's
// cached context (positions < context_lens[r], key p at block block_tables[r][p / Z],
// offset p % Z of layer `layer`) and to the step's tokens of the same row whose position is
// <= its own. A row's tokens are contiguous in the step and in position order (the model runner
// lays them out so; checked), so a tile of consecutive tokens only reads in-step keys up to its
// last one. A sliding window W > 0 (the operand `sliding_window`; <= 0 is full attention) hides
// from the token at position p, in both parts, every key before p - W + 1.
//
// Why this shape of kernel: XLA:CPU ran every formulation of the gather + einsum reference at
// ~2 GB/s of K/V, while decode is memory bound and the machine reads ~25 GB/s. Here:
//   * one work item is (tile of up to kTileRows / G consecutive tokens of a row, kv head): each
//     K/V row is loaded once and used by the G query heads of the kv head and every token of the
//     tile (a decode row is a tile of one token; a 512-token prefill chunk is ~25 tiles). Tiles
//     of few rows (decode) are one item for all K kv heads instead: each cache slot (K x H
//     contiguous elements) is read whole, a block of the cache as one contiguous run, rather
//     than K strided slices by K items;
//   * keys go in chunks of C through an online softmax in float32 (base 2: the scale and
//     log2(e) are folded into q), the next chunk's rows prefetched so that the random block
//     reads overlap the arithmetic (+15-20% on DRAM-bound decodes). Decode items issue those
//     prefetches a few lines at a time between the rows of the chunk's arithmetic: a burst of a
//     whole chunk's (16 slots x 2 x 768 bytes for SmolLM2) fills the line fill buffers and stalls
//     the core until most have arrived, so that memory then idles through the arithmetic
//     (spread, with all kv heads per item: decode 64 x 512 ~16-20% faster than one burst per
//     (tile, kv head) item);
//   * tiles of many query rows (prefill) lay scores out [C keys][Mp rows], query rows along the
//     lanes: scores are outer products (a broadcast K element times a vector of the transposed
//     q tile) and the softmax is vertical vector work with no horizontal reductions. Their K/V
//     chunk is copied into float32 buffers (bf16 -> f32 is a shift), which the M rows amortise;
//   * tiles of few rows (decode: M = G) would waste most lanes that way, so they put keys along
//     the lanes instead: per row, C dot products folded into one vector of C scores by a
//     transposing reduction tree, and one exp per row and chunk. Float32 K/V are read in place;
//   * P @ V broadcasts each probability against V rows into register tiles of 4 rows x
//     kRegVecs vectors;
//   * a window bounds what a tile reads: its context starts at its first token's window start
//     and its in-step keys at the first token at or after it, so each token costs O(W) keys, not
//     O(context) (Gemma 3: 5 layers of 6 have W = 512). The keys between that start and the
//     tile's last token's are masked per query row, only in the chunks that hold some (a decode
//     tile, one token, has none); without a window no chunk is masked, as before;
//   * work items, biggest first, are shared out over XLA's intra-op thread pool through an
//     atomic counter; the calling thread works too and only waits for items already claimed.
//     With fewer than kItemsPerWorker items per thread (a batch-1 decode has K), the contexts of
//     decode tiles are split into pieces, one item each, merged by log-sum-exp afterwards.
//
// Quantized caches (quantized_kv.py; the handler JaxllmQuantizedPagedAttention): int8 or
// float8_e4m3fn values with a float32 scale per token and kv head, in arrays [L, B, Z, K] beside
// the caches. Cached K/V rows are dequantized as they are loaded (always into the float32 chunk
// buffers: each head's H values times its scale), and the step's new tokens arrive already
// quantized with their scales, which the write copies in place like the values. This step's own
// keys are read from k / v, which the caller passes as the cache stores them.
//
// Vectors are GCC vector extensions, so the source carries no intrinsics and builds for any
// -march (the build uses -march=native).
//
// Measured (benchmarks/attention_cpu.py: SmolLM2-135M shapes, 30 layers, float32, on a shared
// 2-core AVX-512 VM whose one-thread streaming read varied from ~9 to ~18 GB/s between runs):
// decode 64 rows x 512 context 142-240 ms per step against 590-1280 ms for the reference
// (4.2-6.1x), reading K/V at 6-11 GB/s (the reference: 1.2-2.6), bound by the memory bandwidth
// left to it; 64 x 2048 4.5-7.4x; 1 x 512 2.3-4.5x; a 512-token prefill 2.5-4.6x; a 512-token
// chunk on 1k context 26-30x (the reference gathers the context once per token). With whole-
// slot decode items and spread prefetches, on a quiet machine: decode 64 x 512 83 ms (7.2x the
// reference's 598, K/V at ~18 GB/s), 64 x 2048 345 ms, 1 x 512 1.1 ms. A window of 512 on
// every layer (same VM, loaded by other jobs: load average 2-4), timed alternately with the
// same step without it: decode 64 x 2048 3.3-4.1x faster (103-201 ms against 393-722; it reads
// 511 keys a row instead of 2048, as decode 64 x 512 does: 196 ms in the same run); a 512-token
// chunk on 1024 context 2.4x (273 ms against 660; window 128: 87 ms). Full attention: the
// outputs bit for bit and the times (within noise) of the kernel before window support.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "../cpu_ffi_common.h"
#include "../cpu_vec.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllm;  // vectors (cpu_vec.h) and the pool and dims_str (cpu_ffi_common.h)

// Register tiles are sized to the register file: 32 vectors with AVX-512, 16 else. (Vectors of
// 16 floats on AVX2 spilled the 16-accumulator tiles: 8x slower.)
#ifdef __AVX512F__
constexpr int kRegVecs = 4;     // vectors of head dim per P @ V register tile
#else
constexpr int kRegVecs = 2;
#endif
constexpr int kHeadDimMultiple = 16;  // supported head dims (the cpu_ffi.py check)
static_assert(kHeadDimMultiple % kLanes == 0, "rows are whole vectors");
constexpr int kChunk = kLanes;  // keys per online-softmax step (one vector of keys)
constexpr int kTileRows = 64;   // target query rows (tokens x G) per work item
constexpr int kFewRows = 8;     // tiles of at most this many rows put keys along the lanes
constexpr int kRegRows = 4;     // query rows per P @ V register tile
// Fewer work items than kItemsPerWorker per thread (small decode batches: K items per row) and
// few-row tiles split their context into pieces of at least kMinSplitKeys keys, merged after.
constexpr int kItemsPerWorker = 4;
constexpr int kMinSplitKeys = 256;
static_assert(kFewRows <= kLanes, "few-row tiles keep per-row state in one vector");
constexpr float kMasked = -1e30f;  // finite: no inf - inf = NaN before a row sees its first key
constexpr float kLog2e = 1.4426950408889634f;

// Copies a K/V row of head_vecs vectors into float32. (A plain element loop became a memmove
// call per row for float32: 20% of a decode.)
template <typename T>
inline void load_row(const T* src, vf* dst, int head_vecs) {
  for (int v = 0; v < head_vecs; ++v) dst[v] = load_vec(src + v * kLanes);
}

// The same for a row of `heads` kv heads of a quantized cache, each head's head_vecs vectors
// times its scale (scales: one float per kv head of the row).
template <typename T>
inline void load_row_scaled(const T* src, const float* scales, vf* dst, int heads, int head_vecs) {
  for (int kh = 0; kh < heads; ++kh) {
    const float scale = scales[kh];
    for (int v = 0; v < head_vecs; ++v)
      dst[kh * head_vecs + v] = load_vec(src + (kh * head_vecs + v) * kLanes) * scale;
  }
}

template <typename T>
constexpr bool kQuantized = std::is_same_v<T, int8_t> || std::is_same_v<T, F8E4M3>;

template <typename T>
inline void prefetch_row(const T* row, int head_dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int offset = 0; offset < head_dim * static_cast<int>(sizeof(T)); offset += 64)
    __builtin_prefetch(bytes + offset);
}

template <int... l>
inline vi lane_index(std::integer_sequence<int, l...>) {
  return vi{l...};
}

// 2^x for x <= 128, to ~1 ulp; 0 below -126. Round-to-nearest split x = n + f, |f| <= 1/2,
// 2^f = e^(f ln 2) by its degree-7 Taylor polynomial (truncation error < 1e-8), n into the
// exponent bits. (Relies on IEEE rounding of (x + 1.5 * 2^23) - 1.5 * 2^23: no -ffast-math.)
inline vf exp2v(vf x) {
  const vf magic = splat(12582912.0f);
  vf xc = x < splat(-126.0f) ? splat(-126.0f) : x;
  vf n = (xc + magic) - magic;
  vf f = (xc - n) * 0.6931471805599453f;
  vf p = splat(1.0f / 5040);
  p = p * f + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  // A C-style cast between vector types of one size reinterprets the bits (GCC).
  vf r = (vf)((vi)p + (__builtin_convertvector(n, vi) << 23));
  return x < splat(-126.0f) ? vf{} : r;
}

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// A run of consecutive tokens of one row: [first, first + count). It reads the in-step keys
// [step_begin, first + count): from the row's first token in the step, or with a window from
// the first one at or after the window start of token `first`. It reads the context keys
// [ctx_begin, ctx_end) (ctx_begin: that window start, capped at the context length, or 0),
// and the in-step keys only if ctx_end is the context length. A tile with split >= 0 is one
// piece of a split context: its unnormalised output goes to partial slot `split`, to be merged
// with the other pieces.
struct Tile {
  int row, first, count, step_begin, ctx_begin, ctx_end, split;
};

// The first key position that the token at `pos` attends to: pos - window + 1 with a window
// (window > 0), else 0. In int64: positions are not checked, and must not overflow.
inline int window_start(int32_t window, int32_t pos) {
  return window > 0 ? static_cast<int>(std::max<int64_t>(int64_t{pos} - window + 1, 0)) : 0;
}

// The call's buffers at the cached layer, and its dimensions.
struct Problem {
  const void* q;        // [T, N, H]
  const void* k;        // [T, K, H] this step's keys
  const void* v;
  const void* k_cache;  // [B, Z, K, H] at `layer`
  const void* v_cache;
  const float* k_scales;  // [B, Z, K] at `layer`: a quantized cache's, else nullptr
  const float* v_scales;
  void* out;            // [T, N, H]
  const int32_t* positions;     // [T]
  const int32_t* block_tables;  // [S, P]
  const int32_t* context_lens;  // [S]
  float* partials;      // per piece of a split tile and kv head: see partial_slot
  int N, K, G, H, Z, P;
  int32_t window;       // sliding window, <= 0 for full attention
  float scale;          // softmax scale times log2(e)
};

// Element offset in q and out of query row i of a tile (token-major, then the kv head's heads).
inline int64_t query_row(const Problem& pr, const Tile& tile, int kv_head, int i) {
  return (static_cast<int64_t>(tile.first + i / pr.G) * pr.N + kv_head * pr.G + i % pr.G) * pr.H;
}

// The partial result of one piece of a split tile for one kv head: o [kFewRows, H], then m and
// l [kFewRows].
inline float* partial_slot(const Problem& pr, int split, int kv_head) {
  return pr.partials + (int64_t{split} * pr.K + kv_head) * kFewRows * (pr.H + 2);
}

// dst[h] = src[h] * scale in T.
template <typename T>
inline void store_row(const float* src, float scale, T* dst, int head_dim) {
  for (int h = 0; h < head_dim; ++h) from_f32(src[h] * scale, dst + h);
}

// Per-thread buffers for one work item, sized for the largest tile (max_rows a multiple of W).
// Vector arrays keep them 64-byte aligned; per-row values are read through float views.
struct Scratch {
  Scratch(int max_rows, int head_dim, int kv_heads)
      : q(std::max(max_rows, kv_heads * kFewRows) * head_dim / kLanes),
        o(std::max(max_rows, kv_heads * kFewRows) * head_dim / kLanes),
        p(std::max(kChunk * max_rows / kLanes, kv_heads * kFewRows)),
        kc(kChunk * kv_heads * head_dim / kLanes), vc(kChunk * kv_heads * head_dim / kLanes),
        m(std::max(max_rows / kLanes, kv_heads)), l(std::max(max_rows / kLanes, kv_heads)),
        alpha(std::max(max_rows / kLanes, kv_heads)), qpos(max_rows / kLanes),
        qstart(max_rows / kLanes) {}
  std::vector<vf> q;       // scaled queries: [H, Mp] (rows along the lanes) or [M, H] (few rows)
  std::vector<vf> o;       // [M, H] unnormalised output
  std::vector<vf> p;       // the chunk's scores, then probabilities: [C, Mp] or [M, C] (few rows)
  std::vector<vf> kc;      // [C, H] the chunk's keys in float32
  std::vector<vf> vc;      // [C, H] and values
  std::vector<vf> m;       // [Mp] running max (base-2 logits)
  std::vector<vf> l;       // [Mp] running sum
  std::vector<vf> alpha;   // [Mp] the factor rescaling o for the current chunk
  std::vector<vi> qpos;    // [Mp] position of each query row (INT_MIN for padding rows)
  std::vector<vi> qstart;  // [Mp] first key position each query row sees (windowed chunks)
};

// One chunk of n <= C keys as float32 row pointers (slots past n repeat row 0, and are masked):
// into the scratch copies kc / vc, or, for float32 K/V that need no contiguous copy, straight
// into the cache or this step's k / v.
struct Chunk {
  int n;
  const int32_t* kpos;  // positions of this step's keys (causal), nullptr for cached context
  int pos0;             // cached context: the position of key 0 (keys are consecutive)
  bool windowed;        // some key is before some row's window start: mask by qstart
  const float* k[kChunk];
  const float* v[kChunk];
};

// Fills `chunk` with keys / values rows of head_dim elements at element offsets
// offset(0..n-1). A quantized cache's rows are dequantized with their scales: those of the
// row's kv heads at offset / H (the scales' layout is the cache's without the head dim).
template <typename T, typename Offset>
void load_chunk(Scratch& w, Chunk& chunk, const T* keys, const T* values, int head_dim,
                bool copy, Offset offset, const Problem& pr) {
  const int head_vecs = head_dim / kLanes;
  for (int j = 0; j < chunk.n; ++j) {
    const int64_t row = offset(j);
    if constexpr (std::is_same_v<T, float>) {
      if (!copy) {
        chunk.k[j] = keys + row;
        chunk.v[j] = values + row;
        continue;
      }
    }
    if constexpr (kQuantized<T>) {
      const int heads = head_dim / pr.H;
      load_row_scaled(keys + row, pr.k_scales + row / pr.H, &w.kc[j * head_vecs], heads,
                      pr.H / kLanes);
      load_row_scaled(values + row, pr.v_scales + row / pr.H, &w.vc[j * head_vecs], heads,
                      pr.H / kLanes);
    } else {
      load_row(keys + row, &w.kc[j * head_vecs], head_vecs);
      load_row(values + row, &w.vc[j * head_vecs], head_vecs);
    }
    chunk.k[j] = reinterpret_cast<const float*>(&w.kc[j * head_vecs]);
    chunk.v[j] = reinterpret_cast<const float*>(&w.vc[j * head_vecs]);
  }
  std::fill(chunk.k + chunk.n, chunk.k + kChunk, chunk.k[0]);
  std::fill(chunk.v + chunk.n, chunk.v + kChunk, chunk.v[0]);
}

// Many rows, scores p[j][i] = sum_h kc[j][h] * q[h][i] over the lane blocks of query rows:
// kChunk accumulators hold one lane block for all keys; each step of h is one load and kChunk
// FMAs with a broadcast K element. kHeadDim is H when it is a compile-time constant (the
// common head dims), 0 otherwise: a constant makes kc[j][h] one base register plus a constant
// displacement per key; at run time the C row offsets spill out of the integer registers and
// the loop runs ~1.5x slower.
template <int kHeadDim>
void scores_rows_on_lanes(Scratch& w, int head_dim, int lane_blocks) {
  const int H = kHeadDim ? kHeadDim : head_dim;
  const float* kc = reinterpret_cast<const float*>(w.kc.data());
  for (int ib = 0; ib < lane_blocks; ++ib) {
    vf acc[kChunk] = {};
    for (int h = 0; h < H; ++h) {
      const vf qv = w.q[h * lane_blocks + ib];
#pragma GCC unroll 16
      for (int j = 0; j < kChunk; ++j) acc[j] += kc[j * H + h] * qv;
    }
    for (int j = 0; j < kChunk; ++j) w.p[j * lane_blocks + ib] = acc[j];
  }
}

// Many rows: which query rows of lane block ib see key j of a causal (this step's keys) or
// windowed chunk: those at or after the key, and whose window starts at or before it.
template <bool kCausal, bool kWindowed>
inline vi visible_rows(const Scratch& w, const Chunk& chunk, int ib, int j) {
  const int32_t key = kCausal ? chunk.kpos[j] : chunk.pos0 + j;
  if constexpr (kCausal && kWindowed) {
    return (w.qpos[ib] >= key) & (w.qstart[ib] <= key);
  } else if constexpr (kCausal) {
    return w.qpos[ib] >= key;
  } else {
    return w.qstart[ib] <= key;
  }
}

// Many rows, online softmax over the chunk's n keys, per lane block of query rows: turns p into
// probabilities against the new running max, updates m and l, and leaves in alpha the factor
// that rescales o. Causal and windowed chunks mask the keys a row does not see
// (visible_rows); masked keys get probability 0.
template <bool kCausal, bool kWindowed>
void softmax_rows_on_lanes(Scratch& w, const Chunk& chunk, int lane_blocks) {
  constexpr bool kMasking = kCausal || kWindowed;
  const int n = chunk.n;
  for (int ib = 0; ib < lane_blocks; ++ib) {
    vf m_old = w.m[ib], m_new = m_old;
    for (int j = 0; j < n; ++j) {
      vf s = w.p[j * lane_blocks + ib];
      if constexpr (kMasking)
        s = visible_rows<kCausal, kWindowed>(w, chunk, ib, j) ? s : splat(kMasked);
      m_new = vmax(m_new, s);
    }
    vf sum = {};
    for (int j = 0; j < n; ++j) {
      vf p = exp2v(w.p[j * lane_blocks + ib] - m_new);
      if constexpr (kMasking) p = visible_rows<kCausal, kWindowed>(w, chunk, ib, j) ? p : vf{};
      w.p[j * lane_blocks + ib] = p;
      sum += p;
    }
    vf alpha = exp2v(m_old - m_new);
    w.l[ib] = w.l[ib] * alpha + sum;
    w.m[ib] = m_new;
    w.alpha[ib] = alpha;
  }
}

// Software prefetch of the next chunk's K and V rows, a few lines at a time between pieces of
// the current chunk's arithmetic, so that the line fill buffers stay busy through it (a burst
// of all lines at once stalls the core until most of them arrived).
struct Prefetcher {
  const char* k[kChunk];
  const char* v[kChunk];
  int n = 0, row_bytes = 0, j = 0, off = 0;
  void reset(int n_keys, int bytes) { n = n_keys, row_bytes = bytes, j = 0, off = 0; }
  // Issues up to `pairs` K lines and as many V lines.
  inline void issue(int pairs) {
    for (; pairs > 0 && j < n; --pairs) {
      __builtin_prefetch(k[j] + off);
      __builtin_prefetch(v[j] + off);
      if ((off += 64) >= row_bytes) off = 0, ++j;
    }
  }
  inline void issue_all() { issue(INT_MAX); }
};

// Per kv head state of a few-row tile: q [R, H], o [R, H], p [R] vectors of C scores, and m,
// l, alpha: one vector each, lane i for row i. Keys / values of the kv head start `offset`
// elements into the chunk's rows.
struct FewRows {
  const vf* q;
  vf* o;
  vf* p;
  vf* m;
  vf* l;
  vf* alpha;
  const int32_t* qpos;
  const int32_t* qstart;
  int offset;
};

// Few rows (R <= 8, a template parameter so the rows' dependency chains interleave), scores and
// online softmax with the chunk's keys along the lanes: per query row, C dot products reduced
// into one vector of scores, one exp, and lane max / sum for m and l; one exp for all rows'
// alpha. Keys past n are masked, and so, for causal chunks, are keys after the row and, for
// windowed chunks, keys before the row's window start.
template <int R>
void step_keys_on_lanes(const FewRows& w, const Chunk& chunk, int head_vecs, Prefetcher& pf,
                        int pf_per_row) {
  const vi lane = lane_index(std::make_integer_sequence<int, kLanes>{});
  vi key_pos = lane < chunk.n ? vi{} : vi{} + INT_MAX;  // past n: after every row
  if (chunk.kpos != nullptr) {
    for (int j = 0; j < chunk.n; ++j) key_pos[j] = chunk.kpos[j];
  } else if (chunk.windowed) {
    key_pos = lane + chunk.pos0;  // lanes past n stay masked by lane < n
  }
  float* l = reinterpret_cast<float*>(w.l);
  const int32_t* qpos = w.qpos;
  vf s[R];
  vi visible[R];
  for (int i = 0; i < R; ++i) {
    pf.issue(pf_per_row);
    // Lane slot l accumulates key bit_reversed(l): kLanes independent FMA chains.
    vf acc[kLanes] = {};
    for (int v = 0; v < head_vecs; ++v) {
      const vf qv = w.q[i * head_vecs + v];
#pragma GCC unroll 16
      for (int slot = 0; slot < kLanes; ++slot)
        acc[slot] += qv * reinterpret_cast<const vf_row*>(chunk.k[bit_reversed(slot)] + w.offset)[v];
    }
    visible[i] = chunk.kpos != nullptr ? key_pos <= qpos[i] : lane < chunk.n;
    if (chunk.windowed) visible[i] &= key_pos >= w.qstart[i];
    s[i] = visible[i] ? transposed_sums(acc) : splat(kMasked);
  }
  const vf m_old = w.m[0];  // per-row state along the lanes: R <= 8 rows fit in one vector
  vf m_new = m_old;
  for (int i = 0; i < R; ++i) m_new[i] = std::max(m_old[i], lane_max(s[i]));
  w.alpha[0] = exp2v(m_old - m_new);
  w.m[0] = m_new;
  for (int i = 0; i < R; ++i) {
    w.p[i] = visible[i] ? exp2v(s[i] - m_new[i]) : vf{};
    l[i] = l[i] * w.alpha[0][i] + lane_sum(w.p[i]);
  }
}

// P @ V operands: probabilities, alpha and o (see pv_tile); values `offset` elements into the
// chunk's rows.
struct PV {
  const float* p;
  const float* alpha;
  vf* o;
  int offset;
};

// o[i0:i0+R][hv0:hv0+V vectors] = o * alpha + sum over the chunk's keys j of p(i, j) * v[j],
// with p(i, j) = p[i * row_stride + j * key_stride]: R x V accumulators; each key is V vector
// loads and R x V FMAs.
template <int R, int V>
void pv_tile(const PV& w, const Chunk& chunk, int i0, int hv0, int head_vecs, int row_stride,
             int key_stride) {
  const float* p = w.p + i0 * row_stride;
  const float* alpha = w.alpha + i0;
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = w.o[(i0 + r) * head_vecs + hv0 + v] * alpha[r];
  for (int j = 0; j < chunk.n; ++j) {
    const vf_row* value = reinterpret_cast<const vf_row*>(chunk.v[j] + w.offset) + hv0;
    vf vv[V];
    for (int v = 0; v < V; ++v) vv[v] = value[v];
    for (int r = 0; r < R; ++r) {
      const float pj = p[r * row_stride + j * key_stride];
      for (int v = 0; v < V; ++v) acc[r][v] += pj * vv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) w.o[(i0 + r) * head_vecs + hv0 + v] = acc[r][v];
}

// Calls f(std::integral_constant<int, n>) for a run-time n in [1, kMax].
template <int kMax, typename F>
inline void with_constant(int n, F&& f) {
  if constexpr (kMax > 0) {
    if (n == kMax) {
      f(std::integral_constant<int, kMax>{});
    } else {
      with_constant<kMax - 1>(n, f);
    }
  }
}

// P @ V for rows [i0, i0 + R): full register tiles along the head dim, then the remainder.
template <int R>
void pv_rows(const PV& w, const Chunk& chunk, int i0, int head_vecs, int row_stride,
             int key_stride) {
  int hv0 = 0;
  for (; hv0 + kRegVecs <= head_vecs; hv0 += kRegVecs)
    pv_tile<R, kRegVecs>(w, chunk, i0, hv0, head_vecs, row_stride, key_stride);
  with_constant<kRegVecs - 1>(head_vecs - hv0, [&](auto vecs) {
    pv_tile<R, vecs>(w, chunk, i0, hv0, head_vecs, row_stride, key_stride);
  });
}

void pv(const PV& w, const Chunk& chunk, int rows, int head_vecs, int row_stride, int key_stride) {
  int i0 = 0;
  for (; i0 + kRegRows <= rows; i0 += kRegRows)
    pv_rows<kRegRows>(w, chunk, i0, head_vecs, row_stride, key_stride);
  with_constant<kRegRows - 1>(rows - i0, [&](auto tail) {
    pv_rows<tail>(w, chunk, i0, head_vecs, row_stride, key_stride);
  });
}

// Few rows: scores, softmax and P @ V of one chunk, the row count a compile-time constant.
void step_few_rows(const FewRows& w, const Chunk& chunk, int rows, int head_vecs, Prefetcher& pf,
                   int pf_per_row) {
  with_constant<kFewRows>(rows,
                          [&](auto r) { step_keys_on_lanes<r>(w, chunk, head_vecs, pf, pf_per_row); });
  pf.issue(pf_per_row);
  pv(PV{reinterpret_cast<const float*>(w.p), reinterpret_cast<const float*>(w.alpha), w.o,
        w.offset},
     chunk, rows, head_vecs, kChunk, 1);
}

// Many rows: the same with query rows along the lanes.
void step_many_rows(Scratch& w, const Chunk& chunk, int rows, int head_dim) {
  const int lane_blocks = round_up(rows, kLanes) / kLanes;
  switch (head_dim) {
    case 64: scores_rows_on_lanes<64>(w, head_dim, lane_blocks); break;
    case 128: scores_rows_on_lanes<128>(w, head_dim, lane_blocks); break;
    default: scores_rows_on_lanes<0>(w, head_dim, lane_blocks); break;
  }
  const bool causal = chunk.kpos != nullptr;
  if (causal && chunk.windowed) {
    softmax_rows_on_lanes<true, true>(w, chunk, lane_blocks);
  } else if (causal) {
    softmax_rows_on_lanes<true, false>(w, chunk, lane_blocks);
  } else if (chunk.windowed) {
    softmax_rows_on_lanes<false, true>(w, chunk, lane_blocks);
  } else {
    softmax_rows_on_lanes<false, false>(w, chunk, lane_blocks);
  }
  pv(PV{reinterpret_cast<const float*>(w.p.data()), reinterpret_cast<const float*>(w.alpha.data()),
        w.o.data(), 0},
     chunk, rows, head_dim / kLanes, 1, lane_blocks * kLanes);
}

// Attention of one tile's tokens. Many-row tiles: for one kv head. Few-row tiles (kv_head -1):
// for all K kv heads at once, so that each key / value slot (K x H elements, contiguous in the
// cache and in this step's k / v) is read whole, and each block of the cache as one
// contiguous run, instead of K strided slices by K separate items. QT: q/k/v/out element type;
// CT: the cache's.
template <typename QT, typename CT>
void attend(const Problem& pr, const Tile& tile, int kv_head, Scratch& w) {
  const int G = pr.G, H = pr.H, K = pr.K;
  const int rows = tile.count * G;                   // query rows per kv head: token-major
  const int rows_padded = round_up(rows, kLanes);
  const int lane_blocks = rows_padded / kLanes;
  const int head_vecs = H / kLanes;
  const bool few_rows = rows <= kFewRows;  // keys along the lanes, all kv heads
  const int heads = few_rows ? K : 1;      // kv heads of this item (kv_head is -1 for few rows)
  const int head0 = few_rows ? 0 : kv_head;
  const int row_len = heads * H;           // elements of a key / value row read per key

  // Scaled queries, in the layout of the path; running max, sum and output. Few rows: row
  // kh * rows + i is query row i of kv head kh.
  float* q_scaled = reinterpret_cast<float*>(w.q.data());
  int32_t* qpos = reinterpret_cast<int32_t*>(w.qpos.data());
  const QT* q = static_cast<const QT*>(pr.q);
  for (int kh = 0; kh < heads; ++kh)
    for (int i = 0; i < rows; ++i) {
      const QT* src = q + query_row(pr, tile, head0 + kh, i);
      for (int h = 0; h < H; ++h) {
        const float x = to_f32(src[h]) * pr.scale;
        if (few_rows) {
          q_scaled[(kh * rows + i) * H + h] = x;
        } else {
          q_scaled[h * rows_padded + i] = x;
        }
      }
    }
  for (int i = 0; i < rows; ++i) qpos[i] = pr.positions[tile.first + i / G];
  for (int i = rows; i < rows_padded; ++i) {  // padding lanes: zero queries before every key
    if (!few_rows)
      for (int h = 0; h < H; ++h) q_scaled[h * rows_padded + i] = 0.0f;
    qpos[i] = INT_MIN;
  }
  // With a window, the tile's last token has the latest start: keys before it are masked per
  // row (chunk.windowed), keys from it on are seen by every row. 0 without a window: no chunk
  // is masked.
  const int mask_below = window_start(pr.window, pr.positions[tile.first + tile.count - 1]);
  if (mask_below > 0) {
    int32_t* qstart = reinterpret_cast<int32_t*>(w.qstart.data());
    for (int i = 0; i < rows_padded; ++i) qstart[i] = window_start(pr.window, qpos[i]);
  }
  const int state_vecs = few_rows ? heads : lane_blocks;
  std::fill_n(w.m.begin(), state_vecs, splat(kMasked));
  std::fill_n(w.l.begin(), state_vecs, vf{});
  std::fill_n(w.o.begin(), heads * rows * head_vecs, vf{});

  // Few rows: the next chunk's prefetches, spread over this chunk's arithmetic (pf_per_row
  // line pairs before each query row's scores and before each kv head's P @ V).
  Prefetcher pf;
  int pf_per_row = 0;
  auto step = [&](const Chunk& chunk) {
    if (few_rows) {
      for (int kh = 0; kh < heads; ++kh)
        step_few_rows(FewRows{&w.q[kh * rows * head_vecs], &w.o[kh * rows * head_vecs],
                              &w.p[kh * rows], &w.m[kh], &w.l[kh], &w.alpha[kh], qpos,
                              reinterpret_cast<const int32_t*>(w.qstart.data()), kh * H},
                      chunk, rows, head_vecs, pf, pf_per_row);
      pf.issue_all();
    } else {
      step_many_rows(w, chunk, rows, H);
    }
  };
  Chunk chunk;

  // 1. The cached context, through the row's block table; the next chunk's rows are prefetched
  // (block reads are random, so the hardware prefetchers do not see them coming).
  const CT* k_cache = static_cast<const CT*>(pr.k_cache);
  const CT* v_cache = static_cast<const CT*>(pr.v_cache);
  const int32_t* table = pr.block_tables + static_cast<int64_t>(tile.row) * pr.P;
  // Element offsets of the context keys in order, walking the block table (no divisions).
  int block = tile.ctx_begin / pr.Z, in_block = tile.ctx_begin % pr.Z;
  auto next_offsets = [&](int64_t* offsets, int n) {
    for (int j = 0; j < n; ++j) {
      offsets[j] = ((static_cast<int64_t>(table[block]) * pr.Z + in_block) * K + head0) * H;
      if (++in_block == pr.Z) in_block = 0, ++block;
    }
  };
  const int row_bytes = row_len * static_cast<int>(sizeof(CT));
  int64_t offsets[kChunk], ahead[kChunk];
  next_offsets(ahead, std::min(kChunk, tile.ctx_end - tile.ctx_begin));
  for (int c0 = tile.ctx_begin; c0 < tile.ctx_end; c0 += kChunk) {
    chunk.n = std::min(kChunk, tile.ctx_end - c0);
    chunk.kpos = nullptr;
    chunk.pos0 = c0;
    chunk.windowed = c0 < mask_below;
    std::copy_n(ahead, chunk.n, offsets);
    const int n_ahead = std::clamp(tile.ctx_end - c0 - kChunk, 0, kChunk);
    next_offsets(ahead, n_ahead);
    if (few_rows) {
      for (int j = 0; j < n_ahead; ++j) {
        pf.k[j] = reinterpret_cast<const char*>(k_cache + ahead[j]);
        pf.v[j] = reinterpret_cast<const char*>(v_cache + ahead[j]);
      }
      pf.reset(n_ahead, row_bytes);
      const int pairs = n_ahead * ((row_bytes + 63) / 64), points = heads * (rows + 1);
      pf_per_row = (pairs + points - 1) / points;
    } else {
      for (int j = 0; j < n_ahead; ++j) {
        prefetch_row(k_cache + ahead[j], row_len);
        prefetch_row(v_cache + ahead[j], row_len);
      }
    }
    if constexpr (kQuantized<CT>) {  // a block's scales are a few lines, Z * K floats apart
      for (int j = 0; j < n_ahead; ++j) {
        __builtin_prefetch(pr.k_scales + ahead[j] / H);
        __builtin_prefetch(pr.v_scales + ahead[j] / H);
      }
    }
    load_chunk(w, chunk, k_cache, v_cache, row_len, !few_rows, [&](int j) { return offsets[j]; },
               pr);
    step(chunk);
  }
  pf.reset(0, 0);
  pf_per_row = 0;

  // 2. This step's keys of the row, up to the tile's last token, masked by position.
  const int end = tile.ctx_end == pr.context_lens[tile.row] ? tile.first + tile.count : 0;
  for (int s0 = tile.step_begin; s0 < end; s0 += kChunk) {
    chunk.n = std::min(kChunk, end - s0);
    chunk.kpos = pr.positions + s0;
    chunk.windowed = chunk.kpos[0] < mask_below;  // positions increase along the chunk
    load_chunk(w, chunk, static_cast<const QT*>(pr.k), static_cast<const QT*>(pr.v), row_len,
               !few_rows, [&](int j) { return (static_cast<int64_t>(s0 + j) * K + head0) * H; },
               pr);
    step(chunk);
  }

  // 3. Normalise into out[t, kv_head * G + g], or leave this piece for the merge.
  for (int kh = 0; kh < heads; ++kh) {
    const float* o = reinterpret_cast<const float*>(&w.o[kh * rows * head_vecs]);
    const float* l = reinterpret_cast<const float*>(&w.l[few_rows ? kh : 0]);
    const float* m = reinterpret_cast<const float*>(&w.m[few_rows ? kh : 0]);
    if (tile.split >= 0) {
      float* partial = partial_slot(pr, tile.split, head0 + kh);
      std::copy_n(o, rows * H, partial);
      std::copy_n(m, rows, partial + kFewRows * H);
      std::copy_n(l, rows, partial + kFewRows * (H + 1));
      continue;
    }
    QT* out = static_cast<QT*>(pr.out);
    for (int i = 0; i < rows; ++i)
      store_row(o + i * H, 1.0f / l[i], out + query_row(pr, tile, head0 + kh, i), H);
  }
}

// Merges the pieces of a split tile (consecutive in `pieces`) into out: per query row, the
// pieces' sums rescaled to the largest max, as the online softmax would have.
template <typename QT>
void merge_pieces(const Problem& pr, const Tile* pieces, int num_pieces) {
  const Tile& tile = pieces[0];
  const int rows = tile.count * pr.G, H = pr.H;
  QT* out = static_cast<QT*>(pr.out);
  std::vector<float> acc(H);
  for (int kv_head = 0; kv_head < pr.K; ++kv_head) {
    for (int i = 0; i < rows; ++i) {
      float m = kMasked, l = 0.0f;
      for (int piece = 0; piece < num_pieces; ++piece)
        m = std::max(m, partial_slot(pr, pieces[piece].split, kv_head)[kFewRows * H + i]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int piece = 0; piece < num_pieces; ++piece) {
        const float* part = partial_slot(pr, pieces[piece].split, kv_head);
        const float weight = std::exp2(part[kFewRows * H + i] - m);
        l += part[kFewRows * (H + 1) + i] * weight;
        for (int h = 0; h < H; ++h) acc[h] += part[i * H + h] * weight;
      }
      store_row(acc.data(), 1.0f / l, out + query_row(pr, tile, kv_head, i), H);
    }
  }
}

// Whether a tile has few query rows per kv head: one work item for all its kv heads (keys
// along the lanes), else one per kv head.
inline bool is_few_rows(const Tile& tile, int G) { return tile.count * G <= kFewRows; }

// Runs the work items (tile, kv head; few-row tiles: tile, all kv heads), the most expensive
// first so that the last ones to finish are short, then merges split tiles (split_tiles: first
// index and number of pieces).
template <typename QT, typename CT>
void run(ffi::ThreadPool& pool, int workers, const Problem& pr, const std::vector<Tile>& tiles,
         const std::vector<std::pair<int, int>>& split_tiles, int max_rows) {
  struct Item {
    int tile, kv_head;  // kv_head -1: all of them
    int64_t cost;
  };
  std::vector<Item> items;
  for (int t = 0; t < static_cast<int>(tiles.size()); ++t) {
    const Tile& tile = tiles[t];
    const int in_step =
        tile.ctx_end == pr.context_lens[tile.row] ? tile.first + tile.count - tile.step_begin : 0;
    const int64_t cost = int64_t{tile.count} * (tile.ctx_end - tile.ctx_begin + in_step);
    if (is_few_rows(tile, pr.G)) {
      items.push_back({t, -1, cost * pr.K});
    } else {
      for (int kv_head = 0; kv_head < pr.K; ++kv_head) items.push_back({t, kv_head, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  parallel_for(
      pool, workers, static_cast<int64_t>(items.size()),
      [&] { return Scratch(max_rows, pr.H, pr.K); },
      [&](int64_t i, Scratch& scratch) {
        attend<QT, CT>(pr, tiles[items[i].tile], items[i].kv_head, scratch);
      });
  for (const auto& [first, num_pieces] : split_tiles)
    merge_pieces<QT>(pr, &tiles[first], num_pieces);
}

using RunFn = void (*)(ffi::ThreadPool&, int, const Problem&, const std::vector<Tile>&,
                       const std::vector<std::pair<int, int>>&, int);

template <typename QT>
RunFn pick_cache_type(ffi::DataType cache) {
  switch (cache) {
    case ffi::DataType::F32: return run<QT, float>;
    case ffi::DataType::BF16: return run<QT, BF16>;
    case ffi::DataType::S8: return run<QT, int8_t>;
    case ffi::DataType::F8E4M3FN: return run<QT, F8E4M3>;
    default: return nullptr;
  }
}

RunFn pick_run(ffi::DataType q, ffi::DataType cache) {
  switch (q) {
    case ffi::DataType::F32: return pick_cache_type<float>(cache);
    case ffi::DataType::BF16: return pick_cache_type<BF16>(cache);
    default: return nullptr;
  }
}

// The scale buffers of a quantized cache (int8 or float8_e4m3fn values): the caches' scales
// [L, B, Z, K] (in, and out aliased to them) and this step's tokens' [T, K].
struct ScaleBuffers {
  ffi::Buffer<ffi::F32> k_cache, v_cache;
  ffi::Buffer<ffi::F32> k_new, v_new;
  ffi::Result<ffi::Buffer<ffi::F32>> k_cache_out, v_cache_out;
};

// The call, for a float cache (scales nullptr) or a quantized one.
ffi::Error PagedAttention(ffi::ThreadPool& pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                          ffi::BufferR0<ffi::S32> layer, ffi::BufferR0<ffi::S32> sliding_window,
                          ffi::BufferR1<ffi::S32> token_rows, ffi::BufferR1<ffi::S32> positions,
                          ffi::BufferR2<ffi::S32> block_tables,
                          ffi::BufferR1<ffi::S32> context_lens,
                          ffi::BufferR1<ffi::S32> slot_mapping, ffi::AnyBuffer k_new,
                          ffi::AnyBuffer v_new, float scale, int32_t num_threads,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> k_cache_out,
                          ffi::Result<ffi::AnyBuffer> v_cache_out, ScaleBuffers* scales) {
  // Shapes and dtypes.
  auto qd = q.dimensions(), kd = k.dimensions(), cd = k_cache.dimensions();
  auto bad = [](std::string what) {
    return ffi::Error::InvalidArgument("cpu paged attention: " + what);
  };
  if (qd.size() != 3 || kd.size() != 3 || cd.size() != 5)
    return bad("expected q [T, N, H], k [T, K, H], k_cache [L, B, Z, K, H]; got q " +
               dims_str(qd) + ", k " + dims_str(kd) + ", k_cache " + dims_str(cd));
  const int64_t T = qd[0], N = qd[1], H = qd[2], K = kd[1], L = cd[0], B = cd[1], Z = cd[2];
  const int64_t S = block_tables.dimensions()[0], P = block_tables.dimensions()[1];
  if (kd[0] != T || kd[2] != H || cd[3] != K || cd[4] != H || K == 0 || N % K != 0)
    return bad("inconsistent shapes: q " + dims_str(qd) + ", k " + dims_str(kd) + ", k_cache " +
               dims_str(cd));
  if (!(v.dimensions() == kd) || !(v_cache.dimensions() == cd) || !(out->dimensions() == qd))
    return bad("v, v_cache and out must have the shapes of k, k_cache and q");
  if (token_rows.dimensions()[0] != T || positions.dimensions()[0] != T ||
      slot_mapping.dimensions()[0] != T || context_lens.dimensions()[0] != S)
    return bad("token_rows, positions, slot_mapping must be [T] and context_lens [S]");
  if (!(k_new.dimensions() == kd) || !(v_new.dimensions() == kd) ||
      k_new.element_type() != k_cache.element_type() ||
      v_new.element_type() != k_cache.element_type())
    return bad("k_new and v_new must have k's shape and the cache dtype");
  if (k_cache_out->untyped_data() != k_cache.untyped_data() ||
      v_cache_out->untyped_data() != v_cache.untyped_data())
    return bad("the cache outputs must alias the cache inputs (input_output_aliases)");
  if (H % kHeadDimMultiple != 0)
    return bad("head dim " + std::to_string(H) + " is not a multiple of " +
               std::to_string(kHeadDimMultiple));
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type() ||
      out->element_type() != q.element_type() || v_cache.element_type() != k_cache.element_type())
    return bad("q, k, v and out must share a dtype, and so must k_cache and v_cache");
  RunFn run_fn = pick_run(q.element_type(), k_cache.element_type());
  if (run_fn == nullptr)
    return bad("supported dtypes are float32 and bfloat16 (q), and those, int8 and "
               "float8_e4m3fn (cache)");
  const bool quantized = k_cache.element_type() == ffi::DataType::S8 ||
                         k_cache.element_type() == ffi::DataType::F8E4M3FN;
  if (quantized != (scales != nullptr))
    return bad(quantized ? "an int8 or float8_e4m3fn cache needs its scales"
                         : "scales come only with an int8 or float8_e4m3fn cache");
  if (scales != nullptr) {
    const std::vector<int64_t> scale_dims(cd.begin(), cd.end() - 1), new_dims{T, K};
    for (auto dims : {scales->k_cache.dimensions(), scales->v_cache.dimensions()})
      if (std::vector<int64_t>(dims.begin(), dims.end()) != scale_dims)
        return bad("cache scales must be [L, B, Z, K], got " + dims_str(dims));
    for (auto dims : {scales->k_new.dimensions(), scales->v_new.dimensions()})
      if (std::vector<int64_t>(dims.begin(), dims.end()) != new_dims)
        return bad("new scales must be [T, K], got " + dims_str(dims));
    if (scales->k_cache_out->typed_data() != scales->k_cache.typed_data() ||
        scales->v_cache_out->typed_data() != scales->v_cache.typed_data())
      return bad("the scale outputs must alias the scale inputs (input_output_aliases)");
  }

  // Values: everything the kernel uses as an index is checked before any thread reads memory.
  const int32_t layer_index = *layer.typed_data();
  if (layer_index < 0 || layer_index >= L)
    return bad("layer " + std::to_string(layer_index) + " out of range");
  const int32_t window = *sliding_window.typed_data();
  const int32_t* rows = token_rows.typed_data();
  const int32_t* ctx = context_lens.typed_data();
  const int32_t* tables = block_tables.typed_data();
  const int G = static_cast<int>(N / K);
  const int tile_tokens = std::max(1, kTileRows / G);
  const size_t token_bytes = N * H * ffi::ByteWidth(q.element_type());
  const int32_t* pos = positions.typed_data();
  std::vector<Tile> tiles;
  std::vector<bool> row_seen(S);
  for (int t = 0; t < T;) {
    const int row = rows[t];
    int end = t + 1;
    while (end < T && rows[end] == row) ++end;
    if (row < -1 || row >= S) return bad("token row " + std::to_string(row) + " out of range");
    if (row >= 0) {
      // The tiling relies on these (the model runner's layout): a tile reads in-step keys
      // only up to its last token.
      if (row_seen[row])
        return bad("the tokens of row " + std::to_string(row) + " are not contiguous");
      row_seen[row] = true;
      for (int i = t + 1; i < end; ++i)
        if (pos[i] <= pos[i - 1])
          return bad("positions of row " + std::to_string(row) + " do not increase");
      if (ctx[row] < 0 || ctx[row] > P * Z) return bad("context length out of range");
      for (int b = 0; b < (ctx[row] + Z - 1) / Z; ++b)
        if (tables[row * P + b] < 0 || tables[row * P + b] >= B)
          return bad("block id out of range");
      // With a window, what is before the window start of a tile's first token is skipped
      // whole: the context up to it, and the row's in-step tokens before it.
      for (int first = t; first < end; first += tile_tokens) {
        const int start = window_start(window, pos[first]);
        const int step_begin =
            window > 0 ? static_cast<int>(std::lower_bound(pos + t, pos + first, start) - pos) : t;
        tiles.push_back({row, first, std::min(tile_tokens, end - first), step_begin,
                         std::min(start, ctx[row]), ctx[row], -1});
      }
    } else {
      std::memset(static_cast<char*>(out->untyped_data()) + t * token_bytes, 0,
                  (end - t) * token_bytes);
    }
    t = end;
  }

  // Too few items for the threads (small decode batches): split long contexts of few-row tiles.
  const int workers = num_workers(pool, num_threads);
  const int64_t wanted = kItemsPerWorker * workers;
  int64_t have = 0;
  for (const Tile& tile : tiles) have += is_few_rows(tile, G) ? 1 : K;
  std::vector<std::pair<int, int>> split_tiles;
  int num_pieces_total = 0;
  if (have < wanted) {
    std::vector<Tile> whole = std::move(tiles);
    tiles.clear();
    for (const Tile& tile : whole) {
      const int context = tile.ctx_end - tile.ctx_begin;  // what the window leaves of it
      const int pieces = static_cast<int>(
          std::min<int64_t>((wanted + have - 1) / have, context / kMinSplitKeys));
      if (!is_few_rows(tile, G) || pieces < 2) {
        tiles.push_back(tile);
        continue;
      }
      const int piece_keys = round_up((context + pieces - 1) / pieces, kChunk);
      split_tiles.emplace_back(static_cast<int>(tiles.size()), 0);
      for (int begin = tile.ctx_begin; begin < tile.ctx_end;
           begin += piece_keys, ++split_tiles.back().second)
        tiles.push_back({tile.row, tile.first, tile.count, tile.step_begin, begin,
                         std::min(begin + piece_keys, tile.ctx_end), num_pieces_total++});
    }
  }
  std::vector<float> partials(num_pieces_total * K * kFewRows * (H + 2));

  const int32_t* slots = slot_mapping.typed_data();
  for (int t = 0; t < T; ++t)
    if (slots[t] < 0 || slots[t] >= B * Z)
      return bad("slot " + std::to_string(slots[t]) + " out of range");

  // The step's K/V into the cache at this layer, in place (the outputs alias the inputs), as
  // the reference's write_kv scatter does: in token order, padding tokens included. Doing it
  // here saves XLA's two scatters a layer and their index arithmetic (~1.5 ms of a 64-row
  // SmolLM2 decode step in a profile).
  const int64_t layer_bytes = B * Z * K * H * ffi::ByteWidth(k_cache.element_type());
  const size_t slot_bytes = K * H * ffi::ByteWidth(k_cache.element_type());
  for (auto [src, dst] : {std::pair{k_new.untyped_data(), k_cache_out->untyped_data()},
                          std::pair{v_new.untyped_data(), v_cache_out->untyped_data()}}) {
    char* layer_base = static_cast<char*>(dst) + layer_index * layer_bytes;
    for (int t = 0; t < T; ++t)
      std::memcpy(layer_base + slots[t] * slot_bytes, static_cast<const char*>(src) + t * slot_bytes,
                  slot_bytes);
  }
  const float *k_scales = nullptr, *v_scales = nullptr;
  if (scales != nullptr) {
    const int64_t layer_scales = B * Z * K;
    for (auto [src, dst] : {std::pair{scales->k_new.typed_data(), scales->k_cache_out->typed_data()},
                            std::pair{scales->v_new.typed_data(), scales->v_cache_out->typed_data()}}) {
      float* layer_base = dst + layer_index * layer_scales;
      for (int t = 0; t < T; ++t) std::copy_n(src + t * K, K, layer_base + slots[t] * K);
    }
    k_scales = scales->k_cache.typed_data() + layer_index * layer_scales;
    v_scales = scales->v_cache.typed_data() + layer_index * layer_scales;
  }

  const Problem problem{
      q.untyped_data(), k.untyped_data(), v.untyped_data(),
      static_cast<const char*>(k_cache.untyped_data()) + layer_index * layer_bytes,
      static_cast<const char*>(v_cache.untyped_data()) + layer_index * layer_bytes, k_scales,
      v_scales, out->untyped_data(), pos, tables, ctx, partials.data(), static_cast<int>(N),
      static_cast<int>(K), G, static_cast<int>(H), static_cast<int>(Z), static_cast<int>(P),
      window, scale * kLog2e};
  run_fn(pool, workers, problem, tiles, split_tiles, round_up(tile_tokens * G, kLanes));
  return ffi::Error::Success();
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                              ffi::AnyBuffer v, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                              ffi::BufferR0<ffi::S32> layer,
                              ffi::BufferR0<ffi::S32> sliding_window,
                              ffi::BufferR1<ffi::S32> token_rows,
                              ffi::BufferR1<ffi::S32> positions,
                              ffi::BufferR2<ffi::S32> block_tables,
                              ffi::BufferR1<ffi::S32> context_lens,
                              ffi::BufferR1<ffi::S32> slot_mapping, ffi::AnyBuffer k_new,
                              ffi::AnyBuffer v_new, float scale, int32_t num_threads,
                              ffi::Result<ffi::AnyBuffer> out,
                              ffi::Result<ffi::AnyBuffer> k_cache_out,
                              ffi::Result<ffi::AnyBuffer> v_cache_out) {
  return PagedAttention(pool, q, k, v, k_cache, v_cache, layer, sliding_window, token_rows,
                        positions, block_tables, context_lens, slot_mapping, k_new, v_new, scale,
                        num_threads, out, k_cache_out, v_cache_out, nullptr);
}

ffi::Error QuantizedPagedAttentionImpl(
    ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
    ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache, ffi::Buffer<ffi::F32> k_scales,
    ffi::Buffer<ffi::F32> v_scales, ffi::BufferR0<ffi::S32> layer,
    ffi::BufferR0<ffi::S32> sliding_window, ffi::BufferR1<ffi::S32> token_rows,
    ffi::BufferR1<ffi::S32> positions, ffi::BufferR2<ffi::S32> block_tables,
    ffi::BufferR1<ffi::S32> context_lens, ffi::BufferR1<ffi::S32> slot_mapping,
    ffi::AnyBuffer k_new, ffi::AnyBuffer v_new, ffi::Buffer<ffi::F32> k_new_scales,
    ffi::Buffer<ffi::F32> v_new_scales, float scale, int32_t num_threads,
    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> k_cache_out,
    ffi::Result<ffi::AnyBuffer> v_cache_out, ffi::Result<ffi::Buffer<ffi::F32>> k_scales_out,
    ffi::Result<ffi::Buffer<ffi::F32>> v_scales_out) {
  ScaleBuffers scales{k_scales, v_scales, k_new_scales, v_new_scales, k_scales_out,
                            v_scales_out};
  return PagedAttention(pool, q, k, v, k_cache, v_cache, layer, sliding_window, token_rows,
                        positions, block_tables, context_lens, slot_mapping, k_new, v_new, scale,
                        num_threads, out, k_cache_out, v_cache_out, &scales);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q [T, N, H]
                                  .Arg<ffi::AnyBuffer>()           // k [T, K, H]
                                  .Arg<ffi::AnyBuffer>()           // v [T, K, H]
                                  .Arg<ffi::AnyBuffer>()           // k_cache [L, B, Z, K, H]
                                  .Arg<ffi::AnyBuffer>()           // v_cache [L, B, Z, K, H]
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // layer
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // sliding_window (<= 0: none)
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // token_rows [T]
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // positions [T]
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // block_tables [S, P]
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // context_lens [S]
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // slot_mapping [T]
                                  .Arg<ffi::AnyBuffer>()           // k_new [T, K, H], cache dtype
                                  .Arg<ffi::AnyBuffer>()           // v_new [T, K, H], cache dtype
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("num_threads")
                                  .Ret<ffi::AnyBuffer>()           // out [T, N, H]
                                  .Ret<ffi::AnyBuffer>()           // k_cache, aliased
                                  .Ret<ffi::AnyBuffer>());         // v_cache, aliased

// The same with a quantized cache (int8 or float8_e4m3fn values, float32 scale per token and
// kv head): the scales ride beside the caches, and the new tokens' beside k_new / v_new.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQuantizedPagedAttention, QuantizedPagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // q [T, N, H]
                                  .Arg<ffi::AnyBuffer>()           // k [T, K, H] as stored, q's dtype
                                  .Arg<ffi::AnyBuffer>()           // v [T, K, H]
                                  .Arg<ffi::AnyBuffer>()           // k_cache [L, B, Z, K, H]
                                  .Arg<ffi::AnyBuffer>()           // v_cache [L, B, Z, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k_scales [L, B, Z, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // v_scales [L, B, Z, K]
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // layer
                                  .Arg<ffi::BufferR0<ffi::S32>>()  // sliding_window (<= 0: none)
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // token_rows [T]
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // positions [T]
                                  .Arg<ffi::BufferR2<ffi::S32>>()  // block_tables [S, P]
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // context_lens [S]
                                  .Arg<ffi::BufferR1<ffi::S32>>()  // slot_mapping [T]
                                  .Arg<ffi::AnyBuffer>()           // k_new [T, K, H], cache dtype
                                  .Arg<ffi::AnyBuffer>()           // v_new [T, K, H], cache dtype
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k_new_scales [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // v_new_scales [T, K]
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("num_threads")
                                  .Ret<ffi::AnyBuffer>()           // out [T, N, H]
                                  .Ret<ffi::AnyBuffer>()           // k_cache, aliased
                                  .Ret<ffi::AnyBuffer>()           // v_cache, aliased
                                  .Ret<ffi::Buffer<ffi::F32>>()    // k_scales, aliased
                                  .Ret<ffi::Buffer<ffi::F32>>());  // v_scales, aliased
