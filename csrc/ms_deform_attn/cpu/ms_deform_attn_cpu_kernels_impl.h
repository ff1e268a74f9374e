// CPU kernel bodies of multi-scale deformable attention, compiled once per instruction set: the baseline ISA
// (ms_deform_attn_cpu.cpp), AVX2+FMA (_avx2.cpp) and AVX-512 (_avx512.cpp), picked at run time. Include only
// after defining DDETR_CPU_ISA (the namespace of this copy) and after every system/ATen header, so that a target
// pragma in force around this include reaches our kernels alone.
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
// The 32-byte vectors below only live in inlined code of this file; the baseline copy's ABI note is moot.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "ms_deform_attn/cpu/ms_deform_attn_cpu_sample_batch.h"

namespace deformable_detr {
namespace msda {
namespace DDETR_CPU_ISA {
namespace {

// 32-byte vectors of the accumulation type (GCC/Clang vector extensions): one ymm register in the AVX2 copy, a
// pair of xmm registers in the baseline copy. Used when value is already in acc_t (float, double) and the head
// dim is a compile-time multiple of the lane count; everything else (bf16, generic D, other compilers) takes the
// scalar channel loops.
template <typename acc_t>
struct Vec {
  static constexpr int kLanes = 0;
};
#if defined(__GNUC__) || defined(__clang__)
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

// The four lane sums of d[0..3] by a transposing add tree (what haddps does), not four serial reductions.
inline void lane_sums(const Vec<float>::type d[4], float out[4]) {
  using V = Vec<float>::type;
  const V h1 = __builtin_shufflevector(d[0], d[1], 0, 2, 8, 10, 4, 6, 12, 14) +
               __builtin_shufflevector(d[0], d[1], 1, 3, 9, 11, 5, 7, 13, 15);
  const V h2 = __builtin_shufflevector(d[2], d[3], 0, 2, 8, 10, 4, 6, 12, 14) +
               __builtin_shufflevector(d[2], d[3], 1, 3, 9, 11, 5, 7, 13, 15);
  const V h3 = __builtin_shufflevector(h1, h2, 0, 2, 8, 10, 4, 6, 12, 14) +
               __builtin_shufflevector(h1, h2, 1, 3, 9, 11, 5, 7, 13, 15);
  for (int k = 0; k < 4; ++k) out[k] = h3[k] + h3[k + 4];
}
// Eight bf16 values widened to a float vector: bf16 is the high half of a float (zero-extend, shift by 16).
inline Vec<float>::type load_bf16x8(const c10::BFloat16* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 half;
  std::memcpy(&half, p, sizeof(half));
  const u32x8 wide = __builtin_convertvector(half, u32x8) << 16;
  Vec<float>::type out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
// Eight floats rounded to bf16 as c10::BFloat16 does (nearest even, NaN -> 0x7FC0), in vector registers.
inline void store_bf16x8(c10::BFloat16* p, Vec<float>::type v) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  typedef int32_t i32x8 __attribute__((vector_size(32)));
  u32x8 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32x8 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  const i32x8 is_nan = v != v;
  const u32x8 nan_bits = {0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u, 0x7FC0u};
  const u32x8 out = is_nan ? nan_bits : rounded;
  const u16x8 half = __builtin_convertvector(out, u16x8);
  std::memcpy(p, &half, sizeof(half));
}
inline void lane_sums(const Vec<double>::type d[4], double out[4]) {
  using V = Vec<double>::type;
  const V h1 = __builtin_shufflevector(d[0], d[1], 0, 4, 2, 6) + __builtin_shufflevector(d[0], d[1], 1, 5, 3, 7);
  const V h2 = __builtin_shufflevector(d[2], d[3], 0, 4, 2, 6) + __builtin_shufflevector(d[2], d[3], 1, 5, 3, 7);
  const V r = __builtin_shufflevector(h1, h2, 0, 1, 4, 5) + __builtin_shufflevector(h1, h2, 2, 3, 6, 7);
  for (int k = 0; k < 4; ++k) out[k] = r[k];
}
#endif

template <typename V, typename T>
inline V load_vec(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void store_vec(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// A vector of acc_t from memory holding scalar_t: a plain load, or bf16 widened to float.
template <typename V, typename scalar_t>
inline V load_acc(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return load_bf16x8(p);
  } else {
    return load_vec<V>(p);
  }
}

template <typename scalar_t, int DT>
constexpr bool use_vec() {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int lanes = Vec<acc_t>::kLanes;
  constexpr bool loadable = std::is_same_v<scalar_t, acc_t> || (std::is_same_v<scalar_t, c10::BFloat16> && lanes == 8);
  return loadable && DT > 0 && lanes > 0 && DT % (lanes > 0 ? lanes : 1) == 0;
}

// Channel buffer of ScalarChannels: a plain array of compile-time size for DT > 0, a vector for DT == 0.
template <typename acc_t, int DT>
struct ChannelBuffer {
  explicit ChannelBuffer(int64_t /*D*/) {}
  acc_t* get() { return data; }
  static constexpr int64_t size(int64_t /*D*/) { return DT; }
  acc_t data[DT];
};
template <typename acc_t>
struct ChannelBuffer<acc_t, 0> {
  explicit ChannelBuffer(int64_t D) : data(D) {}
  acc_t* get() { return data.data(); }
  static int64_t size(int64_t D) { return D; }
  std::vector<acc_t> data;
};

// Channel arithmetic of one (n, q, m) row, for the kernels below. DT > 0 fixes the channel count at compile time
// (common head dims): the per-row accumulator then lives in registers and the channel loops unroll; DT == 0 is
// the generic path for any D. Forward: zero(), add() per valid corner, store(). Backward: load() the grad_out
// row, then per sample begin_sample(), corner() per valid corner (dot with the value row, scatter into the
// grad_value row), dots().
template <typename scalar_t, int DT>
struct ScalarChannels {
  using acc_t = at::opmath_type<scalar_t>;
  explicit ScalarChannels(int64_t D_) : D(D_), buffer(D_) {}
  acc_t* buf() { return buffer.get(); }
  int64_t size() const { return ChannelBuffer<acc_t, DT>::size(D); }

  void zero() {
    acc_t* acc = buf();
    for (int64_t d = 0; d < size(); ++d) acc[d] = 0;
  }
  void add(int /*corner*/, acc_t coeff, const scalar_t* v) {
    acc_t* acc = buf();
#pragma omp simd
    for (int64_t d = 0; d < size(); ++d) acc[d] += coeff * static_cast<acc_t>(v[d]);
  }
  void store(scalar_t* o) {
    acc_t* acc = buf();
    for (int64_t d = 0; d < size(); ++d) o[d] = static_cast<scalar_t>(acc[d]);
  }

  void load(const scalar_t* go) {
    acc_t* g = buf();
    for (int64_t d = 0; d < size(); ++d) g[d] = static_cast<acc_t>(go[d]);
  }
  void begin_sample() {
    for (int k = 0; k < 4; ++k) dot[k] = 0;
  }
  void corner(int k, const scalar_t* v, acc_t* dst, acc_t coeff) {
    const acc_t* g = buf();
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < size(); ++d) {
      sum += g[d] * static_cast<acc_t>(v[d]);
      dst[d] += coeff * g[d];
    }
    dot[k] = sum;
  }
  void dots(acc_t out[4]) {
    for (int k = 0; k < 4; ++k) out[k] = dot[k];
  }

  int64_t D;
  ChannelBuffer<acc_t, DT> buffer;
  acc_t dot[4];
};

// The same with 32-byte vectors (value in acc_t or bf16, D a multiple of the lanes). Forward keeps two
// accumulator banks (corners 0-1 and 2-3) to halve the FMA dependency chain; backward keeps the grad_out row in
// registers and one partial-dot vector per corner, reduced together by lane_sums().
template <typename scalar_t, int DT>
struct VecChannels {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  static constexpr int kLanes = Vec<acc_t>::kLanes;
  static constexpr int kVecs = DT / kLanes;
  explicit VecChannels(int64_t /*D*/) {}

