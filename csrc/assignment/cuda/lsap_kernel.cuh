// Device code of the batched LSAP solver: one thread block per problem, all problems in one launch. Each Dijkstra
// step of the shortest augmenting path spreads its column scan over the block and picks the next column with a
// block reduction under lsap_core.h's total order, so the result is scipy's (same scan positions, same tie rule,
// float64 duals). Errors never trap: each problem writes a status (lsap_core.h Status) and leaves its rows at -1.
// No launches and no c10/cuda includes: compiled by nvcc through lsap_cuda.cu and, as host C++, by the SIMT
// emulator of tests/simt/. Launch parameters: lsap_launch.h.
#pragma once

#include <cstdint>

#include "assignment/cuda/lsap_launch.h"
#include "assignment/lsap_core.h"

// All of the block's shared memory is the dynamic allocation, so the emulator can poison-fill it per block.
#if !defined(DDETR_DYNAMIC_SHARED)
#define DDETR_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace deformable_detr {
namespace lsap {

__device__ __forceinline__ Candidate warp_reduce(Candidate c) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const Candidate other{__shfl_down_sync(0xffffffffu, c.dist, offset), __shfl_down_sync(0xffffffffu, c.key, offset)};
    c = pick(other, c);
  }
  return c;
}

// blockDim.x must be a multiple of 32 (full warps for the shuffles) and at most kMaxThreads.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    batched_lsap_kernel(const scalar_t* __restrict__ cost, const int64_t* __restrict__ num_cols, int32_t N, int32_t M,
                        int64_t* __restrict__ assignment, int32_t* __restrict__ status,
                        unsigned char* __restrict__ global_state, int32_t nr_cap, int32_t nc_cap, bool state_in_shared,
                        bool cache_cost) {
  DDETR_DYNAMIC_SHARED(shared_memory);
  BlockShared& sh = *reinterpret_cast<BlockShared*>(shared_memory);
  unsigned char* shared_state = shared_memory + sizeof(BlockShared);
  Candidate* warp_best = sh.warp_best;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, num_threads = blockDim.x;
  const int lane = tid % kWarpSize, warp = tid / kWarpSize, num_warps = num_threads / kWarpSize;
  const scalar_t* problem = cost + b * int64_t(N) * M;
  int64_t* out = assignment + b * N;

  for (int32_t r = tid; r < N; r += num_threads) out[r] = -1;
  const int64_t cols = num_cols != nullptr ? num_cols[b] : M;
  // Every early return below is taken by the whole block (it depends on block-uniform values only).
  if (cols < 0 || cols > M) {
    if (tid == 0) status[b] = kBadNumCols;
    return;
  }
  if (N == 0 || cols == 0) {
    if (tid == 0) status[b] = kOk;
    return;
  }
  const Orientation o = orient(N, cols);
  const int32_t nr = o.nr, nc = o.nc;

  unsigned char* base = state_in_shared ? shared_state : global_state + b * state_bytes(nr_cap, nc_cap);
  double* u = reinterpret_cast<double*>(base);
  double* v = u + nr_cap;
  double* shortest = v + nc_cap;
  int32_t* path = reinterpret_cast<int32_t*>(shortest + nc_cap);
  int32_t* row4col = path + nc_cap;
  int32_t* remaining = row4col + nc_cap;
  int32_t* pos = remaining + nc_cap;
  int32_t* taken_from = pos + nc_cap;
  int32_t* col4row = taken_from + nc_cap;
  scalar_t* cached = reinterpret_cast<scalar_t*>(shared_state + state_bytes(nr_cap, nc_cap));

  // One coalesced pass over the problem: reject NaN/-inf and, when it fits, keep the costs in shared memory in
  // working orientation (the transposed case would otherwise read one cache line per column in every step).
  bool bad = false;
  for (int32_t r = 0; r < N; ++r) {
    for (int32_t c = tid; c < cols; c += num_threads) {
      const scalar_t x = problem[int64_t(r) * M + c];
      bad |= invalid_cost(widen(x));
      if (cache_cost) cached[o.transpose ? int64_t(c) * nc + r : int64_t(r) * nc + c] = x;
    }
  }
  for (int32_t i = tid; i < nr; i += num_threads) {
    u[i] = 0.0;
    col4row[i] = -1;
  }
  for (int32_t j = tid; j < nc; j += num_threads) {
    v[j] = 0.0;
    path[j] = -1;
    row4col[j] = -1;
    reset_remaining(j, nc, remaining, pos);
  }
  if (__syncthreads_or(bad)) {
    if (tid == 0) status[b] = kInvalidEntry;
    return;
  }
  const scalar_t* working = cache_cost ? cached : problem;
  const int64_t ld = cache_cost ? nc : M;
  const bool transpose = cache_cost ? false : o.transpose;

  for (int32_t cur_row = 0; cur_row < nr; ++cur_row) {
    const StridedRow<scalar_t> first_row = working_row(working, ld, transpose, cur_row);
    int32_t i = cur_row, num_remaining = nc, sink = -1;
    double min_val = 0.0;
    for (bool first = true;; first = false) {
      // Within a step every column sits at one scan position, so one thread writes its shortest/path entries;
      // between steps the barriers below order those writes.
      const Candidate mine = first ? first_step(first_row, u[cur_row], tid, nc, num_threads, v, pos, row4col)
                                   : next_step(working_row(working, ld, transpose, i), min_val, u[i], i, tid,
                                               num_remaining, num_threads, remaining, v, shortest, path, row4col);
      const Candidate warp_winner = warp_reduce(mine);
      if (lane == 0) warp_best[warp] = warp_winner;
      __syncthreads();
      if (warp == 0) {
        const Candidate best = warp_reduce(lane < num_warps ? warp_best[lane] : no_candidate());
        if (lane == 0) {
          sh.next_min_val = best.dist;
          if (best.dist == infinity()) {
            sh.next_sink = -2;
          } else {
            int32_t left = num_remaining;  // every thread decrements its own copy below
            const int32_t j = take_column(best.key, nc, left, remaining, pos, taken_from);
            sh.next_row = row4col[j];
            sh.next_sink = row4col[j] == -1 ? j : -1;
            if (first && sh.next_sink == j) {  // the first step writes no distances (see first_step)
              shortest[j] = best.dist;
              path[j] = cur_row;
            }
          }
        }
      }
      __syncthreads();
      min_val = sh.next_min_val;
      sink = sh.next_sink;
      i = sh.next_row;
      --num_remaining;
      if (sink != -1) break;
      if (first) {
        // Written by column index, read next step by list position: a different thread, hence the barrier.
        first_step_fill(first_row, u[cur_row], cur_row, tid, nc, num_threads, v, shortest, path);
        __syncthreads();
      }
    }
    if (sink == -2) {
      // Rows written so far are still -1: only the final loop below writes assignments.
      if (tid == 0) status[b] = kInfeasible;
      return;
    }
    if (tid == 0) u[cur_row] += min_val;
    for (int32_t it = num_remaining + tid; it < nc; it += num_threads) {
      update_duals(remaining[it], sink, min_val, shortest, row4col, u, v);
    }
    __syncthreads();
    if (tid == 0) {
      restore_remaining(num_remaining, nc, remaining, pos, taken_from);
      augment(cur_row, sink, path, row4col, col4row);
    }
    __syncthreads();
  }

  for (int32_t i = tid; i < nr; i += num_threads) {
    const int32_t j = col4row[i];
    if (o.transpose) {
      out[j] = i;
    } else {
      out[i] = j;
    }
  }
  if (tid == 0) status[b] = kOk;
}

}  // namespace lsap
}  // namespace deformable_detr
