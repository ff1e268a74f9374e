// Planted bugs: small kernels with one defect each, run by tests/test_simt_selftest.py, which asserts that the
// emulator reports every one of them (an error for the rendezvous and memory bugs, seed- or poison-dependent
// output for the races).
#include "simt.h"
// clang-format off
#include "device.h"
#include "ops.h"
#include "ms_deform_attn/cuda/ms_deform_attn_vec.cuh"
// clang-format on

#include <stdexcept>

namespace simt {
namespace {

using deformable_detr::msda::cuda_detail::load_vec;

__global__ void divergent_shuffle(float* out) {
  float x = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
  } else {
    x += __shfl_xor_sync(0xffffffffu, x, 2);
  }
  out[threadIdx.x] = x;
}

__global__ void exit_before_shuffle(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void barrier_after_exit(float* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void different_barriers(float* out) {
  if (threadIdx.x < 8) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Reads a neighbour's shared slot without the barrier between the write and the read.
__global__ void missing_barrier(float* out) {
  DDETR_DYNAMIC_SHARED(shared);
  float* slots = reinterpret_cast<float*>(shared);
  slots[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// Reads 4 floats starting 2 before the end of a 6-float buffer.
__global__ void tail_overrun(const float* in, float* out) {
  float v[4];
  load_vec<float, float, 4>(in + 4 * threadIdx.x, v);
  out[threadIdx.x] = v[0];
}

__global__ void misaligned_load(const float* in, float* out) {
  float v[4];
  load_vec<float, float, 4>(in + 1, v);
  out[threadIdx.x] = v[0];
}

// A plain (scalar) load one element past the end: no check hook, so the guard page must catch it.
__global__ void guard_page_read(const float* in, float* out) { out[threadIdx.x] = in[6 + threadIdx.x]; }

// Every thread writes the same word: the last writer wins, and the order is the schedule's.
__global__ void write_race(float* out) { out[0] = static_cast<float>(threadIdx.x + 1); }

}  // namespace

at::Tensor planted(const std::string& name, uint64_t seed, int poison) {
  Config& c = config();
  const Config saved = c;
  c.seed = seed;
  c.poison = poison;
  SimtDevice dev{at::kFloat};
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = dev.zeros({64}, opts);
  float* o = out.data_ptr<float>();
  const deformable_detr::LaunchInfo info{"planted", 0, 0, 0};
  try {
    if (name == "divergent_shuffle") {
      dev.launch(info, divergent_shuffle, 1, 64, 0, o);
    } else if (name == "exit_before_shuffle") {
      dev.launch(info, exit_before_shuffle, 1, 32, 0, o);
    } else if (name == "barrier_after_exit") {
      dev.launch(info, barrier_after_exit, 1, 32, 0, o);
    } else if (name == "different_barriers") {
      dev.launch(info, different_barriers, 1, 32, 0, o);
    } else if (name == "missing_barrier") {
      dev.launch(info, missing_barrier, 1, 64, 64 * sizeof(float), o);
    } else if (name == "tail_overrun") {
      at::Tensor in = dev.adopt(at::ones({6}, opts));
      dev.launch(info, tail_overrun, 1, 2, 0, static_cast<const float*>(in.data_ptr<float>()), o);
    } else if (name == "misaligned_load") {
      at::Tensor in = dev.adopt(at::ones({16}, opts));
      dev.launch(info, misaligned_load, 1, 1, 0, static_cast<const float*>(in.data_ptr<float>()), o);
    } else if (name == "guard_page_read") {
      at::Tensor in = dev.adopt(at::ones({6}, opts));
      dev.launch(info, guard_page_read, 1, 1, 0, static_cast<const float*>(in.data_ptr<float>()), o);
    } else if (name == "write_race") {
      dev.launch(info, write_race, 1, 64, 0, o);
    } else {
      throw std::invalid_argument("simt: unknown planted bug " + name);
    }
  } catch (...) {
    c = saved;
    throw;
  }
  c = saved;
  return out.clone();
}

}  // namespace simt
