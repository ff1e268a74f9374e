// Host/device portability of the math headers both ops share between their CPU and CUDA kernels
// (ms_deform_attn_math.h, lsap_core.h): device functions under nvcc, plain inline functions under a host compiler
// (the CPU kernels and the SIMT emulator of tests/simt/).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DDETR_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#define DDETR_UNROLL _Pragma("unroll")
#else
#define DDETR_HOST_DEVICE_INLINE inline
#define DDETR_UNROLL
#endif
