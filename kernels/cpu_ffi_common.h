// What the FFI kernels of this directory share besides vectors (cpu_vec.h): work sharing over
// XLA:CPU's intra-op thread pool, shapes written out for error messages, and the operand
// contract of the two quantized matmuls.
#ifndef JAXLLM_KERNELS_CPU_FFI_COMMON_H_
#define JAXLLM_KERNELS_CPU_FFI_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jaxllm {

// Runs work(item, state) for items [0, n) on up to `workers` threads: the caller plus tasks
// scheduled on XLA's intra-op pool; each thread makes its own state (make_state()) once it has
// claimed an item. Items are claimed through an atomic counter, so a task that starts late (the
// pool busy elsewhere) finds nothing left and returns without touching the call's buffers; the
// caller only waits for items already claimed. The counters live in a shared_ptr because such
// a late task may run after this function returned.
template <typename MakeState, typename Work>
void parallel_for(xla::ffi::ThreadPool& pool, int workers, int64_t n, const MakeState& make_state,
                  const Work& work) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto run = [counters, n, &make_state, &work] {
    int64_t item = counters->next.fetch_add(1);
    if (item >= n) return;
    auto state = make_state();
    for (; item < n; item = counters->next.fetch_add(1)) {
      work(item, state);
      if (counters->done.fetch_add(1) + 1 == n) counters->done.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>({workers - 1, pool.num_threads(), n - 1});
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
  run();
  for (int64_t done; (done = counters->done.load()) < n;) counters->done.wait(done);
}

// The threads a kernel may use: the caller and the pool's, capped at num_threads (the cores
// this process may run on, from Python).
inline int num_workers(xla::ffi::ThreadPool& pool, int32_t num_threads) {
  return static_cast<int>(std::clamp<int64_t>(pool.num_threads() + 1, 1, num_threads));
}

// "[d0, d1, ...]"
inline std::string dims_str(xla::ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// The operands the quantized matmuls (cpu_quant_matmul.cc, cpu_int_dot_matmul.cc) share: x
// [R, K], data [N, K / block * block_bytes] (int8 for "int8", else uint8), y [R, N] float32, and
// for "int8" a float32 scale [N]; N a multiple of n_multiple. What is wrong, or "" if nothing.
// (x's element type is each kernel's own check.)
inline std::string quantized_operands_error(const std::string& type_name, int64_t block,
                                            int64_t block_bytes, int64_t n_multiple, bool int8,
                                            xla::ffi::Span<const int64_t> xd,
                                            const xla::ffi::AnyBuffer& data,
                                            const xla::ffi::AnyBuffer& scale,
                                            const xla::ffi::AnyBuffer& y) {
  namespace ffi = xla::ffi;
  auto wd = data.dimensions(), yd = y.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return "expected x [R, K], data [N, row_bytes], y [R, N]; got x " + dims_str(xd) +
           ", data " + dims_str(wd) + ", y " + dims_str(yd);
  const int64_t R = xd[0], K = xd[1], N = wd[0];
  if (K % block != 0 || N % n_multiple != 0 || wd[1] != K / block * block_bytes || yd[0] != R ||
      yd[1] != N)
    return type_name + ": inconsistent shapes x " + dims_str(xd) + ", data " + dims_str(wd) +
           ", y " + dims_str(yd);
  if (data.element_type() != (int8 ? ffi::DataType::S8 : ffi::DataType::U8))
    return std::string("data must be ") + (int8 ? "int8" : "uint8");
  if (y.element_type() != ffi::DataType::F32) return "y must be float32";
  if (int8 && (scale.element_type() != ffi::DataType::F32 || scale.dimensions().size() != 1 ||
               scale.dimensions()[0] != N))
    return "int8 needs a float32 scale [N]; got " + dims_str(scale.dimensions());
  return "";
}

}  // namespace jaxllm

#endif  // JAXLLM_KERNELS_CPU_FFI_COMMON_H_
