// What one kernel launch ran with. Every op's host flow passes it to its Device policy's launch(): the SIMT
// emulator (tests/simt/device.h) records it in its coverage table, the CUDA policy (common/cuda_device.h) ignores it.
#pragma once

#include <cstdint>

namespace deformable_detr {

struct LaunchInfo {
  const char* kernel;
  int vec;         // 0 for kernels without channel vectors
  int group_size;  // lanes per head / run, or threads per block (0 when not meaningful)
  int64_t tiles;
};

}  // namespace deformable_detr
