// SIMT emulator: runs the project's CUDA device code (csrc/**/cuda/*.cuh), compiled as host C++, on the CPU.
// Test-only. Each CUDA thread is a ucontext fiber on one OS thread; blocks run one at a time in a seeded random
// order and the ready threads of a block in a seeded random order between synchronisation points, so code that
// depends on scheduling gives seed-dependent results. __syncthreads is a real barrier and __shfl_*_sync a real
// rendezvous of the lanes in the mask; a mismatch or a thread that can never arrive aborts the launch with every
// thread's state (never a hang). Vector accesses and atomics are range- and alignment-checked against the guarded
// allocations (simt.cpp); plain loads outside an allocation hit a PROT_NONE guard page and are reported by the
// SIGSEGV handler. Not emulated: per-instruction interleaving inside a segment between sync points, the memory
// model / hardware atomicity beyond sequential consistency, timing and performance.
#pragma once

#define DDETR_SIMT 1

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>

// ---- CUDA keywords and types, defined away or emulated ------------------------------------------------------------
#define __global__ inline
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define DDETR_CHECK_ACCESS(ptr, bytes, kind) ::simt::check_access((ptr), (bytes), (kind))
#define DDETR_DYNAMIC_SHARED(name) unsigned char* name = ::simt::dynamic_shared()

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
constexpr int warpSize = 32;

// The running fiber's coordinates (set by the scheduler on every switch).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace simt {

// kEndAligned (internal): as close to the end guard as a 512-byte aligned start allows (fresh allocations).
enum class Placement : int { kAligned = 0, kFlushFront = 1, kFlushEnd = 2, kEndAligned = 3 };

struct Config {
  uint64_t seed = 0;
  int poison = 0xA5;  // byte filling fresh allocations and shared memory
  Placement placement = Placement::kAligned;
  int arch = 900;                     // __CUDA_ARCH__ seen by the device code's runtime arch branches
  bool ftz = false;                   // FTZ|DAZ in MXCSR while kernels run (the build's --use_fast_math, float32/half)
  int64_t min_threads_in_flight = 0;  // 0: the launcher's own threshold
};

Config& config();
int arch();

// Aborts the running launch from inside a fiber with `message` (thrown as std::runtime_error by launch()).
[[noreturn]] void fail(const std::string& message);

// Range and alignment check of a `bytes`-wide access (alignment = bytes) against the live guarded allocations.
void check_access(const void* ptr, size_t bytes, const char* kind, size_t alignment = 0);

unsigned char* dynamic_shared();

// Guarded host memory: PROT_NONE pages on both sides, `placement` inside, poison-filled unless `fill` >= 0.
// `misalign` (aligned placement only) offsets the start from a 512-byte boundary.
void* guarded_alloc(size_t bytes, Placement placement, int fill, size_t misalign = 0);
void guarded_free(void* ptr);
bool is_guarded(const void* ptr);

// Runs body() as every thread of a grid of `blocks` x `threads` with `shared_bytes` of dynamic shared memory.
void launch(int64_t blocks, int threads, size_t shared_bytes, void (*body)(void*), void* arg);

// Synchronisation, called by the CUDA shims below.
int barrier(const std::source_location& site, int predicate);
enum class ShuffleOp : int { kXor = 0, kDown = 1, kUp = 2, kIdx = 3 };
uint64_t shuffle(ShuffleOp op, unsigned mask, uint64_t bits, int param, int width, const std::source_location& site);

template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, int64_t blocks, int threads, size_t shared_bytes, Args... args) {
  struct Pack {
    Kernel kernel;
    std::tuple<Args...> args;
  } pack{kernel, std::tuple<Args...>(args...)};
  launch(
      blocks, threads, shared_bytes,
      [](void* p) { std::apply(static_cast<Pack*>(p)->kernel, static_cast<Pack*>(p)->args); }, &pack);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace simt

// ---- CUDA intrinsics
// -------------------------------------------------------------------------------------------------
inline void __syncthreads(std::source_location site = std::source_location::current()) { simt::barrier(site, 0); }
inline int __syncthreads_or(int predicate, std::source_location site = std::source_location::current()) {
  return simt::barrier(site, predicate != 0);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location site = std::source_location::current()) {
  return simt::from_bits<T>(simt::shuffle(simt::ShuffleOp::kXor, mask, simt::to_bits(var), lane_mask, width, site));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location site = std::source_location::current()) {
  return simt::from_bits<T>(
      simt::shuffle(simt::ShuffleOp::kDown, mask, simt::to_bits(var), static_cast<int>(delta), width, site));
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location site = std::source_location::current()) {
  return simt::from_bits<T>(simt::shuffle(simt::ShuffleOp::kIdx, mask, simt::to_bits(var), src_lane, width, site));
}

template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_arithmetic_v<T>);
  simt::check_access(address, sizeof(T), "atomicAdd");
  return std::atomic_ref<T>(*address).fetch_add(value);
}
inline float2 atomicAdd(float2* address, float2 value) {
  simt::check_access(address, sizeof(float2), "atomicAdd(float2)");
  float* p = &address->x;
  return float2{atomicAdd(p, value.x), atomicAdd(p + 1, value.y)};
}
inline float4 atomicAdd(float4* address, float4 value) {
  simt::check_access(address, sizeof(float4), "atomicAdd(float4)");
  float* p = &address->x;
  return float4{atomicAdd(p, value.x), atomicAdd(p + 1, value.y), atomicAdd(p + 2, value.z), atomicAdd(p + 3, value.w)};
}
