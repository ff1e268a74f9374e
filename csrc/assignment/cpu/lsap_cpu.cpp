// CPU batched linear sum assignment: problems in parallel (see BatchJob), each solved sequentially with the
// shared pieces of lsap_core.h, i.e. the same steps and tie rule as the CUDA kernel and scipy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

#include "assignment/lsap_checks.h"
#include "assignment/lsap_core.h"

namespace deformable_detr {
namespace lsap {
namespace {

// Per-thread scratch, reused across the problems a thread solves.
struct Workspace {
  std::vector<double> u, v, shortest;
  std::vector<int32_t> path, col4row, row4col, remaining, pos, taken_from;
};

// NaN or -inf anywhere in the rows x cols block. One comparison per entry so the loop vectorises; the solver only
// ever sees costs that passed it.
template <typename scalar_t>
bool has_invalid_entry(const scalar_t* cost, int64_t rows, int64_t cols, int64_t ld) {
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  int bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = cost + r * ld;
    for (int64_t c = 0; c < cols; ++c) bad |= static_cast<int>(!(row[c] > neg_inf));
  }
  return bad != 0;
}

// Solves one rows x cols problem (row stride ld); writes out[rows] (column or -1) and returns its Status.
template <typename scalar_t>
int32_t solve_one(const scalar_t* cost, int64_t rows, int64_t cols, int64_t ld, int64_t* out, Workspace& ws) {
  std::fill(out, out + rows, int64_t(-1));
  if (rows == 0 || cols == 0) return kOk;
  if (has_invalid_entry(cost, rows, cols, ld)) return kInvalidEntry;
  const Orientation o = orient(rows, cols);
  const int32_t nr = o.nr, nc = o.nc;

  ws.u.assign(nr, 0.0);
  ws.v.assign(nc, 0.0);
  ws.shortest.resize(nc);
  ws.path.assign(nc, -1);
  ws.col4row.assign(nr, -1);
  ws.row4col.assign(nc, -1);
  ws.remaining.resize(nc);
  ws.pos.resize(nc);
  ws.taken_from.resize(nc);
  double* u = ws.u.data();
  double* v = ws.v.data();
  double* shortest = ws.shortest.data();
  int32_t* path = ws.path.data();
  int32_t* col4row = ws.col4row.data();
  int32_t* row4col = ws.row4col.data();
  int32_t* remaining = ws.remaining.data();
  int32_t* pos = ws.pos.data();
  int32_t* taken_from = ws.taken_from.data();
  for (int32_t it = 0; it < nc; ++it) reset_remaining(it, nc, remaining, pos);

  // Rows are read in place (a transposed row is strided): copying the matrix costs as much as all the scans of a
  // typical 300 x 20 matcher problem, where almost every search ends after its first step.
  for (int32_t cur_row = 0; cur_row < nr; ++cur_row) {
    const auto first_row = working_row(cost, ld, o.transpose, cur_row);
    int32_t num_remaining = nc, sink = -1;
    Candidate best = first_step(first_row, u[cur_row], 0, nc, 1, v, pos, row4col);
    double min_val;
    for (bool first = true;; first = false) {
      min_val = best.dist;
      if (min_val == infinity()) return kInfeasible;
      const int32_t j = take_column(best.key, nc, num_remaining, remaining, pos, taken_from);
      if (row4col[j] == -1) {
        if (first) {
          shortest[j] = min_val;
          path[j] = cur_row;
        }
        sink = j;
        break;
      }
      if (first) first_step_fill(first_row, u[cur_row], cur_row, 0, nc, 1, v, shortest, path);
      const int32_t i = row4col[j];
      best = next_step(working_row(cost, ld, o.transpose, i), min_val, u[i], i, 0, num_remaining, 1, remaining, v,
                       shortest, path, row4col);
    }

    // Dual update before augmenting: it reads the tree's matching.
    u[cur_row] += min_val;
    for (int32_t it = num_remaining; it < nc; ++it) update_duals(remaining[it], sink, min_val, shortest, row4col, u, v);
    restore_remaining(num_remaining, nc, remaining, pos, taken_from);
    augment(cur_row, sink, path, row4col, col4row);
  }

  if (o.transpose) {
    for (int32_t i = 0; i < nr; ++i) out[col4row[i]] = i;
  } else {
    for (int32_t i = 0; i < nr; ++i) out[i] = col4row[i];
  }
  return kOk;
}

// Problems are claimed one at a time from a shared counter by the calling thread and by up to (threads - 1)
// helpers queued on the inter-op pool. The caller never waits for a helper to start, only for problems a helper
// has already claimed. Why not at::parallel_for: on a loaded machine a woken thread may get no core for
// milliseconds, and the OpenMP region (static split, join barrier) measured 10x slower than one thread at
// 112 x 300 x 20 on 2 cores busy with other processes; this scheme degrades to the one-thread time instead.
template <typename scalar_t>
struct BatchJob {
  const scalar_t* cost;
  const int64_t* num_cols;
  int64_t B, N, M;
  int64_t* out;
  int32_t* status;
  std::atomic<int64_t> next{0}, finished{0};
  std::atomic<bool> failed{false};

  void solve(int64_t b, Workspace& ws) {
    const int64_t cols = num_cols ? num_cols[b] : M;
    int64_t* rows = out + b * N;
    status[b] = (cols < 0 || cols > M) ? kBadNumCols : solve_one<scalar_t>(cost + b * N * M, N, cols, M, rows, ws);
    if (status[b] != kOk) std::fill(rows, rows + N, int64_t(-1));
  }

  void work() {
    Workspace ws;
    for (int64_t b = next.fetch_add(1); b < B; b = next.fetch_add(1)) {
      try {
        solve(b, ws);
      } catch (...) {  // bad_alloc: reported by the caller, and the count must still reach B
        failed.store(true);
      }
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

std::tuple<at::Tensor, at::Tensor> batched_lsap_cpu(const at::Tensor& cost_in,
                                                    const std::optional<at::Tensor>& num_cols_in) {
  const Batch batch = prepare_batch(cost_in, num_cols_in);
  const at::Tensor& cost = batch.cost;
  const int64_t B = batch.B, N = batch.N, M = batch.M;
  if (B == 0) return {batch.assignment, batch.status};
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "batched_lsap_cpu", [&] {
    auto job = std::make_shared<BatchJob<scalar_t>>();
    job->cost = cost.const_data_ptr<scalar_t>();
    job->num_cols = batch.num_cols_ptr();
    job->B = B;
    job->N = N;
    job->M = M;
    job->out = batch.assignment.mutable_data_ptr<int64_t>();
    job->status = batch.status.mutable_data_ptr<int32_t>();
    // A helper costs a thread wake-up (~10 us): only worth it for more than a few microseconds of solving.
    const int64_t elements = B * N * std::max<int64_t>(M, 1);
    const int64_t helpers = elements < 32768 ? 0 : std::min<int64_t>(at::get_num_threads() - 1, B - 1);
    for (int64_t h = 0; h < helpers; ++h) at::launch([job] { job->work(); });
    job->work();
    while (job->finished.load(std::memory_order_acquire) < B) std::this_thread::yield();
    TORCH_CHECK(!job->failed.load(), "batched_lsap: out of memory while solving");
  });
  return {batch.assignment, batch.status};
}

}  // namespace
}  // namespace lsap
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) { m.impl("batched_lsap", &deformable_detr::lsap::batched_lsap_cpu); }
