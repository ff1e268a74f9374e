// Device code of the MSDA CUDA kernels: no launches, no c10/cuda includes. Compiled by nvcc through
// ms_deform_attn_cuda.cu and, as host C++, by the SIMT emulator of tests/simt/, which runs it on the CPU.
//
// Work split: one "item" is one (n, q, m) output head of D channels. A group of G lanes (a power of two <= 32,
// aligned inside a warp) owns an item; each lane owns VEC consecutive channels, moved as one 4-16 byte
// transaction. When D > G * VEC the group walks the channels in tiles. Design, byte counts and predictions:
// benchmarks/NOTES.md. Launch shapes: ms_deform_attn_launch.h.
//
// Points: level l owns points [level_points(s, l)) of each row's K (uniform P or the points_per_level table);
// sampling: bilinear (four corners) or discrete (nearest_corner: one corner, no location gradient).
//
// Non-finite rule (README "Backends", ms_deform_attn_math.h): a NaN x or y makes every channel of its head NaN, its
// location and weight gradients NaN, and adds nothing to grad_value; +-inf locations lie outside the map; a NaN
// attention weight propagates by IEEE arithmetic, also off the map (NaN * 0). bilinear_corners() reports NaN and
// infinite locations as !any, so the kernels test for NaN only on that rare off-map path.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

#include "ms_deform_attn/cuda/ms_deform_attn_launch.h"
#include "ms_deform_attn/cuda/ms_deform_attn_vec.cuh"
#include "ms_deform_attn/ms_deform_attn_checks.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace deformable_detr {
namespace msda {
namespace kernels {

using cuda_detail::atomic_add_vec;
using cuda_detail::group_sum;
using cuda_detail::load_vec;
using cuda_detail::store_vec;

// Items run query-fastest: the groups of a block then serve one head of neighbouring queries, which in the
// encoder sample neighbouring pixels of the same channel slice, so corner rows are shared through L1. Returns
// the (n, q, m) row of the item in the (N, Q, M, ...) layouts of locations, weights and out.
__device__ __forceinline__ int64_t head_row(int64_t item, int64_t Q, int64_t M, int64_t& n, int64_t& m) {
  const int64_t q = item % Q;
  const int64_t nm = item / Q;
  m = nm % M;
  n = nm / M;
  return (n * Q + q) * M + m;
}

// Register caps: 64 for float (4 blocks of 256 threads per SM, 50 %; uncapped 72 on sm_80 and sm_90), 80 otherwise
// (3 blocks, 37.5 %; the 8-wide half-precision instances take 89-91 uncapped on sm_90). The spills this costs stay
// outside the per-sample loop (benchmarks/NOTES.md, "Tuning driven by these facts").
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, (std::is_same_v<scalar_t, float> ? 4 : 3))
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ locations,
                   const at::opmath_type<scalar_t>* __restrict__ weights, scalar_t* __restrict__ out, Sizes s,
                   int group_size, int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = s.S, M = s.M, D = s.D, L = s.L, K = s.K;
  const bool discrete = s.discrete;
  const int64_t items = s.N * s.Q * M;
  const int64_t row_stride = M * D;
  const int lane = threadIdx.x & (group_size - 1);
  const int64_t groups_per_block = blockDim.x / group_size;
  const int64_t group = threadIdx.x / group_size;
  for (int64_t item = blockIdx.x * groups_per_block + group; item < items; item += gridDim.x * groups_per_block) {
    int64_t n, m;
    const int64_t row = head_row(item, s.Q, M, n, m);
    const acc_t* loc = locations + row * K * 2;
    const acc_t* att = weights + row * K;
    const scalar_t* value_nm = value + n * S * row_stride + m * D;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t d0 = (tile * group_size + lane) * VEC;
      if (d0 >= D) break;  // VEC divides D: a vector is either wholly inside the head or wholly outside
      acc_t acc[VEC] = {};
      for (int64_t l = 0; l < L; ++l) {
        // An empty (or corrupt) level is not skipped: its samples are off the map, where the non-finite rule
        // still applies.
        const Level lv = read_level(shapes, starts, l, S);
        const scalar_t* level = value_nm + lv.start * row_stride + d0;
        const PointRange points = level_points(s, l);
        for (int64_t sample = points.begin; sample < points.end; ++sample) {
          const acc_t x = loc[2 * sample], y = loc[2 * sample + 1];
          Corners<acc_t> c = sample_corners<acc_t>(x, y, lv.H, lv.W, discrete);
          if (!c.any) {
            // Off the map (or a NaN location): nothing to load, but a NaN location or a NaN weight (NaN * 0)
            // still poisons the head.
            const acc_t a = att[sample];
            if (location_is_nan(x, y) || a != a) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) acc[j] = quiet_nan<acc_t>();
            }
            continue;
          }
          // All four corner loads are issued before the first multiply, so their latencies overlap.
          acc_t v[4][VEC];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.valid[k]) {
              load_vec<acc_t, scalar_t, VEC>(level + c.offset[k] * row_stride, v[k]);
            } else {
#pragma unroll
              for (int j = 0; j < VEC; ++j) v[k][j] = 0;
            }
          }
          const acc_t a = att[sample];
