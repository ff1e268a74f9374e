// The batched LSAP CUDA host flow and device code (csrc/assignment/cuda/) run under the emulator.
#include "simt.h"
// clang-format off
#include "device.h"
#include "ops.h"
#include "assignment/cuda/lsap_host.h"
// clang-format on

namespace simt {

std::tuple<at::Tensor, at::Tensor> lsap(const at::Tensor& cost, const std::optional<at::Tensor>& num_cols) {
  SimtDevice dev{cost.scalar_type()};
  auto [assignment, status] = deformable_detr::lsap::batched_lsap_on(dev, cost, num_cols);
  return {assignment.clone(), status.clone()};
}

}  // namespace simt