  void zero() {
    for (int j = 0; j < kVecs; ++j) acc[0][j] = acc[1][j] = V{};
  }
  void add(int k, acc_t coeff, const scalar_t* v) {
    V* bank = acc[k >> 1];
    for (int j = 0; j < kVecs; ++j) bank[j] += coeff * load_acc<V>(v + j * kLanes);
  }
  void store(scalar_t* o) {
    for (int j = 0; j < kVecs; ++j) {
      const V sum = acc[0][j] + acc[1][j];
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        store_vec(o + j * kLanes, sum);
      } else {  // bf16: one rounding per output channel, as the scalar path
        store_bf16x8(o + j * kLanes, sum);
      }
    }
  }

  void load(const scalar_t* go) {
    for (int j = 0; j < kVecs; ++j) g[j] = load_acc<V>(go + j * kLanes);
  }
  void begin_sample() {
    for (int k = 0; k < 4; ++k) dot[k] = V{};
  }
  void corner(int k, const scalar_t* v, acc_t* dst, acc_t coeff) {
    for (int j = 0; j < kVecs; ++j) {
      dot[k] += g[j] * load_acc<V>(v + j * kLanes);
      store_vec(dst + j * kLanes, V(load_vec<V>(dst + j * kLanes) + coeff * g[j]));
    }
  }
  void dots(acc_t out[4]) { lane_sums(dot, out); }