#pragma unroll
          for (int k = 0; k < 4; ++k) c.weight[k] *= a;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t corner_values[4] = {v[0][j], v[1][j], v[2][j], v[3][j]};
            acc[j] += interpolate(c, corner_values);
          }
        }
      }
      store_vec<acc_t, scalar_t, VEC>(out + row * D + d0, acc);
    }
  }
}

// grad_value is the fp32 (fp64 for double) accumulation buffer, zero-filled; grad_locations / grad_weights are
// zero-filled and written once per sample by lane 0 of the owning group (no atomics, so they are deterministic).
// kAtomics = false leaves grad_value untouched: the deterministic path sums it separately (see below).
template <typename scalar_t, int VEC, bool kAtomics>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const at::opmath_type<scalar_t>* __restrict__ locations,
                    const at::opmath_type<scalar_t>* __restrict__ weights,
                    at::opmath_type<scalar_t>* __restrict__ grad_value,
                    at::opmath_type<scalar_t>* __restrict__ grad_locations,
                    at::opmath_type<scalar_t>* __restrict__ grad_weights, Sizes s, int group_size, int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = s.S, M = s.M, D = s.D, L = s.L, K = s.K;
  const bool discrete = s.discrete;
  const int64_t items = s.N * s.Q * M;
  const int64_t row_stride = M * D;
  const int lane = threadIdx.x & (group_size - 1);
  const int64_t groups_per_block = blockDim.x / group_size;
  const int64_t group = threadIdx.x / group_size;
  // The loop bound is block-uniform and items past the end still run it (writing nothing): group_sum needs
  // every lane of the warp.
  for (int64_t base = blockIdx.x * groups_per_block; base < items; base += gridDim.x * groups_per_block) {
    const bool item_ok = base + group < items;
    int64_t n, m;
    const int64_t row = head_row(item_ok ? base + group : 0, s.Q, M, n, m);
    const acc_t* loc = locations + row * K * 2;
    const acc_t* att = weights + row * K;
    const scalar_t* go = grad_out + row * D;
    const scalar_t* value_nm = value + n * S * row_stride + m * D;
    acc_t* grad_value_nm = grad_value + n * S * row_stride + m * D;
    // Channel layout. Default: lane owns VEC consecutive channels of each tile. Half types at VEC = 8 with atomics
    // ("split"): lane owns two runs of VEC / 2 channels, G * VEC / 2 apart, so each float4 RED of a group covers
    // whole 32-byte sectors of the fp32 buffer (contiguous 8 channels per lane would put the two REDs of a lane into
    // halves of one sector: 2x the L2 atomic sector operations, benchmarks/NOTES.md "Roofline"). Loads become two
    // 8-byte loads per corner, same sectors. Only the atomic path: the deterministic path keeps its summation order.
    constexpr bool kSplit = kAtomics && VEC == 8 && sizeof(scalar_t) == 2;
    constexpr int kParts = kSplit ? 2 : 1;
    constexpr int kPart = VEC / kParts;
    auto channel = [&](int64_t tile, int part) -> int64_t {
      return tile * group_size * VEC + part * group_size * kPart + lane * kPart;
    };
    // The first tile's upstream gradient stays in registers: for every D <= 32 * VEC it is the only tile.
    acc_t g_first[kParts][kPart] = {};
    const bool lane_ok = item_ok && channel(0, 0) < D;
    if (lane_ok) {
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        if (channel(0, p) < D) load_vec<acc_t, scalar_t, kPart>(go + channel(0, p), g_first[p]);
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      // Empty levels are not skipped (the non-finite rule applies off the map); the level is the same for every
      // lane, so the warp stays converged for group_sum either way.
      const Level lv = read_level(shapes, starts, l, S);
      const scalar_t* level = value_nm + lv.start * row_stride;
      acc_t* grad_level = grad_value_nm + lv.start * row_stride;
      const PointRange points = level_points(s, l);
      for (int64_t sample = points.begin; sample < points.end; ++sample) {
        const acc_t x = loc[2 * sample], y = loc[2 * sample + 1];
        // A sample off the map (NaN and +-inf locations included) loads no corner and adds nothing to grad_value;
        // its gradients follow the non-finite rule below. (Discrete sampling: only NaN locations and empty levels.)
        const Corners<acc_t> c = sample_corners<acc_t>(x, y, lv.H, lv.W, discrete);
        const acc_t a = att[sample];
        // dots[k] = <grad_out, corner k> over this lane's channels. The sampled value and its position gradient
        // are linear in the corner values, so they follow from the four dots (as in the CPU kernel), and being
        // linear they can be formed per lane and summed over the group afterwards: 3 reductions per sample.
        acc_t dots[4] = {0, 0, 0, 0};
        if (lane_ok && c.any) {
          for (int64_t tile = 0; tile < tiles; ++tile) {
            if (channel(tile, 0) >= D) break;
            bool part_ok[kParts];
#pragma unroll
            for (int p = 0; p < kParts; ++p) part_ok[p] = channel(tile, p) < D;
            acc_t g[kParts][kPart];
#pragma unroll
            for (int p = 0; p < kParts; ++p) {
              if (tile == 0) {
#pragma unroll
                for (int j = 0; j < kPart; ++j) g[p][j] = g_first[p][j];
              } else if (part_ok[p]) {
                load_vec<acc_t, scalar_t, kPart>(go + channel(tile, p), g[p]);
              } else {
#pragma unroll
                for (int j = 0; j < kPart; ++j) g[p][j] = 0;
              }
            }
            acc_t v[4][kParts][kPart];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
#pragma unroll
              for (int p = 0; p < kParts; ++p) {
                if (c.valid[k] && part_ok[p]) {
                  load_vec<acc_t, scalar_t, kPart>(level + c.offset[k] * row_stride + channel(tile, p), v[k][p]);
                } else {
#pragma unroll
                  for (int j = 0; j < kPart; ++j) v[k][p][j] = 0;
                }
              }
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) continue;
              const acc_t coeff = a * c.weight[k];
#pragma unroll
              for (int p = 0; p < kParts; ++p) {
                acc_t contribution[kPart];
#pragma unroll
                for (int j = 0; j < kPart; ++j) {
                  dots[k] += g[p][j] * v[k][p][j];
                  contribution[j] = coeff * g[p][j];
                }
                if constexpr (kAtomics) {
                  if (part_ok[p]) {
                    atomic_add_vec<kPart>(grad_level + c.offset[k] * row_stride + channel(tile, p), contribution);
                  }
                }
              }
            }
          }
        }
        acc_t grad_a = interpolate(c, dots);
        acc_t grad_w_im = 0, grad_h_im = 0;
        accumulate_position_grad(c, dots, a, grad_w_im, grad_h_im);
        grad_a = group_sum(grad_a, group_size);
        grad_w_im = group_sum(grad_w_im, group_size);
        grad_h_im = group_sum(grad_h_im, group_size);
        if (item_ok && lane == 0) {
          acc_t grad_x, grad_y;
          position_grad_to_location(grad_w_im, grad_h_im, lv.H, lv.W, grad_x, grad_y);
          if (discrete) grad_x = grad_y = 0;  // a gather: no location gradient
          if (!c.any) {
            // As the in-map formulas with zero corner values: a * 0 (NaN for a NaN weight; 0 for discrete
            // sampling) for the location and a zero weight gradient; all NaN for a NaN location.
            const bool nan_location = location_is_nan(x, y);
            grad_x = grad_y = nan_location ? quiet_nan<acc_t>()
                              : discrete   ? static_cast<acc_t>(0)
                                           : a * static_cast<acc_t>(0);
            grad_a = nan_location ? quiet_nan<acc_t>() : static_cast<acc_t>(0);
          }
          const int64_t idx = row * K + sample;
          grad_locations[2 * idx] = grad_x;
          grad_locations[2 * idx + 1] = grad_y;
          grad_weights[idx] = grad_a;
        }
      }
    }
  }
}

