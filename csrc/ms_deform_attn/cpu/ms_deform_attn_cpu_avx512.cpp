// The AVX-512 copy of the CPU kernels (F/BW/VL/DQ + FMA: 32 vector registers, EVEX encodings and mask registers
// for the same code), chosen at run time when the CPU has them.
#define DDETR_CPU_ISA avx512
#define DDETR_CPU_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_isa_copy.h"
