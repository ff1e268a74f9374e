// Which copy of the CPU kernels runs (ms_deform_attn_cpu_kernels_impl.h compiled per instruction set): chosen
// once, at the first call, like ATen's CPU capability dispatch. The best copy that was compiled and that this CPU
// runs, lowered (never raised) by DEFORMABLE_DETR_CPU_CAPABILITY=default|avx2|avx512 — the way tests force each
// copy on one machine. Without it, ATen's own ATEN_CPU_CAPABILITY lowers it the same way (its other values, e.g.
// zvector, leave the choice alone), so one variable forces a vector width on ATen and on these kernels together.
// DEFORMABLE_DETR_DISABLE_AVX2=1 (older name) means "default".
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

namespace deformable_detr {
namespace msda {
namespace {

CpuCapability supported_capability() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (cpu_kernels_compiled(CpuCapability::kAvx512) && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma")) {
    return CpuCapability::kAvx512;
  }
  if (cpu_kernels_compiled(CpuCapability::kAvx2) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return CpuCapability::kAvx2;
  }
#endif
  return CpuCapability::kDefault;
}

CpuCapability requested_capability() {
  const char* legacy = std::getenv("DEFORMABLE_DETR_DISABLE_AVX2");
  if (legacy != nullptr && std::strcmp(legacy, "1") == 0) return CpuCapability::kDefault;
  const char* name = std::getenv("DEFORMABLE_DETR_CPU_CAPABILITY");
  if (name == nullptr || *name == '\0') {
    const char* aten = std::getenv("ATEN_CPU_CAPABILITY");
    if (aten == nullptr) return CpuCapability::kAvx512;
    const std::string follow(aten);
    if (follow == "default") return CpuCapability::kDefault;
    if (follow == "avx2") return CpuCapability::kAvx2;
    return CpuCapability::kAvx512;
  }
  const std::string request(name);
  if (request == "avx512") return CpuCapability::kAvx512;
  if (request == "avx2") return CpuCapability::kAvx2;
  TORCH_CHECK(request == "default", "DEFORMABLE_DETR_CPU_CAPABILITY must be default, avx2 or avx512, got '", request,
              "'");
  return CpuCapability::kDefault;
}

std::string cpu_capability_name() {
  switch (cpu_capability()) {
    case CpuCapability::kAvx512:
      return "avx512";
    case CpuCapability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace

bool cpu_kernels_compiled(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kAvx512:
      return avx512_copy_compiled();
    case CpuCapability::kAvx2:
      return avx2_copy_compiled();
    default:
      return true;
  }
}

CpuCapability cpu_capability() {
  static const CpuCapability chosen = [] {
    const CpuCapability supported = supported_capability();
    const CpuCapability requested = requested_capability();
    return static_cast<int>(requested) < static_cast<int>(supported) ? requested : supported;
  }();
  return chosen;
}

}  // namespace msda
}  // namespace deformable_detr

TORCH_LIBRARY_FRAGMENT(deformable_detr, m) {
  // The kernel copy the CPU backend runs ("default", "avx2" or "avx512"); for tests and benchmark headers.
  m.def("_cpu_capability() -> str", &deformable_detr::msda::cpu_capability_name);
}