// ---- Deterministic grad_value (torch.use_deterministic_algorithms) --------------------------------------------
// Every (sample, corner) pair is an "entry" with id sample * 4 + k. Its destination is the (n, s, m) row of
// grad_value, keyed as (n * S + s) * M + m so that key * D is the row's element offset. A stable sort of the keys
// groups the entries of each destination into one run, ordered by entry id; one group of lanes then sums a run in
// that fixed order and writes the row once. No float atomics, so the result does not depend on scheduling.
constexpr int64_t kNoDestination = INT64_MAX;  // invalid corners: sort after every real key, never start a run

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    destination_keys_kernel(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                            const acc_t* __restrict__ locations, int64_t* __restrict__ keys, Sizes s) {
  const int64_t samples = s.N * s.Q * s.M * s.K;
  for (int64_t sample = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; sample < samples;
       sample += int64_t{gridDim.x} * blockDim.x) {
    // sample = row * K + p with row = (n * Q + q) * M + m, the layout of locations and weights.
    const int64_t row = sample / s.K;
    const int64_t l = level_of_point(s, sample % s.K);
    const int64_t m = row % s.M;
    const int64_t n = row / (s.Q * s.M);
    const Level lv = read_level(shapes, starts, l, s.S);
    // An empty level, a NaN or (bilinear) an infinite location gives no valid corner, hence no entry.
    const Corners<acc_t> c =
        sample_corners<acc_t>(locations[2 * sample], locations[2 * sample + 1], lv.H, lv.W, s.discrete);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      keys[4 * sample + k] = c.valid[k] ? (n * s.S + lv.start + c.offset[k]) * s.M + m : kNoDestination;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    run_start_flags_kernel(const int64_t* __restrict__ sorted_keys, bool* __restrict__ flags, int64_t entries) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < entries; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t key = sorted_keys[i];
    flags[i] = key != kNoDestination && (i == 0 || sorted_keys[i - 1] != key);
  }
}

