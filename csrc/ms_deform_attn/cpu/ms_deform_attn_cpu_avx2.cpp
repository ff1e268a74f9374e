// The AVX2+FMA copy of the CPU kernels (8-wide fp32 vectors), chosen at run time when the CPU has them.
#define DDETR_CPU_ISA avx2
#define DDETR_CPU_ISA_TARGET "avx2,fma"
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_isa_copy.h"
