// CPU entry points of multi-scale deformable attention: input checks, allocation, and the call into the kernel
// copy chosen for this CPU (ms_deform_attn_cpu_capability.cpp). Forward parallelises over output
// rows, backward over (batch, head, query chunk) slices. Per-sample math: ms_deform_attn_math.h, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <vector>

#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

#define DDETR_CPU_ISA base
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels_impl.h"
#undef DDETR_CPU_ISA

namespace deformable_detr {
namespace msda {

namespace {

// How many times this process has read a table's values (level pair or point table) to check them.
std::atomic<int64_t> g_table_reads{0};

// Tables whose values passed check_levels_host / check_points_host, so that each table's values are read once,
// not on every call (a model passes the same pair to every layer, forward and backward). An entry holds weak
// references to the table tensors (while one exists, a TensorImpl's address is not reused, so identity by address
// is sound), their version counters (every in-place write moves them), data pointers, and the total the values
// add up to. Writes that bypass version counting (through `.data` or a numpy view) are not seen: the kernels read
// the tables through read_level, which bounds every level to [0, S), so such a table gives wrong sums, never a
// read outside value. Inference tensors have no version counter and are checked on every call.
class CheckedTables {
 public:
  // The total recorded for the pair, or -1 when the pair is not known (new, edited, or not cacheable).
  int64_t find(const at::Tensor& a, const at::Tensor& b) {
    if (!cacheable(a) || !cacheable(b)) return -1;
    const Key key = key_of(a, b);
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries_) {
      if (e.a._unsafe_get_target() == a.unsafeGetTensorImpl() && e.b._unsafe_get_target() == b.unsafeGetTensorImpl() &&
          e.key == key) {
        return e.total;
      }
    }
    return -1;
  }

  void insert(const at::Tensor& a, const at::Tensor& b, int64_t total) {
    if (!cacheable(a) || !cacheable(b)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    // Entries of dead tables go first, then the oldest.
    entries_.erase(
        std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.a.expired() || e.b.expired(); }),
        entries_.end());
    if (entries_.size() >= kCapacity) entries_.erase(entries_.begin());
    entries_.push_back(Entry{Weak(a.getIntrusivePtr()), Weak(b.getIntrusivePtr()), key_of(a, b), total});
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Key {
    int64_t a_version, b_version;
    const void *a_data, *b_data;
    bool operator==(const Key& o) const {
      return a_version == o.a_version && b_version == o.b_version && a_data == o.a_data && b_data == o.b_data;
    }
  };
  struct Entry {
    Weak a, b;
    Key key;
    int64_t total;
  };
  static constexpr size_t kCapacity = 64;

  static bool cacheable(const at::Tensor& t) { return !t.is_inference(); }
  static Key key_of(const at::Tensor& a, const at::Tensor& b) {
    return {a._version(), b._version(), a.const_data_ptr(), b.const_data_ptr()};
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
};

CheckedTables& checked_levels() {
  static CheckedTables tables;
  return tables;
}

CheckedTables& checked_points() {
  static CheckedTables tables;
  return tables;
}

// A table's values: read and checked (`read_and_check`) when `tables` does not know the pair, else only its
// recorded total against the call's (`check_total`).
template <typename ReadAndCheck, typename CheckTotal>
void check_once(CheckedTables& tables, const at::Tensor& a, const at::Tensor& b, int64_t total,
                ReadAndCheck read_and_check, CheckTotal check_total) {
  const int64_t known = tables.find(a, b);
  if (known >= 0) {
    check_total(known, total);
    return;
  }
  g_table_reads.fetch_add(1, std::memory_order_relaxed);
  read_and_check();
  tables.insert(a, b, total);
}

// The checks of one call: shapes, dtypes and devices (attribute reads), then the tables' values, read only for a
// table not checked before (or edited since). Returns the kernels' sizes.
Sizes checked_sizes(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                    const std::optional<at::Tensor>& point_start, bool discrete) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               point_start, discrete);
  check_once(
      checked_levels(), spatial_shapes, level_start_index, s.S,
      [&] { check_levels_host(spatial_shapes, level_start_index, s.S); }, check_level_total);
  if (point_start) {
    check_once(
        checked_points(), *point_start, *point_start, s.K, [&] { check_points_host(*point_start, s.K); },
        check_point_total);
  }
  return s;
}

// The forward of checked inputs.
at::Tensor forward_checked(const Sizes& s, const at::Tensor& value, const at::Tensor& spatial_shapes,
                           const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                           const at::Tensor& attention_weights, const std::optional<at::Tensor>& point_start) {
  if (value.scalar_type() == at::kHalf) {
    // x86 has no cheap scalar fp16 -> fp32 conversion (bf16 is a shift): widening value once and running the fp32
    // kernel measured ~7x faster than converting at every corner read. Same numerics: fp32 math, one final rounding.
    return forward_checked(s, value.to(at::kFloat), spatial_shapes, level_start_index, sampling_locations,
                           attention_weights, point_start)
        .to(at::kHalf);
  }
  // Every element is written by the kernel (NaN, a sum, or 0 for rows with no sample in a map): no memset.
  auto out = at::empty({s.N, s.Q, s.M * s.D}, value.options());
  if (out.numel() == 0) return out;
  const DenseInputs in =
      dense_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start);
  const Sizes ks = in.with_points(s);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* fn = cpu_kernel(&base::forward<scalar_t>, &avx2::forward<scalar_t>, &avx512::forward<scalar_t>);
    fn(in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(), in.level_start_index.data_ptr<int64_t>(),
       in.sampling_locations.data_ptr<acc_t>(), in.attention_weights.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), ks);
  });
  return out;
}

