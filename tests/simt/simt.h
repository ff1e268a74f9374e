// SIMT emulator: runs the project's CUDA device code (csrc/**/cuda/*.cuh), compiled as host C++, on the CPU.
// Test-only. Each CUDA thread is a ucontext fiber on one OS thread; blocks run one at a time in a seeded random
// order and the ready threads of a block in a seeded random order between synchronisation points, so code that
// depends on scheduling gives seed-dependent results. __syncthreads is a real barrier and __shfl_*_sync a real
// rendezvous of the lanes in the mask; a mismatch or a thread that can never arrive aborts the launch with every
// thread's state (never a hang). Vector accesses and atomics are range- and alignment-checked against the guarded
// allocations (simt.cpp); plain loads outside an allocation hit a PROT_NONE guard page and are reported by the
// SIGSEGV handler. Not emulated: per-instruction interleaving inside a segment between sync points, the memory
// model / hardware atomicity beyond sequential consistency, timing and performance.
//
// Memory counters (set_counting(true); benchmarks/bench_static_counters.py reads them): every access that goes
// through check_access (the kernels' vector loads/stores, every atomic) is logged per lane; at the end of a block
// the k-th access of a lane at one site (access kind, width, allocation) is paired with the k-th access of every
// other lane of its warp at that site: one warp instruction ("request"), whose distinct 32-byte sectors are
// counted. Lanes of a warp that take different branches around an access are paired by order, which the hardware
// would not do (it issues the instruction once, predicated): exact when the warp's lanes run the same accesses.
// Plain scalar loads/stores (x, y, a, level tables, lane 0's gradient stores) are not seen.
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
#include <vector>

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

// ---- Memory counters ----------------------------------------------------------------------------------------------
struct AccessCounts {
  int64_t requests = 0;       // warp instructions
  int64_t lane_accesses = 0;  // active lanes summed over the requests
  int64_t bytes = 0;          // bytes requested by the lanes
  int64_t sectors = 0;        // distinct 32-byte sectors per request, summed
  int64_t ideal_sectors = 0;  // ceil(distinct bytes of the request / 32): perfectly coalesced
};

struct LaunchCounters {
  std::string label;  // what the Device policy named the launch (kernel|dtype|VEC|group|tiles|arch)
  int64_t blocks = 0, threads = 0;
  AccessCounts load, store, atomic;
  int64_t shuffles = 0;         // completed warp-level shuffle instructions
  int64_t shuffle_lanes = 0;    // lanes taking part in them
  int64_t barriers = 0;         // completed block-wide __syncthreads
  int64_t unique_sectors = 0;   // distinct 32-byte sectors this launch touched (compulsory traffic)
  int64_t l2_miss_sectors = 0;  // misses of an LRU model of a 50 MB L2 kept across the launches since the reset
};

void set_counting(bool on);
void set_launch_label(const std::string& label);
const std::vector<LaunchCounters>& launch_counters();
void reset_counters();

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
// One check (one counted instruction) per vector atomic, as the hardware issues one RED for it.
inline float2 atomicAdd(float2* address, float2 value) {
  simt::check_access(address, sizeof(float2), "atomicAdd(float2)");
  float* p = &address->x;
  return float2{std::atomic_ref<float>(p[0]).fetch_add(value.x), std::atomic_ref<float>(p[1]).fetch_add(value.y)};
}
inline float4 atomicAdd(float4* address, float4 value) {
  simt::check_access(address, sizeof(float4), "atomicAdd(float4)");
  float* p = &address->x;
  return float4{std::atomic_ref<float>(p[0]).fetch_add(value.x), std::atomic_ref<float>(p[1]).fetch_add(value.y),
                std::atomic_ref<float>(p[2]).fetch_add(value.z), std::atomic_ref<float>(p[3]).fetch_add(value.w)};
}
