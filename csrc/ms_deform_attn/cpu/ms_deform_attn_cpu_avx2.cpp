// The AVX2+FMA copy of the CPU kernels (8-wide fp32 FMAs over channels), chosen at run time when the CPU has
// them; on other targets this file only reports that the copy is absent.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <string>

#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DDETR_HAVE_AVX2_COPY 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define DDETR_CPU_ISA avx2
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels_impl.h"
#undef DDETR_CPU_ISA
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace deformable_detr {
namespace msda {

bool cpu_kernels_use_avx2() {
#if defined(DDETR_HAVE_AVX2_COPY)
  // DEFORMABLE_DETR_DISABLE_AVX2=1 forces the baseline copy (tests run both copies this way).
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      !(std::getenv("DEFORMABLE_DETR_DISABLE_AVX2") && std::string(std::getenv("DEFORMABLE_DETR_DISABLE_AVX2")) == "1");
  return supported;
#else
  return false;
#endif
}

#if !defined(DDETR_HAVE_AVX2_COPY)
// Never called (cpu_kernels_use_avx2() is false); defined so the baseline file links on every target.
namespace avx2 {
template <typename scalar_t>
void forward(const scalar_t*, const int64_t*, const int64_t*, const at::opmath_type<scalar_t>*,
             const at::opmath_type<scalar_t>*, scalar_t*, const Sizes&) {
  TORCH_CHECK(false, "ms_deform_attn: the AVX2 CPU kernels were not compiled for this target");
}
template <typename scalar_t>
void backward(const scalar_t*, const scalar_t*, const int64_t*, const int64_t*, const at::opmath_type<scalar_t>*,
              const at::opmath_type<scalar_t>*, at::opmath_type<scalar_t>*, at::opmath_type<scalar_t>*,
              at::opmath_type<scalar_t>*, const Sizes&, int64_t) {
  TORCH_CHECK(false, "ms_deform_attn: the AVX2 CPU kernels were not compiled for this target");
}
template void forward<float>(const float*, const int64_t*, const int64_t*, const float*, const float*, float*,
                             const Sizes&);
template void forward<double>(const double*, const int64_t*, const int64_t*, const double*, const double*, double*,
                              const Sizes&);
template void forward<c10::BFloat16>(const c10::BFloat16*, const int64_t*, const int64_t*, const float*, const float*,
                                     c10::BFloat16*, const Sizes&);
template void backward<float>(const float*, const float*, const int64_t*, const int64_t*, const float*, const float*,
                              float*, float*, float*, const Sizes&, int64_t);
template void backward<double>(const double*, const double*, const int64_t*, const int64_t*, const double*,
                               const double*, double*, double*, double*, const Sizes&, int64_t);
template void backward<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, const int64_t*, const int64_t*,
                                      const float*, const float*, float*, float*, float*, const Sizes&, int64_t);
}  // namespace avx2
#endif

}  // namespace msda
}  // namespace deformable_detr
