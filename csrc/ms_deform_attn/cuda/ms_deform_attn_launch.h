// Host-side launch shape of the MSDA CUDA kernels: vector width, lanes per head, channel tiles and block count,
// with the alignment checks that decide them. One header for the real launcher (ms_deform_attn_cuda.cu) and the
// SIMT emulator (tests/simt/), so the emulator runs exactly the configurations a GPU would.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/launch_info.h"

namespace deformable_detr {
namespace msda {

constexpr int kThreads = 256;
// Below this many threads an H100 (132 SMs x 2048 threads) is less than half full; the launcher then trades
// vector width for more lanes per head, i.e. more loads in flight (the decoder shape, N * Q * M ~ 5k heads).
constexpr int64_t kMinThreadsInFlight = int64_t{1} << 17;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

struct LaunchShape {
  int vec;
  int group_size;
  int64_t tiles;
  int64_t blocks;
};

inline int64_t next_pow2_capped(int64_t x, int64_t cap) {
  int64_t p = 1;
  while (p < x && p < cap) p <<= 1;
  return p;
}

inline int group_size_for(int64_t D, int vec) { return static_cast<int>(next_pow2_capped(D / vec, 32)); }

// Widest vector (<= 16 bytes) that divides D and keeps every pointer aligned; then narrower while the launch
// would leave the GPU mostly idle and a head still fits in one warp. min_threads_in_flight is kMinThreadsInFlight
// except in the emulator's tests, which lower it to reach the narrow-group shapes with small problems.
template <typename scalar_t>
LaunchShape launch_shape(int64_t D, int64_t items, std::initializer_list<const void*> pointers,
                         int64_t min_threads_in_flight = kMinThreadsInFlight) {
  int vec = static_cast<int>(16 / sizeof(scalar_t));
  auto aligned = [&](int v) {
    for (const void* ptr : pointers) {
      if (reinterpret_cast<std::uintptr_t>(ptr) % (v * sizeof(scalar_t)) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && (D % vec != 0 || !aligned(vec))) vec /= 2;
  while (vec > 1 && items * group_size_for(D, vec) < min_threads_in_flight && D / (vec / 2) <= 32) vec /= 2;
  LaunchShape shape;
  shape.vec = vec;
  shape.group_size = group_size_for(D, vec);
  const int64_t lanes_needed = D / vec;
  shape.tiles = (lanes_needed + shape.group_size - 1) / shape.group_size;
  const int64_t groups_per_block = kThreads / shape.group_size;
  shape.blocks = std::min<int64_t>(kMaxBlocks, (items + groups_per_block - 1) / groups_per_block);
  return shape;
}

// Blocks of kThreads threads for a one-thread-per-element kernel.
inline int64_t blocks_for(int64_t threads) {
  return std::min<int64_t>(kMaxBlocks, (threads + kThreads - 1) / kThreads);
}

template <typename scalar_t, typename Launch>
void dispatch_vec(int vec, Launch&& launch) {
  constexpr int kMaxVec = static_cast<int>(16 / sizeof(scalar_t));
  if constexpr (kMaxVec >= 8) {
    if (vec == 8) return launch(std::integral_constant<int, 8>{});
  }
  if constexpr (kMaxVec >= 4) {
    if (vec == 4) return launch(std::integral_constant<int, 4>{});
  }
  if (vec == 2) return launch(std::integral_constant<int, 2>{});
  TORCH_CHECK(vec == 1, "ms_deform_attn (CUDA): internal error, unsupported vector width ", vec);
  launch(std::integral_constant<int, 1>{});
}

}  // namespace msda
}  // namespace deformable_detr
