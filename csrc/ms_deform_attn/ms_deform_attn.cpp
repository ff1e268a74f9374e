// Schema of the multi-scale deformable attention ops. Kernels register per dispatch key in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (deformable_detr/ops/ms_deform_attn.py).
// point_start (L + 1,) int64 selects the points_per_level layout (locations (N, Q, M, K, 2), weights
// (N, Q, M, K)); discrete selects sampling="discrete". Both default to the original five-argument op.
#include <torch/library.h>

TORCH_LIBRARY(deformable_detr, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor? point_start=None, bool discrete=False) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "Tensor? point_start=None, bool discrete=False) -> (Tensor, Tensor, Tensor)");
}