// One group of lanes per run (destination row); each lane owns VEC channels per tile and adds a * w_k * grad_out
// of the run's entries in sorted order. The corner weight is recomputed exactly as backward_kernel computes it.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_grad_value_kernel(const scalar_t* __restrict__ grad_out, const int64_t* __restrict__ shapes,
                             const int64_t* __restrict__ starts,
                             const at::opmath_type<scalar_t>* __restrict__ locations,
                             const at::opmath_type<scalar_t>* __restrict__ weights,
                             const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ entry_ids,
                             const int64_t* __restrict__ run_starts, int64_t runs, int64_t entries,
                             at::opmath_type<scalar_t>* __restrict__ grad_value, Sizes s, int group_size,
                             int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = s.D, K = s.K;
  const int lane = threadIdx.x & (group_size - 1);
  const int64_t groups_per_block = blockDim.x / group_size;
  const int64_t group = threadIdx.x / group_size;
  for (int64_t run = blockIdx.x * groups_per_block + group; run < runs; run += gridDim.x * groups_per_block) {
    const int64_t first = run_starts[run];
    const int64_t key = sorted_keys[first];
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t d0 = (tile * group_size + lane) * VEC;
      if (d0 >= D) break;
      acc_t acc[VEC] = {};
      for (int64_t i = first; i < entries && sorted_keys[i] == key; ++i) {
        const int64_t entry = entry_ids[i];
        const int64_t sample = entry >> 2;
        const int k = static_cast<int>(entry & 3);
        const int64_t row = sample / K;
        const int64_t l = level_of_point(s, sample % K);
        const Level lv = read_level(shapes, starts, l, s.S);
        const Corners<acc_t> c =
            sample_corners<acc_t>(locations[2 * sample], locations[2 * sample + 1], lv.H, lv.W, s.discrete);
        // A run-time index into c.weight would keep the whole Corners struct in local memory: select instead.
        const acc_t corner_weight = k == 0 ? c.weight[0] : k == 1 ? c.weight[1] : k == 2 ? c.weight[2] : c.weight[3];
        const acc_t coeff = weights[sample] * corner_weight;
        acc_t g[VEC];
        load_vec<acc_t, scalar_t, VEC>(grad_out + row * D + d0, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += coeff * g[j];
      }
      store_vec<acc_t, acc_t, VEC>(grad_value + key * D + d0, acc);
    }
  }
}

}  // namespace kernels
}  // namespace msda
}  // namespace deformable_detr
