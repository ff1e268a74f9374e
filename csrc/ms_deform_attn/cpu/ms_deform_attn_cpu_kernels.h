// Declarations of the CPU kernel entry points, one copy per instruction set (see ms_deform_attn_cpu_kernels_impl.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/ms_deform_attn_checks.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace deformable_detr {
namespace msda {

#define DDETR_MSDA_DECLARE_CPU_KERNELS(ns)                                                                          \
  namespace ns {                                                                                                    \
  template <typename scalar_t>                                                                                      \
  void forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,                                 \
               const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights, scalar_t* out, \
               const Sizes& s);                                                                                     \
  template <typename scalar_t>                                                                                      \
  void backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes, const int64_t* starts,      \
                const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,               \
                at::opmath_type<scalar_t>* grad_value_acc, at::opmath_type<scalar_t>* grad_locations,               \
                at::opmath_type<scalar_t>* grad_weights, const Sizes& s, int64_t chunks);                           \
  }
DDETR_MSDA_DECLARE_CPU_KERNELS(base)
DDETR_MSDA_DECLARE_CPU_KERNELS(avx2)
#undef DDETR_MSDA_DECLARE_CPU_KERNELS

// True when the AVX2+FMA copy was compiled (x86-64 with GCC/Clang) and this CPU runs it.
bool cpu_kernels_use_avx2();

}  // namespace msda
}  // namespace deformable_detr