// The backward of checked inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_checked(
    const Sizes& s, const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const std::optional<at::Tensor>& point_start) {
  if (value.scalar_type() == at::kHalf) {  // see forward_checked: fp16 runs the fp32 kernel on widened copies
    auto [grad_value, grad_locations, grad_weights] =
        backward_checked(s, grad_output.to(at::kFloat), value.to(at::kFloat), spatial_shapes, level_start_index,
                         sampling_locations, attention_weights, point_start);
    return {grad_value.to(at::kHalf), grad_locations, grad_weights};
  }
  // Every level empty (S = 0) still runs the kernel: the NaN rule gives NaN gradients to NaN samples there too.
  if (s.N * s.Q * s.M == 0 || s.D == 0) {
    return {at::zeros_like(value, at::MemoryFormat::Contiguous),
            at::zeros_like(sampling_locations, at::MemoryFormat::Contiguous),
            at::zeros_like(attention_weights, at::MemoryFormat::Contiguous)};
  }
  // The kernel writes every sample's location and weight gradient: no memset.
  auto grad_locations = at::empty_like(sampling_locations, at::MemoryFormat::Contiguous);
  auto grad_weights = at::empty_like(attention_weights, at::MemoryFormat::Contiguous);
  const auto acc_dtype = position_dtype(value.scalar_type());
  // Split queries into chunks (each with a private gradient buffer) only when (N, M) slices alone cannot keep
  // every thread busy; the chunks are summed in a fixed order, so the result is deterministic.
  const int64_t threads = at::get_num_threads();
  const int64_t slices = s.N * s.M;
  BackwardPlan plan;
  plan.chunks = std::max<int64_t>(1, std::min<int64_t>(s.Q, (threads + slices - 1) / slices));
  // Head-major order when a head's samples outnumber its rows (the encoder: Q * K = 16 S): the corners of a sample
  // become neighbouring rows and a head's rows one block, which halved the encoder-sized backward
  // (benchmarks/NOTES.md, CPU section); it costs a transposed copy of value in and of grad_value out, more than it
  // saves for a decoder's few queries over the same maps.
  plan.head_major = s.M > 1 && s.Q * s.K >= s.S;
  const bool direct = plan.chunks == 1 && acc_dtype == value.scalar_type() && !plan.head_major;
  const auto acc_options = value.options().dtype(acc_dtype);
  at::Tensor grad_value_acc = direct            ? at::zeros_like(value, at::MemoryFormat::Contiguous)
                              : plan.head_major ? at::zeros({plan.chunks, s.N, s.M, s.S, s.D}, acc_options)
                                                : at::zeros({plan.chunks, s.N, s.S, s.M, s.D}, acc_options);
  const auto go_c = grad_output.contiguous();
  const DenseInputs in =
      dense_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start);
  const at::Tensor value_k = plan.head_major ? value.permute({0, 2, 1, 3}).contiguous() : in.value;
  const Sizes ks = in.with_points(s);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* fn = cpu_kernel(&base::backward<scalar_t>, &avx2::backward<scalar_t>, &avx512::backward<scalar_t>);
    fn(go_c.data_ptr<scalar_t>(), value_k.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
       in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<acc_t>(),
       in.attention_weights.data_ptr<acc_t>(), grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
       grad_weights.data_ptr<acc_t>(), ks, plan);
  });
  if (direct) return {grad_value_acc, grad_locations, grad_weights};
  const at::Tensor summed = plan.chunks == 1 ? grad_value_acc.select(0, 0) : grad_value_acc.sum(0);
  // One pass back to value's order and dtype.
  at::Tensor grad_value = at::empty_like(value, at::MemoryFormat::Contiguous);
  grad_value.copy_(plan.head_major ? summed.permute({0, 2, 1, 3}) : summed);
  return {grad_value, grad_locations, grad_weights};
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, const std::optional<at::Tensor>& point_start,
                              bool discrete) {
  const Sizes s = checked_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                point_start, discrete);
  return forward_checked(s, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         point_start);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const std::optional<at::Tensor>& point_start, bool discrete) {
  const Sizes s = checked_sizes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                point_start, discrete);
  check_grad_output(grad_output, value, s);
  return backward_checked(s, grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, point_start);
}

}  // namespace

int64_t table_reads() { return g_table_reads.load(std::memory_order_relaxed); }

}  // namespace msda
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn", &deformable_detr::msda::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &deformable_detr::msda::ms_deform_attn_backward_cpu);
}
