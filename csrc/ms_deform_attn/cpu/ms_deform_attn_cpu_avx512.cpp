// The AVX-512 copy of the CPU kernels (ms_deform_attn_cpu_kernels_impl.h compiled with AVX-512 F/BW/VL/DQ + FMA:
// 32 vector registers, EVEX encodings and mask registers for the same code), chosen at run time when the CPU has
// them (ms_deform_attn_cpu_capability.cpp); on other targets this file only defines entry points never selected.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DDETR_HAVE_AVX512_COPY 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
#define DDETR_CPU_ISA avx512
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

#if !defined(DDETR_HAVE_AVX512_COPY)
DDETR_MSDA_DEFINE_ABSENT_CPU_KERNELS(avx512)
#endif

bool avx512_copy_compiled() {
#if defined(DDETR_HAVE_AVX512_COPY)
  return true;
#else
  return false;
#endif
}

}  // namespace msda
}  // namespace deformable_detr