  V acc[2][kVecs > 0 ? kVecs : 1];
  V g[kVecs > 0 ? kVecs : 1];
  V dot[4];
};

template <typename scalar_t, int DT>
using Channels = std::conditional_t<use_vec<scalar_t, DT>(), VecChannels<scalar_t, DT>, ScalarChannels<scalar_t, DT>>;

// One output row: the channel sums, or NaN in every channel when a sample of the head is NaN (the non-finite rule
// of ms_deform_attn_math.h).
template <typename scalar_t, int DT>
void store_row(Channels<scalar_t, DT>& ch, scalar_t* o, int64_t D, bool nan_row) {
  if (nan_row) {
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(quiet_nan<at::opmath_type<scalar_t>>());
  } else {
    ch.store(o);
  }
}

// Forward parallelises over output rows (n, q, m), m fastest. (Head-major order, one head's 0.7 MB slice of value
// at a time, measured slower: benchmarks/NOTES.md, CPU section.)
template <typename scalar_t, int DT>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights, scalar_t* out,
                    const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.N, S = s.S, M = s.M, L = s.L, K = s.K, Q = s.Q;
  const bool discrete = s.discrete;
  const int64_t D = DT > 0 ? DT : s.D;
  const int64_t row_stride = M * D;  // value elements between consecutive spatial positions
  // Roughly 4 corners x D channels x K points multiply-adds per row: aim for ~32k per task.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * D * 4));
  at::parallel_for(0, N * Q * M, grain, [&](int64_t begin, int64_t end) {
    Channels<scalar_t, DT> ch(D);
    for (int64_t row = begin; row < end; ++row) {  // row = nq * M + m
      const int64_t n = row / (Q * M), m = row % M;
      ch.zero();
      bool nan_row = false;  // the non-finite rule of ms_deform_attn_math.h, for samples with no corner in the map
      for (int64_t l = 0; l < L; ++l) {
        const Level lv = read_level(shapes, starts, l, S);
        const int64_t H = lv.H, W = lv.W;
        const scalar_t* level = value + ((n * S + lv.start) * M + m) * D;
        const PointRange points = level_points(s, l);
        for (int64_t p = points.begin; p < points.end; ++p) {
          const int64_t sample = row * K + p;
          const acc_t x = locations[2 * sample], y = locations[2 * sample + 1];
          const Corners<acc_t> c = sample_corners<acc_t>(x, y, H, W, discrete);
          const acc_t a = weights[sample];
          if (!c.any) {
            nan_row = nan_row || location_is_nan(x, y) || a != a;
            continue;
          }
          for (int k = 0; k < 4; ++k) {
            if (c.valid[k]) ch.add(k, a * c.weight[k], level + c.offset[k] * row_stride);
          }
        }
      }
      store_row<scalar_t, DT>(ch, out + row * D, D, nan_row);
    }
  });
}

// Element offsets of a value / grad_value_acc row in the plan's order: batch n, head m, spatial position.
struct RowStrides {
  int64_t batch, head, position;
  RowStrides(const Sizes& s, const BackwardPlan& plan)
      : batch(s.S * s.M * s.D), head(plan.head_major ? s.S * s.D : s.D), position(plan.head_major ? s.D : s.M * s.D) {}
};

// Task t of a backward's parallel loop over (chunk, n, m): its batch and head, its chunk's queries
// [q_begin, q_end), and the offsets of the head's rows in value and in grad_value_acc.
struct BackwardTask {
  int64_t n, m, q_begin, q_end, value_offset, grad_offset;
  BackwardTask(const Sizes& s, const BackwardPlan& plan, const RowStrides& strides, int64_t t) {
    const int64_t chunk = t / (s.N * s.M);
    const int64_t queries_per_chunk = (s.Q + plan.chunks - 1) / plan.chunks;
    n = (t / s.M) % s.N;
    m = t % s.M;
    q_begin = chunk * queries_per_chunk;
    q_end = std::min(s.Q, q_begin + queries_per_chunk);
    value_offset = n * strides.batch + m * strides.head;
    grad_offset = (chunk * s.N + n) * strides.batch + m * strides.head;
  }
};

// grad_value_acc has shape (chunks, N, S, M, D) or head-major (chunks, N, M, S, D): task (chunk, n, m) owns the
// rows of head m of [chunk, n], so no two threads ever write the same element and the result does not depend on
// scheduling. (Walking rows in memory order like the forward, with one private buffer per thread, measured no
// faster at one thread and costs a buffer sum at two: benchmarks/NOTES.md, CPU section.)
//
// The bilinear value and its position gradient are linear in the corner values, so per sample we only need the
// four dot products G_k = <grad_out, v_k> over channels; interpolate() and accumulate_position_grad() are then
// applied to G instead of to each channel (4 reductions per sample instead of 3 per channel).
template <typename scalar_t, int DT>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
                     at::opmath_type<scalar_t>* grad_value_acc, at::opmath_type<scalar_t>* grad_locations,
                     at::opmath_type<scalar_t>* grad_weights, const Sizes& s, const BackwardPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.N, S = s.S, M = s.M, L = s.L, K = s.K, Q = s.Q;
  const bool discrete = s.discrete;
  const int64_t D = DT > 0 ? DT : s.D;
  const RowStrides strides(s, plan);
  const int64_t row_stride = strides.position;
  at::parallel_for(0, plan.chunks * N * M, 1, [&](int64_t begin, int64_t end) {
    Channels<scalar_t, DT> ch(D);
    for (int64_t t = begin; t < end; ++t) {
      const BackwardTask task(s, plan, strides, t);
      const scalar_t* head = value + task.value_offset;
      acc_t* gv_head = grad_value_acc + task.grad_offset;
      for (int64_t q = task.q_begin; q < task.q_end; ++q) {
        const int64_t row = (task.n * Q + q) * M + task.m;
        ch.load(grad_out + row * D);
        for (int64_t l = 0; l < L; ++l) {
          const Level lv = read_level(shapes, starts, l, S);
          const int64_t H = lv.H, W = lv.W;
          const scalar_t* level = head + lv.start * row_stride;
          acc_t* gv_level = gv_head + lv.start * row_stride;
          const PointRange points = level_points(s, l);
          for (int64_t p = points.begin; p < points.end; ++p) {
            const int64_t sample = row * K + p;
            const acc_t x = locations[2 * sample], y = locations[2 * sample + 1];
            const Corners<acc_t> c = sample_corners<acc_t>(x, y, H, W, discrete);
            const acc_t a = weights[sample];
            if (!c.any) {
              // Non-finite rule (ms_deform_attn_math.h): NaN location -> NaN gradients; otherwise the in-map
              // formulas with zero corner values, i.e. a * 0 (NaN for a NaN weight) and a zero weight gradient;
              // discrete sampling has no location gradient (0).
              const bool nan_location = location_is_nan(x, y);
              const acc_t grad_location = nan_location ? quiet_nan<acc_t>()
                                          : discrete   ? static_cast<acc_t>(0)
                                                       : a * static_cast<acc_t>(0);
              grad_locations[2 * sample] = grad_location;
              grad_locations[2 * sample + 1] = grad_location;
              grad_weights[sample] = nan_location ? quiet_nan<acc_t>() : static_cast<acc_t>(0);
              continue;
            }
            ch.begin_sample();
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) continue;
              const int64_t offset = c.offset[k] * row_stride;
              ch.corner(k, level + offset, gv_level + offset, a * c.weight[k]);
            }
            acc_t dots[4];
            ch.dots(dots);
            acc_t grad_w_im = 0, grad_h_im = 0, gx, gy;
            accumulate_position_grad(c, dots, a, grad_w_im, grad_h_im);
            position_grad_to_location(grad_w_im, grad_h_im, H, W, gx, gy);
            if (discrete) gx = gy = 0;
            grad_locations[2 * sample] = gx;
            grad_locations[2 * sample + 1] = gy;
            grad_weights[sample] = interpolate(c, dots);
          }
        }
      }
    }
  });
}

