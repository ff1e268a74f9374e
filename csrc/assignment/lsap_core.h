// Shortest-augmenting-path linear sum assignment (Crouse 2016, the algorithm of scipy's
// scipy/optimize/rectangular_lsap), the pieces shared by the sequential CPU solver and the block-parallel CUDA
// solver. Keeping them in one place is what makes both backends return scipy's indices:
//
// - A problem with more rows than columns is solved transposed (rows <-> columns), as scipy does, so the working
//   problem always has nr <= nc and every row gets a column.
// - All dual arithmetic is float64 whatever the input dtype (scipy converts its input to float64); a float32
//   cost is widened exactly, so the same reduced costs, the same comparisons and the same ties come out.
// - scipy scans its "remaining" column list (filled in reverse, swap-with-last removal) and picks the column by
//   the rule: lowest tentative distance; among equals, an unassigned column wins over an assigned one, the LAST
//   unassigned one in scan order, else the FIRST assigned one. We keep that list only to know each column's
//   position in it (pos[]), scan columns in index order (contiguous, strided over CUDA threads), and encode the
//   rule as a total order on (distance, key) below, so a reduction in any order picks scipy's column.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "common/portability.h"

namespace deformable_detr {
namespace lsap {

// Per-problem status written by both backends (the Python wrapper turns non-zero into a ValueError).
enum Status : int32_t {
  kOk = 0,
  kInvalidEntry = 1,  // NaN or -inf among the problem's costs
  kInfeasible = 2,    // no complete assignment of finite cost (+inf marks a forbidden edge)
  kBadNumCols = 3,    // num_cols[b] outside [0, M]
};

// Column keys encode scipy's tie rule in one int: unassigned columns rank above assigned ones; among unassigned
// a later scan position ranks higher, among assigned an earlier one does. Positions must stay below 2^30.
constexpr int32_t kFreeBase = int32_t(1) << 30;
constexpr int64_t kMaxDim = int64_t(kFreeBase) - 1;

DDETR_HOST_DEVICE_INLINE int32_t column_key(int32_t position, bool unassigned) {
  return unassigned ? kFreeBase + position : kFreeBase - 1 - position;
}

DDETR_HOST_DEVICE_INLINE int32_t key_position(int32_t key) {
  return key >= kFreeBase ? key - kFreeBase : kFreeBase - 1 - key;
}

struct Candidate {
  double dist;
  int32_t key;
};

DDETR_HOST_DEVICE_INLINE double infinity() { return std::numeric_limits<double>::infinity(); }

DDETR_HOST_DEVICE_INLINE Candidate no_candidate() { return Candidate{infinity(), -1}; }

// True when a should be picked over b. Distances are never NaN (NaN costs are rejected before solving).
DDETR_HOST_DEVICE_INLINE bool better(const Candidate& a, const Candidate& b) {
  return a.dist < b.dist || (a.dist == b.dist && a.key > b.key);
}

DDETR_HOST_DEVICE_INLINE Candidate pick(const Candidate& a, const Candidate& b) { return better(a, b) ? a : b; }

DDETR_HOST_DEVICE_INLINE bool invalid_cost(double x) { return x != x || x == -infinity(); }

// Working orientation of problem with `rows` x `cols` costs (row stride `ld` in the input).
struct Orientation {
  int32_t nr, nc;
  bool transpose;
};

DDETR_HOST_DEVICE_INLINE Orientation orient(int64_t rows, int64_t cols) {
  const bool transpose = cols < rows;
  return Orientation{static_cast<int32_t>(transpose ? cols : rows), static_cast<int32_t>(transpose ? rows : cols),
                     transpose};
}

// A cost read as float64.
template <typename T>
DDETR_HOST_DEVICE_INLINE double widen(T x) {
  return static_cast<double>(x);
}

// float -> float64 that keeps subnormals under --use_fast_math, where nvcc emits the plain widening as
// cvt.ftz.f64.f32 (subnormal costs became 0 and ties broke unlike scipy). A subnormal is mantissa x 2^-149, formed
// from its bits with integer and float64 arithmetic, which FTZ does not touch; every other float widens exactly.
DDETR_HOST_DEVICE_INLINE double widen(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) != 0) return static_cast<double>(x);
  const double magnitude = static_cast<double>(bits & 0x007fffffu) * 0x1p-149;
  return (bits >> 31) != 0 ? -magnitude : magnitude;
}

