// One instruction-set copy of the CPU kernels: include once per translation unit after defining
//   DDETR_CPU_ISA         the copy's namespace and name (avx2, avx512),
//   DDETR_CPU_ISA_TARGET  the GCC/Clang target string it is compiled for ("avx2,fma", ...).
// On x86-64 with GCC/Clang this compiles ms_deform_attn_cpu_kernels_impl.h under that target and defines
// <isa>_copy_compiled() = true; elsewhere it defines entry points that are never selected (the capability file
// sees <isa>_copy_compiled() = false). ms_deform_attn_cpu_capability.cpp picks the copy at run time.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

#if !defined(DDETR_CPU_ISA) || !defined(DDETR_CPU_ISA_TARGET)
#error "define DDETR_CPU_ISA and DDETR_CPU_ISA_TARGET before including ms_deform_attn_cpu_isa_copy.h"
#endif

#define DDETR_ISA_PRAGMA(x) _Pragma(#x)
#define DDETR_ISA_CAT2(a, b) a##b
#define DDETR_ISA_CAT(a, b) DDETR_ISA_CAT2(a, b)

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DDETR_ISA_COPY_COMPILED 1
#if defined(__clang__)
#define DDETR_ISA_TARGET_PUSH(t) DDETR_ISA_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
DDETR_ISA_TARGET_PUSH(DDETR_CPU_ISA_TARGET)
#else
#define DDETR_ISA_TARGET_PUSH(t) DDETR_ISA_PRAGMA(GCC target(t))
DDETR_ISA_PRAGMA(GCC push_options)
DDETR_ISA_TARGET_PUSH(DDETR_CPU_ISA_TARGET)
#endif
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels_impl.h"
#if defined(__clang__)
DDETR_ISA_PRAGMA(clang attribute pop)
#else
DDETR_ISA_PRAGMA(GCC pop_options)
#endif
#undef DDETR_ISA_TARGET_PUSH
#endif

namespace deformable_detr {
namespace msda {

#if !defined(DDETR_ISA_COPY_COMPILED)
// One level of indirection so that the copy's name, not the macro's, reaches the error message.
#define DDETR_ISA_ABSENT(ns) DDETR_MSDA_DEFINE_ABSENT_CPU_KERNELS(ns)
DDETR_ISA_ABSENT(DDETR_CPU_ISA)
#endif

bool DDETR_ISA_CAT(DDETR_CPU_ISA, _copy_compiled)() {
#if defined(DDETR_ISA_COPY_COMPILED)
  return true;
#else
  return false;
#endif
}

}  // namespace msda
}  // namespace deformable_detr