#if defined(DDETR_HAVE_SAMPLE_BATCH)
// The kernels above with the per-sample scalar work done kBatch samples at a time (ms_deform_attn_cpu_sample_batch.h):
// fp32 accumulation, bilinear sampling, uniform point layout. Same sample order, so the same sums.
template <typename scalar_t, int DT>
void forward_kernel_batched(const scalar_t* value, const int64_t* shapes, const int64_t* starts, const float* locations,
                            const float* weights, scalar_t* out, const Sizes& s) {
  const int64_t N = s.N, S = s.S, M = s.M, K = s.K, Q = s.Q;
  const int64_t D = DT > 0 ? DT : s.D;
  const int64_t row_stride = M * D;
  const PointTable table(s, shapes, starts, row_stride);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * D * 4));
  at::parallel_for(0, N * Q * M, grain, [&](int64_t begin, int64_t end) {
    Channels<scalar_t, DT> ch(D);
    SampleBatch b;
    for (int64_t row = begin; row < end; ++row) {  // row = nq * M + m
      const int64_t n = row / (Q * M), m = row % M;
      const scalar_t* head = value + (n * S * M + m) * D;
      ch.zero();
      bool nan_row = false;
      for (int64_t p0 = 0; p0 < K; p0 += kBatch) {
        const int count = static_cast<int>(std::min<int64_t>(kBatch, K - p0));
        const int64_t sample0 = row * K + p0;
        b.compute(locations + 2 * sample0, weights + sample0, count, table, p0);
        nan_row = nan_row || any_lane(~b.any & (b.nan_loc | (b.a != b.a)));
        for (int i = 0; i < count; ++i) {
          const int32_t valid = b.valid[i];
          if (valid == 0) continue;
          const scalar_t* level = head + table.base[p0 + i];
          for (int k = 0; k < 4; ++k) {
            if (valid & (1 << k)) ch.add(k, b.coeff[k][i], level + b.offset[k][i] * row_stride);
          }
        }
      }
      store_row<scalar_t, DT>(ch, out + row * D, D, nan_row);
    }
  });
}