// Row i of the working problem, read as float64 (a float32 cost widens exactly).
template <typename T>
struct StridedRow {
  const T* data;
  int64_t stride;
  DDETR_HOST_DEVICE_INLINE double operator()(int32_t j) const { return widen(data[j * stride]); }
};

template <typename T>
DDETR_HOST_DEVICE_INLINE StridedRow<T> working_row(const T* cost, int64_t ld, bool transpose, int32_t i) {
  return transpose ? StridedRow<T>{cost + i, ld} : StridedRow<T>{cost + int64_t(i) * ld, 1};
}

// scipy's reduced cost, evaluated in the same order so rounding is identical.
DDETR_HOST_DEVICE_INLINE double reduced_cost(double min_val, double c, double u_i, double v_j) {
  return min_val + c - u_i - v_j;
}

// Columns are visited in index order (contiguous loads, strided across CUDA threads) rather than in scipy's
// remaining-list order; pos[j] is column j's position in that list, so the key still follows scipy. The key costs
// two loads, so it is only built when the column can win.
DDETR_HOST_DEVICE_INLINE void offer(Candidate& best, double d, int32_t j, const int32_t* pos, const int32_t* row4col) {
  if (d <= best.dist) best = pick(Candidate{d, column_key(pos[j], row4col[j] == -1)}, best);
}

// First Dijkstra step of the search from row i over columns begin, begin + stride, ... < end. Nothing is scanned
// yet and every tentative distance is infinite (min_val = 0), so each column's distance is simply this row's
// reduced cost. Most searches end right here at an unassigned column, so the step only reads: the distances are
// written by first_step_fill when the search goes on, and for the sink alone otherwise.
template <class Row>
DDETR_HOST_DEVICE_INLINE Candidate first_step(const Row& row, double u_i, int32_t begin, int32_t end, int32_t stride,
                                              const double* v, const int32_t* pos, const int32_t* row4col) {
  // Chunks of kChunk columns: their reduced costs are computed together (SIMD on the CPU, independent loads on the
  // GPU) and only a chunk holding a column that can win is offered column by column, in order. best only
  // decreases, so skipping a chunk with no d <= best (at chunk start) changes nothing.
  constexpr int kChunk = 8;
  Candidate best = no_candidate();
  int32_t j = begin;
  for (; j + (kChunk - 1) * stride < end; j += kChunk * stride) {
    double r[kChunk];
    DDETR_UNROLL
    for (int k = 0; k < kChunk; ++k) r[k] = reduced_cost(0.0, row(j + k * stride), u_i, v[j + k * stride]);
    bool can_win = false;
    DDETR_UNROLL
    for (int k = 0; k < kChunk; ++k) can_win |= r[k] <= best.dist;
    if (can_win) {
      for (int k = 0; k < kChunk; ++k) offer(best, r[k], j + k * stride, pos, row4col);
    }
  }
  for (; j < end; j += stride) offer(best, reduced_cost(0.0, row(j), u_i, v[j]), j, pos, row4col);
  return best;
}

// The first step's distances and predecessors, recomputed bit for bit. (scipy leaves path[j] unset when the cost
// is +inf; such a column keeps an infinite distance until a later step sets both, so that value is never read.)
template <class Row>
DDETR_HOST_DEVICE_INLINE void first_step_fill(const Row& row, double u_i, int32_t i, int32_t begin, int32_t end,
                                              int32_t stride, const double* v, double* shortest, int32_t* path) {
  for (int32_t j = begin; j < end; j += stride) {
    shortest[j] = reduced_cost(0.0, row(j), u_i, v[j]);
    path[j] = i;
  }
}

