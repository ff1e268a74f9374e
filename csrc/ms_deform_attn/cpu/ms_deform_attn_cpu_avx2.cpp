// The AVX2+FMA copy of the CPU kernels (8-wide fp32 FMAs over channels), chosen at run time when the CPU has
// them (ms_deform_attn_cpu_capability.cpp); on other targets this file only defines entry points never selected.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

#if !defined(DDETR_HAVE_AVX2_COPY)
DDETR_MSDA_DEFINE_ABSENT_CPU_KERNELS(avx2)
#endif

bool avx2_copy_compiled() {
#if defined(DDETR_HAVE_AVX2_COPY)
  return true;
#else
  return false;
#endif
}

}  // namespace msda
}  // namespace deformable_detr
