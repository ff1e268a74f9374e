// Launch parameters of the batched LSAP kernel (threads per problem, where the per-problem state lives, whether
// the costs are cached in shared memory), for the real launcher (lsap_cuda.cu) and the SIMT emulator (tests/simt/).
#pragma once

#include <algorithm>
#include <cstdint>

#include "assignment/lsap_core.h"

namespace deformable_detr {
namespace lsap {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
// The dynamic shared memory stays within the default 48 KiB limit: no cudaFuncSetAttribute opt-in, so launches
// are the same on every architecture. kSharedBudget bounds the state + cost cache; BlockShared comes on top.
constexpr int64_t kSharedBudget = 47 * 1024;

// The block's reduction slots and broadcast values, at the start of the dynamic shared memory.
struct BlockShared {
  Candidate warp_best[kMaxThreads / kWarpSize];
  double next_min_val;
  int32_t next_row, next_sink;
};

// Per-problem scratch: float64 duals and distances, then int32 bookkeeping. Sizes are multiples of 8 bytes so the
// optional cost cache that follows in shared memory is aligned for double.
DDETR_HOST_DEVICE_INLINE int64_t state_bytes(int64_t nr_cap, int64_t nc_cap) {
  const int64_t bytes = 8 * (nr_cap + 2 * nc_cap) + 4 * (nr_cap + 5 * nc_cap);
  return (bytes + 7) / 8 * 8;
}

// Threads per problem: about four columns per thread, whole warps, at most kMaxThreads. The scan is the only
// parallel part, so more threads than columns/4 just make every step's reduction and barriers slower.
inline int threads_for(int64_t nc_cap) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && threads * 4 < nc_cap) threads *= 2;
  return threads;
}

struct LsapLaunch {
  int64_t nr_cap, nc_cap;
  int64_t state;         // bytes of per-problem state
  bool state_in_shared;  // else global scratch of B * state bytes
  bool cache_cost;       // costs copied to shared memory in working orientation
  int threads;
  int64_t shared_bytes;  // dynamic shared memory per block
};

inline LsapLaunch lsap_launch(int64_t N, int64_t M, int64_t cost_element_bytes) {
  LsapLaunch p;
  p.nr_cap = std::min(N, M);
  p.nc_cap = std::max(N, M);
  p.state = state_bytes(p.nr_cap, p.nc_cap);
  p.state_in_shared = p.state <= kSharedBudget;
  p.cache_cost = p.state_in_shared && p.state + p.nr_cap * p.nc_cap * cost_element_bytes <= kSharedBudget;
  const int64_t cache_bytes = p.cache_cost ? p.nr_cap * p.nc_cap * cost_element_bytes : 0;
  p.shared_bytes = static_cast<int64_t>(sizeof(BlockShared)) + (p.state_in_shared ? p.state + cache_bytes : 0);
  p.threads = threads_for(p.nc_cap);
  return p;
}

}  // namespace lsap
}  // namespace deformable_detr