template <typename scalar_t, int DT>
void backward_kernel_batched(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                             const int64_t* starts, const float* locations, const float* weights, float* grad_value_acc,
                             float* grad_locations, float* grad_weights, const Sizes& s, const BackwardPlan& plan) {
  const int64_t N = s.N, M = s.M, K = s.K, Q = s.Q;
  const int64_t D = DT > 0 ? DT : s.D;
  const RowStrides strides(s, plan);
  const int64_t row_stride = strides.position;
  const PointTable table(s, shapes, starts, row_stride);
  at::parallel_for(0, plan.chunks * N * M, 1, [&](int64_t begin, int64_t end) {
    Channels<scalar_t, DT> ch(D);
    SampleBatch b;
    alignas(32) float dots[4][kBatch];
    for (int64_t t = begin; t < end; ++t) {
      const BackwardTask task(s, plan, strides, t);
      const scalar_t* head = value + task.value_offset;
      float* gv_head = grad_value_acc + task.grad_offset;
      for (int64_t q = task.q_begin; q < task.q_end; ++q) {
        const int64_t row = (task.n * Q + q) * M + task.m;
        ch.load(grad_out + row * D);
        for (int64_t p0 = 0; p0 < K; p0 += kBatch) {
          const int count = static_cast<int>(std::min<int64_t>(kBatch, K - p0));
          const int64_t sample0 = row * K + p0;
          b.compute(locations + 2 * sample0, weights + sample0, count, table, p0);
          for (int i = 0; i < count; ++i) {
            const int32_t valid = b.valid[i];
            if (valid == 0) {
              for (int k = 0; k < 4; ++k) dots[k][i] = 0;
              continue;
            }
            const int64_t level = table.base[p0 + i];
            ch.begin_sample();
            for (int k = 0; k < 4; ++k) {
              if (!(valid & (1 << k))) continue;
              const int64_t offset = level + b.offset[k][i] * row_stride;
              ch.corner(k, head + offset, gv_head + offset, b.coeff[k][i]);
            }
            float d[4];
            ch.dots(d);
            for (int k = 0; k < 4; ++k) dots[k][i] = d[k];
          }
          store_sample_grads(b, dots, table, p0, count, grad_locations + 2 * sample0, grad_weights + sample0);
        }
      }
    }
  });
}

