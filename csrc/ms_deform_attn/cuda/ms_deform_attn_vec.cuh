// CUDA-only helpers of the MSDA kernels: vector loads/stores of VEC channels converted to the accumulation
// type, vector atomics into the fp32/fp64 gradient buffer, group (sub-warp) reductions.
//
// Under the SIMT emulator (tests/simt/, DDETR_SIMT defined) the runtime types come from the emulator,
// every vector access is range- and alignment-checked (DDETR_CHECK_ACCESS) and the sm_90 branch is a runtime choice,
// so both paths run; under nvcc the checks are empty and the branch is the preprocessor's.
#pragma once

#if !defined(DDETR_SIMT)
#include <cuda_runtime.h>
#define DDETR_CHECK_ACCESS(ptr, bytes, kind)
#endif

#include <cstdint>

namespace deformable_detr {
namespace msda {
namespace cuda_detail {

// VEC consecutive channels moved as one 4/8/16-byte transaction. The host only picks a VEC that divides D and
// matches the alignment of every pointer it is used with, so every address handed to these helpers is aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ src, acc_t (&dst)[VEC]) {
  DDETR_CHECK_ACCESS(src, sizeof(scalar_t) * VEC, "vector load");
  const Vec<scalar_t, VEC> raw = *reinterpret_cast<const Vec<scalar_t, VEC>*>(src);
#pragma unroll
  for (int j = 0; j < VEC; ++j) dst[j] = static_cast<acc_t>(raw.v[j]);
}

template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ void store_vec(scalar_t* __restrict__ dst, const acc_t (&src)[VEC]) {
  DDETR_CHECK_ACCESS(dst, sizeof(scalar_t) * VEC, "vector store");
  Vec<scalar_t, VEC> raw;
#pragma unroll
  for (int j = 0; j < VEC; ++j) raw.v[j] = static_cast<scalar_t>(src[j]);
  *reinterpret_cast<Vec<scalar_t, VEC>*>(dst) = raw;
}

// dst[0:VEC] += val[0:VEC] atomically per element. sm_90 has 8- and 16-byte float atomics (one RED instruction
// for 2 or 4 floats instead of 2 or 4); older archs and float64 fall back to scalar atomics. dst must be aligned
// to min(VEC, 4) floats, which holds because D % VEC == 0 and the buffer is a fresh allocation.
template <typename acc_t, int VEC>
__device__ __forceinline__ void atomic_add_scalars(acc_t* dst, const acc_t (&val)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, val[j]);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float (&val)[VEC]) {
#if defined(DDETR_SIMT) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#if defined(DDETR_SIMT)
  const bool vector_atomics = ::simt::arch() >= 900;
#else
  constexpr bool vector_atomics = true;
#endif
  if (vector_atomics) {
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int j = 0; j < VEC; j += 4) {
        atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(val[j], val[j + 1], val[j + 2], val[j + 3]));
      }
      return;
    } else if constexpr (VEC == 2) {
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(val[0], val[1]));
      return;
    }
  }
#endif
  atomic_add_scalars<float, VEC>(dst, val);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* dst, const double (&val)[VEC]) {
  atomic_add_scalars<double, VEC>(dst, val);
}

// Butterfly sum over an aligned group of `group_size` (a power of two <= 32) lanes; every lane of the warp must
// call it (full mask), and every lane of the group ends with the group's total.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int group_size) {
  for (int offset = group_size >> 1; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace cuda_detail
}  // namespace msda
}  // namespace deformable_detr
