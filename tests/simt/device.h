// The emulator's Device policy for the shared host flows (ms_deform_attn_host.h, lsap_host.h): tensors the
// kernels touch live in guarded memory (simt.h placement and poison), launches run on the fiber scheduler, and
// each launch is counted in the coverage table.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "simt.h"
// clang-format off
#include "ms_deform_attn/cuda/ms_deform_attn_launch.h"
// clang-format on

namespace simt {

// One row of the coverage table: kernel, dtype, VEC, group size (LSAP: threads), tiles -> launches.
void record_launch(const std::string& key);
std::vector<std::pair<std::string, int64_t>> coverage();
void reset_coverage();

// A guarded tensor: `fill` < 0 poison, else the byte value.
at::Tensor guarded_empty(at::IntArrayRef sizes, const at::TensorOptions& options, int fill, bool exact_placement);
// A contiguous copy of t in guarded memory (kept misaligned as t is, modulo 512, in the aligned placement).
at::Tensor guarded_copy(const at::Tensor& t);

struct SimtDevice {
  at::ScalarType dtype;  // the op's dtype, for the coverage table and FTZ

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return guarded_empty(sizes, options, -1, false);
  }
  at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return guarded_empty(sizes, options, 0, false);
  }
  at::Tensor adopt(const at::Tensor& t) { return guarded_copy(t); }
  int64_t min_threads_in_flight() const {
    return config().min_threads_in_flight > 0 ? config().min_threads_in_flight
                                              : deformable_detr::msda::kMinThreadsInFlight;
  }

  template <typename Kernel, typename... Args>
  void launch(const deformable_detr::LaunchInfo& info, Kernel kernel, int64_t blocks, int threads, size_t shared,
              Args... args) {
    const std::string key = std::string(info.kernel) + "|" + std::string(c10::toString(dtype)) + "|" +
                            std::to_string(info.vec) + "|" + std::to_string(info.group_size) + "|" +
                            std::to_string(info.tiles) + "|sm" + std::to_string(config().arch / 10);
    record_launch(key);
    set_launch_label(key);
    const bool saved = config().ftz;
    config().ftz = dtype != at::kDouble;  // --use_fast_math flushes float32 (and the float math of half types)
    try {
      launch_kernel(kernel, blocks, threads, shared, args...);
    } catch (...) {
      config().ftz = saved;
      throw;
    }
    config().ftz = saved;
  }
};

}  // namespace simt
