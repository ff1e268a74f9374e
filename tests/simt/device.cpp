// Guarded tensors and the coverage table of the emulator's Device policy (device.h).
#include "device.h"

#include <map>

namespace simt {
namespace {

std::map<std::string, int64_t>& table() {
  static std::map<std::string, int64_t> t;
  return t;
}

}  // namespace

void record_launch(const std::string& key) { ++table()[key]; }

std::vector<std::pair<std::string, int64_t>> coverage() { return {table().begin(), table().end()}; }

void reset_coverage() { table().clear(); }

at::Tensor guarded_empty(at::IntArrayRef sizes, const at::TensorOptions& options, int fill, bool exact_placement) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  // Fresh allocations come 512-byte aligned from the caching allocator on a GPU; the flush-end placement keeps
  // that alignment and puts the end as close to the guard page as it allows.
  Placement placement = config().placement;
  if (placement == Placement::kFlushEnd && !exact_placement) placement = Placement::kEndAligned;
  void* ptr = guarded_alloc(bytes, placement, fill);
  return at::from_blob(ptr, sizes, [](void* p) { guarded_free(p); }, options.device(at::kCPU));
}

at::Tensor guarded_copy(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "simt: guarded_copy needs a contiguous tensor");
  if (t.numel() > 0 && is_guarded(t.data_ptr())) return t;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  const size_t misalign = reinterpret_cast<uintptr_t>(t.data_ptr()) % 512;
  void* ptr = guarded_alloc(bytes, config().placement, -1, misalign);
  if (bytes > 0) std::memcpy(ptr, t.data_ptr(), bytes);
  return at::from_blob(ptr, t.sizes(), [](void* p) { guarded_free(p); }, t.options());
}

}  // namespace simt
