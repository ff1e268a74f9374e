// Calls deformable_detr::ms_deform_attn through the dispatcher from plain C++ (no Python) and checks one value:
// one 2x2 level, one query sampling the map centre, so every corner weighs 1/4 and the output is a * mean(value).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("deformable_detr::ms_deform_attn", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  const auto value = at::arange(4, at::kFloat).view({1, 4, 1, 1});  // N=1, S=4, M=1, D=1: values 0,1,2,3
  const auto shapes = at::tensor({2, 2}, at::kLong).view({1, 2});
  const auto starts = at::zeros({1}, at::kLong);
  const auto locations = at::full({1, 1, 1, 1, 1, 2}, 0.5, at::kFloat);
  const auto weights = at::full({1, 1, 1, 1, 1}, 2.0, at::kFloat);
  // point_start = nullopt, discrete = false: the uniform layout, bilinear sampling.
  const auto out = op.call(value, shapes, starts, locations, weights, std::nullopt, false);
  const float got = out.item<float>();
  const float expected = 2.0f * 1.5f;
  if (out.sizes() != at::IntArrayRef({1, 1, 1}) || std::fabs(got - expected) > 1e-6f) {
    std::fprintf(stderr, "FAIL: ms_deform_attn gave %f, expected %f\n", got, expected);
    return 1;
  }
  std::printf("OK: deformable_detr::ms_deform_attn = %f through the C++ dispatcher\n", got);
  return 0;
}