// A later Dijkstra step from tree row i: relax the columns still in the remaining list (positions begin,
// begin + stride, ... < num_remaining, as scipy scans them) and return the best. The list shrinks as the search
// grows, which matters for square problems, where searches run long.
template <class Row>
DDETR_HOST_DEVICE_INLINE Candidate next_step(const Row& row, double min_val, double u_i, int32_t i, int32_t begin,
                                             int32_t num_remaining, int32_t stride, const int32_t* remaining,
                                             const double* v, double* shortest, int32_t* path, const int32_t* row4col) {
  Candidate best = no_candidate();
  for (int32_t it = begin; it < num_remaining; it += stride) {
    const int32_t j = remaining[it];
    const double r = reduced_cost(min_val, row(j), u_i, v[j]);
    double d = shortest[j];
    if (r < d) {
      shortest[j] = r;
      path[j] = i;
      d = r;
    }
    if (d <= best.dist) best = pick(Candidate{d, column_key(it, row4col[j] == -1)}, best);
  }
  return best;
}

// scipy's remaining list in its initial order (filled in reverse: a constant matrix gives the identity).
DDETR_HOST_DEVICE_INLINE void reset_remaining(int32_t it, int32_t nc, int32_t* remaining, int32_t* pos) {
  remaining[it] = nc - it - 1;
  pos[nc - it - 1] = it;
}

// Removes the winning column from the remaining list as scipy does (the last entry takes its place) and parks it
// in the tail, so remaining[num_remaining:] lists the scanned columns (scipy's SC); taken_from[k] records where
// the k-th removal came from, for restore_remaining. Returns the column.
DDETR_HOST_DEVICE_INLINE int32_t take_column(int32_t key, int32_t nc, int32_t& num_remaining, int32_t* remaining,
                                             int32_t* pos, int32_t* taken_from) {
  const int32_t index = key_position(key);
  const int32_t j = remaining[index];
  taken_from[nc - num_remaining] = index;
  const int32_t last = remaining[--num_remaining];
  remaining[index] = last;
  pos[last] = index;
  remaining[num_remaining] = j;
  pos[j] = num_remaining;
  return j;
}

// Undoes one search's removals in reverse order: scipy rebuilds the list for every row, this puts it back into its
// initial order in O(path length) instead of O(nc) (most searches end after one step).
DDETR_HOST_DEVICE_INLINE void restore_remaining(int32_t num_remaining, int32_t nc, int32_t* remaining, int32_t* pos,
                                                const int32_t* taken_from) {
  for (int32_t k = nc - 1 - num_remaining; k >= 0; --k) {
    const int32_t tail = nc - 1 - k, index = taken_from[k];
    const int32_t j = remaining[tail], moved = remaining[index];
    remaining[tail] = moved;
    pos[moved] = tail;
    remaining[index] = j;
    pos[j] = index;
  }
}

// Dual update for one column scanned by the Dijkstra tree that ended at `sink` (call it for every scanned column,
// after u[cur_row] += min_val). scipy updates u of the tree rows and v of the scanned columns; every scanned
// column but the sink is matched to exactly one tree row (row4col[j], with col4row of it == j), so a parallel
// loop over scanned columns touches each dual once, with scipy's expressions.
DDETR_HOST_DEVICE_INLINE void update_duals(int32_t j, int32_t sink, double min_val, const double* shortest,
                                           const int32_t* row4col, double* u, double* v) {
  const double delta = min_val - shortest[j];
  v[j] -= delta;
  if (j != sink) u[row4col[j]] += delta;
}

// Flips the alternating path ending at `sink` back to `cur_row` (sequential: the path is a linked list).
DDETR_HOST_DEVICE_INLINE void augment(int32_t cur_row, int32_t sink, const int32_t* path, int32_t* row4col,
                                      int32_t* col4row) {
  int32_t j = sink;
  while (true) {
    const int32_t i = path[j];
    row4col[j] = i;
    const int32_t previous = col4row[i];
    col4row[i] = j;
    j = previous;
    if (i == cur_row) break;
  }
}

}  // namespace lsap
}  // namespace deformable_detr