// Whether the batched kernels apply: fp32 accumulation, bilinear sampling, uniform points, int32 offsets.
template <typename scalar_t>
bool use_sample_batch(const Sizes& s, const int64_t* shapes, const int64_t* starts) {
  return std::is_same_v<at::opmath_type<scalar_t>, float> && PointTable::fits(s, shapes, starts);
}
#endif

template <typename scalar_t, typename Launch>
void dispatch_head_dim(int64_t D, Launch&& launch) {
  switch (D) {
    case 16:
      launch(std::integral_constant<int, 16>{});
      break;
    case 32:
      launch(std::integral_constant<int, 32>{});
      break;
    case 64:
      launch(std::integral_constant<int, 64>{});
      break;
    default:
      launch(std::integral_constant<int, 0>{});
  }
}

}  // namespace

template <typename scalar_t>
void forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
             const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights, scalar_t* out,
             const Sizes& s) {
  dispatch_head_dim<scalar_t>(s.D, [&](auto dt) {
#if defined(DDETR_HAVE_SAMPLE_BATCH)
    if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
      if (use_sample_batch<scalar_t>(s, shapes, starts)) {
        forward_kernel_batched<scalar_t, decltype(dt)::value>(value, shapes, starts, locations, weights, out, s);
        return;
      }
    }
#endif
    forward_kernel<scalar_t, decltype(dt)::value>(value, shapes, starts, locations, weights, out, s);
  });
}

template <typename scalar_t>
void backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
              const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
              at::opmath_type<scalar_t>* grad_value_acc, at::opmath_type<scalar_t>* grad_locations,
              at::opmath_type<scalar_t>* grad_weights, const Sizes& s, const BackwardPlan& plan) {
  dispatch_head_dim<scalar_t>(s.D, [&](auto dt) {
#if defined(DDETR_HAVE_SAMPLE_BATCH)
    if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
      if (use_sample_batch<scalar_t>(s, shapes, starts)) {
        backward_kernel_batched<scalar_t, decltype(dt)::value>(grad_out, value, shapes, starts, locations, weights,
                                                               grad_value_acc, grad_locations, grad_weights, s, plan);
        return;
      }
    }
#endif
    backward_kernel<scalar_t, decltype(dt)::value>(grad_out, value, shapes, starts, locations, weights, grad_value_acc,
                                                   grad_locations, grad_weights, s, plan);
  });
}

#define DDETR_MSDA_INSTANTIATE(T)                                                                                     \
  template void forward<T>(const T*, const int64_t*, const int64_t*, const at::opmath_type<T>*,                       \
                           const at::opmath_type<T>*, T*, const Sizes&);                                              \
  template void backward<T>(const T*, const T*, const int64_t*, const int64_t*, const at::opmath_type<T>*,            \
                            const at::opmath_type<T>*, at::opmath_type<T>*, at::opmath_type<T>*, at::opmath_type<T>*, \
                            const Sizes&, const BackwardPlan&);
DDETR_MSDA_INSTANTIATE(float)
DDETR_MSDA_INSTANTIATE(double)
DDETR_MSDA_INSTANTIATE(c10::BFloat16)
#undef DDETR_MSDA_INSTANTIATE

}  // namespace DDETR_CPU_ISA
}  // namespace msda
}  // namespace deformable_detr

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
