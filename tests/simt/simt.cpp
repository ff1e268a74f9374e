// SIMT emulator runtime: fiber scheduler, barriers, shuffles, guarded allocator. See simt.h.
#include "simt.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <xmmintrin.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <list>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace simt {
namespace {

constexpr size_t kStackBytes = 128 * 1024;

enum class State { kReady, kBarrier, kShuffle, kExited };

enum class AccessClass : uint8_t { kLoad, kStore, kAtomic };

// One logged access of a lane (memory counters). `site` identifies the access kind, width and allocation.
struct Access {
  uint64_t site;
  uintptr_t addr;
  uint32_t bytes;
  AccessClass cls;
};

// LRU over 32-byte sectors: the L2 model of the counters (H100: 50 MB).
class SectorLru {
 public:
  explicit SectorLru(size_t capacity) : capacity_(capacity) {}
  bool touch(uint64_t sector) {  // true on a hit
    auto it = where_.find(sector);
    if (it != where_.end()) {
      order_.splice(order_.begin(), order_, it->second);
      return true;
    }
    order_.push_front(sector);
    where_[sector] = order_.begin();
    if (order_.size() > capacity_) {
      where_.erase(order_.back());
      order_.pop_back();
    }
    return false;
  }
  void clear() {
    order_.clear();
    where_.clear();
  }

 private:
  size_t capacity_;
  std::list<uint64_t> order_;
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> where_;
};

constexpr size_t kL2Bytes = size_t{50} << 20;

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;  // mmap'ed, lowest page a guard
  State state = State::kReady;
  std::source_location site;
  int predicate = 0;
  // shuffle arrival
  ShuffleOp op = ShuffleOp::kXor;
  unsigned mask = 0;
  int param = 0, width = 0;
  uint64_t bits = 0, result = 0;
  std::vector<Access> trace;  // memory counters only
};

struct Allocation {
  unsigned char* map;
  size_t map_bytes;
  uintptr_t begin, end;
};

struct Runtime {
  Config config;
  std::map<uintptr_t, Allocation> allocations;  // by begin
  // launch state
  bool in_launch = false;
  std::vector<Fiber> fibers;
  std::vector<int> ready;
  ucontext_t main_ctx;
  int current = -1;
  std::string error;
  std::mt19937_64 rng;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  unsigned char* shared = nullptr;
  size_t shared_bytes = 0;
  int64_t block = -1;
  // memory counters
  bool counting = false;
  std::string label;
  std::vector<LaunchCounters> counters;
  std::unordered_set<uint64_t> launch_sectors;
  SectorLru l2{kL2Bytes / 32};
};

Runtime& rt() {
  static Runtime r;
  return r;
}

const char* op_name(ShuffleOp op) {
  switch (op) {
    case ShuffleOp::kXor:
      return "__shfl_xor_sync";
    case ShuffleOp::kDown:
      return "__shfl_down_sync";
    case ShuffleOp::kUp:
      return "__shfl_up_sync";
    default:
      return "__shfl_sync";
  }
}

std::string where(const std::source_location& s) {
  std::string file = s.file_name();
  const auto slash = file.rfind("csrc/");
  if (slash != std::string::npos) file = file.substr(slash);
  return file + ":" + std::to_string(s.line());
}

std::string thread_states() {
  Runtime& r = rt();
  std::ostringstream os;
  os << "block " << r.block << ", thread states:";
  for (size_t t = 0; t < r.fibers.size(); ++t) {
    const Fiber& f = r.fibers[t];
    os << "\n  thread " << t << " (warp " << t / 32 << ", lane " << t % 32 << "): ";
    switch (f.state) {
      case State::kReady:
        os << "ready";
        break;
      case State::kExited:
        os << "exited";
        break;
      case State::kBarrier:
        os << "waiting at __syncthreads " << where(f.site);
        break;
      case State::kShuffle:
        os << "waiting at " << op_name(f.op) << " " << where(f.site) << " mask 0x" << std::hex << f.mask << std::dec;
        break;
    }
  }
  return os.str();
}

[[noreturn]] void yield_forever() {
  Runtime& r = rt();
  swapcontext(&r.fibers[r.current].ctx, &r.main_ctx);
  std::abort();  // an aborted or exited fiber is never resumed
}

void yield() {
  Runtime& r = rt();
  swapcontext(&r.fibers[r.current].ctx, &r.main_ctx);
}

void release(int t) {
  rt().fibers[t].state = State::kReady;
  rt().ready.push_back(t);
}

// The shuffle of `lane`'s warp: if every lane of the arriving lane's mask waits with the same op, mask, width and
// call site, compute all results and make them ready.
void try_complete_shuffle(int warp_base, int warp_lanes) {
  Runtime& r = rt();
  const Fiber* first = nullptr;
  unsigned arrived = 0;
  for (int l = 0; l < warp_lanes; ++l) {
    const Fiber& f = r.fibers[warp_base + l];
    if (f.state != State::kShuffle) continue;
    if (first == nullptr) first = &f;
    arrived |= 1u << l;
  }
  if (first == nullptr || (arrived & first->mask) != first->mask) return;
  for (int l = 0; l < warp_lanes; ++l) {
    if (!((first->mask >> l) & 1u)) continue;
    Fiber& f = r.fibers[warp_base + l];
    const int width = f.width;
    const int base = l / width * width;
    int src = l;
    switch (f.op) {
      case ShuffleOp::kXor:
        src = l ^ f.param;
        if (src >= base + width) src = l;
        break;
      case ShuffleOp::kDown:
        src = (l - base) + f.param < width ? l + f.param : l;
        break;
      case ShuffleOp::kUp:
        src = (l - base) - f.param >= 0 ? l - f.param : l;
        break;
      case ShuffleOp::kIdx:
        src = base + (f.param % width);
        break;
    }
    if (src < 0 || src >= warp_lanes || !((first->mask >> src) & 1u)) {
      std::ostringstream os;
      os << op_name(f.op) << " at " << where(f.site) << ": lane " << l << " reads lane " << src
         << ", which is not in the mask 0x" << std::hex << first->mask;
      r.error = os.str();
      return;
    }
    f.result = r.fibers[warp_base + src].bits;
  }
  for (int l = 0; l < warp_lanes; ++l) {
    if ((first->mask >> l) & 1u) release(warp_base + l);
  }
  if (r.counting) {
    r.counters.back().shuffles += 1;
    r.counters.back().shuffle_lanes += std::popcount(first->mask);
  }
}

void try_complete_barrier() {
  Runtime& r = rt();
  int predicate = 0;
  for (const Fiber& f : r.fibers) {
    if (f.state != State::kBarrier) return;
    predicate |= f.predicate;
  }
  for (size_t t = 0; t < r.fibers.size(); ++t) {
    r.fibers[t].predicate = predicate;
    release(static_cast<int>(t));
  }
  if (r.counting) r.counters.back().barriers += 1;
}

// Pairs the logged accesses of each warp of the finished block into warp instructions (see simt.h) and adds
// them to the launch's counters, the unique-sector set and the L2 model.
void count_block() {
  Runtime& r = rt();
  LaunchCounters& c = r.counters.back();
  struct Request {
    AccessClass cls;
    int64_t lanes = 0, bytes = 0;
    std::vector<uint64_t> sectors;
    std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // [begin, end) of each lane's access
  };
  const int threads = static_cast<int>(r.fibers.size());
  for (int warp_base = 0; warp_base < threads; warp_base += 32) {
    std::map<std::pair<uint64_t, int64_t>, Request> requests;  // (site, occurrence) -> request
    for (int t = warp_base; t < std::min(warp_base + 32, threads); ++t) {
      std::unordered_map<uint64_t, int64_t> occurrence;
      for (const Access& a : r.fibers[t].trace) {
        Request& q = requests[{a.site, occurrence[a.site]++}];
        q.cls = a.cls;
        q.lanes += 1;
        q.bytes += a.bytes;
        q.ranges.emplace_back(a.addr, a.addr + a.bytes);
        for (uint64_t s = a.addr / 32; s <= (a.addr + a.bytes - 1) / 32; ++s) {
          q.sectors.push_back(s);
          r.launch_sectors.insert(s);
          if (!r.l2.touch(s)) c.l2_miss_sectors += 1;
        }
      }
      r.fibers[t].trace.clear();
    }
    for (auto& [key, q] : requests) {
      AccessCounts& k = q.cls == AccessClass::kLoad ? c.load : (q.cls == AccessClass::kStore ? c.store : c.atomic);
      std::sort(q.sectors.begin(), q.sectors.end());
      k.requests += 1;
      k.lane_accesses += q.lanes;
      k.bytes += q.bytes;
      k.sectors += std::unique(q.sectors.begin(), q.sectors.end()) - q.sectors.begin();
      // Perfect coalescing: the distinct bytes of the request (lanes reading the same row count once), packed.
      std::sort(q.ranges.begin(), q.ranges.end());
      int64_t distinct = 0;
      uintptr_t covered = 0;
      for (const auto& [b, e] : q.ranges) {
        const uintptr_t from = std::max(b, covered);
        if (e > from) distinct += static_cast<int64_t>(e - from);
        covered = std::max(covered, e);
      }
      k.ideal_sectors += (distinct + 31) / 32;
    }
  }
}

void fiber_entry() {
  Runtime& r = rt();
  r.body(r.body_arg);
  Fiber& me = r.fibers[r.current];
  me.state = State::kExited;
  // A lane leaving while lanes of its warp wait for it at a shuffle can never be waited for.
  const int warp_base = r.current / 32 * 32;
  const int lane = r.current - warp_base;
  for (int t = warp_base; t < std::min<int>(warp_base + 32, static_cast<int>(r.fibers.size())); ++t) {
    const Fiber& f = r.fibers[t];
    if (f.state == State::kShuffle && ((f.mask >> lane) & 1u)) {
      r.error = "thread " + std::to_string(r.current) + " exited while lane " + std::to_string(t - warp_base) +
                " of its warp waits for it at " + op_name(f.op) + " " + where(f.site) + "\n" + thread_states();
      break;
    }
  }
  yield_forever();
}

unsigned char* map_stack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
  mprotect(p, 4096, PROT_NONE);
  return static_cast<unsigned char*>(p);
}

void run_block(int threads) {
  Runtime& r = rt();
  if (r.shared_bytes > 0) std::memset(r.shared, r.config.poison, r.shared_bytes);
  r.ready.clear();
  for (int t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    f.state = State::kReady;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    r.ready.push_back(t);
  }
  while (r.error.empty()) {
    if (r.ready.empty()) {
      bool all_exited = true, barrier = false, exited = false;
      for (const Fiber& f : r.fibers) {
        all_exited &= f.state == State::kExited;
        barrier |= f.state == State::kBarrier;
        exited |= f.state == State::kExited;
      }
      if (all_exited) {
        if (r.counting) count_block();
        return;
      }
      r.error = barrier && exited ? "deadlock: __syncthreads waits for threads that exited\n" + thread_states()
                                  : "deadlock: no thread can proceed\n" + thread_states();
      return;
    }
    const size_t pick = std::uniform_int_distribution<size_t>(0, r.ready.size() - 1)(r.rng);
    r.current = r.ready[pick];
    r.ready[pick] = r.ready.back();
    r.ready.pop_back();
    threadIdx = dim3{static_cast<unsigned>(r.current), 1, 1};
    swapcontext(&r.main_ctx, &r.fibers[r.current].ctx);
  }
}

thread_local char segv_stack[64 * 1024];

void on_segv(int, siginfo_t* info, void*) {
  Runtime& r = rt();
  char msg[512];
  const auto a = reinterpret_cast<uintptr_t>(info->si_addr);
  uintptr_t nb = 0, ne = 0, best = UINTPTR_MAX;
  for (const auto& [begin, alloc] : r.allocations) {
    const uintptr_t d = a < begin ? begin - a : (a >= alloc.end ? a - alloc.end : 0);
    if (d < best) best = d, nb = begin, ne = alloc.end;
  }
  const int n = std::snprintf(msg, sizeof msg,
                              "simt: invalid memory access at %p (block %lld, thread %d): offset %lld in the nearest "
                              "allocation [%p, %p) of %llu bytes\n",
                              info->si_addr, static_cast<long long>(r.block), r.current,
                              static_cast<long long>(a) - static_cast<long long>(nb), reinterpret_cast<void*>(nb),
                              reinterpret_cast<void*>(ne), static_cast<unsigned long long>(ne - nb));
  if (n > 0) (void)!write(2, msg, static_cast<size_t>(n));
  _exit(86);
}

void install_segv_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  stack_t ss{};
  ss.ss_sp = segv_stack;
  ss.ss_size = sizeof segv_stack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace

Config& config() { return rt().config; }
int arch() { return rt().config.arch; }

void fail(const std::string& message) {
  Runtime& r = rt();
  if (!r.in_launch || r.current < 0) throw std::runtime_error("simt: " + message);
  r.error = "block " + std::to_string(r.block) + ", thread " + std::to_string(r.current) + ": " + message;
  yield_forever();
}

void check_access(const void* ptr, size_t bytes, const char* kind, size_t alignment) {
  Runtime& r = rt();
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  if (alignment == 0) alignment = bytes;
  std::ostringstream os;
  if (a % alignment != 0) {
    os << kind << " of " << bytes << " bytes at " << ptr << " is misaligned (needs " << alignment << "-byte alignment)";
    fail(os.str());
  }
  auto it = r.allocations.upper_bound(a);
  if (it != r.allocations.begin()) {
    --it;
    if (a >= it->second.begin && a + bytes <= it->second.end) {
      if (r.counting && r.in_launch && r.current >= 0) {
        const AccessClass cls = std::strncmp(kind, "atomic", 6) == 0    ? AccessClass::kAtomic
                                : std::strstr(kind, "store") != nullptr ? AccessClass::kStore
                                                                        : AccessClass::kLoad;
        const uint64_t site = (reinterpret_cast<uintptr_t>(kind) * 0x9E3779B97F4A7C15ull) ^ (uint64_t{bytes} << 56) ^
                              (it->second.begin * 0xC2B2AE3D27D4EB4Full);
        r.fibers[r.current].trace.push_back(Access{site, a, static_cast<uint32_t>(bytes), cls});
      }
      return;
    }
  }
  os << kind << " of " << bytes << " bytes at " << ptr << " is outside every allocation";
  if (it != r.allocations.end() && a >= it->second.begin) {
    os << " (allocation [" << reinterpret_cast<void*>(it->second.begin) << ", "
       << reinterpret_cast<void*>(it->second.end) << "), overrun by " << a + bytes - it->second.end << " bytes)";
  }
  fail(os.str());
}

unsigned char* dynamic_shared() { return rt().shared; }

void set_counting(bool on) { rt().counting = on; }
void set_launch_label(const std::string& label) { rt().label = label; }
const std::vector<LaunchCounters>& launch_counters() { return rt().counters; }
void reset_counters() {
  rt().counters.clear();
  rt().l2.clear();
}

void* guarded_alloc(size_t bytes, Placement placement, int fill, size_t misalign) {
  install_segv_handler();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + 1024 + page - 1) / page * page;
  const size_t total = body + 2 * page;
  auto* map =
      static_cast<unsigned char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (map == MAP_FAILED) throw std::runtime_error("simt: guarded_alloc cannot map memory");
  mprotect(map, page, PROT_NONE);
  mprotect(map + page + body, page, PROT_NONE);
  const int poison = rt().config.poison;
  std::memset(map + page, poison, body);
  unsigned char* start = map + page;
  if (placement == Placement::kAligned) start += 512 + misalign % 512;
  if (placement == Placement::kFlushEnd) start = map + page + body - bytes;
  if (placement == Placement::kEndAligned) start = map + page + (body - bytes) / 512 * 512;
  if (fill >= 0) std::memset(start, fill, bytes);
  const auto b = reinterpret_cast<uintptr_t>(start);
  rt().allocations[b] = Allocation{map, total, b, b + bytes};
  return start;
}

void guarded_free(void* ptr) {
  Runtime& r = rt();
  auto it = r.allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == r.allocations.end()) return;
  munmap(it->second.map, it->second.map_bytes);
  r.allocations.erase(it);
}

bool is_guarded(const void* ptr) {
  Runtime& r = rt();
  const auto a = reinterpret_cast<uintptr_t>(ptr);
  auto it = r.allocations.upper_bound(a);
  if (it == r.allocations.begin()) return false;
  --it;
  return a >= it->second.begin && a < it->second.end;
}

int barrier(const std::source_location& site, int predicate) {
  Runtime& r = rt();
  if (!r.in_launch) fail("__syncthreads outside a kernel");
  Fiber& me = r.fibers[r.current];
  for (const Fiber& f : r.fibers) {
    if (f.state == State::kBarrier &&
        (f.site.line() != site.line() || std::strcmp(f.site.file_name(), site.file_name()))) {
      fail("threads wait at different __syncthreads: " + where(site) + " and " + where(f.site) + "\n" +
           thread_states());
    }
  }
  me.state = State::kBarrier;
  me.site = site;
  me.predicate = predicate;
  try_complete_barrier();
  yield();
  return r.fibers[r.current].predicate;
}

uint64_t shuffle(ShuffleOp op, unsigned mask, uint64_t bits, int param, int width, const std::source_location& site) {
  Runtime& r = rt();
  if (!r.in_launch) fail("shuffle outside a kernel");
  const int warp_base = r.current / 32 * 32;
  const int warp_lanes = std::min<int>(32, static_cast<int>(r.fibers.size()) - warp_base);
  const int lane = r.current - warp_base;
  if (!((mask >> lane) & 1u)) fail(std::string(op_name(op)) + " at " + where(site) + ": lane not in its own mask");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width must be a power of two <= 32");
  for (int l = 0; l < warp_lanes; ++l) {
    const Fiber& f = r.fibers[warp_base + l];
    if (f.state == State::kExited && ((mask >> l) & 1u)) {
      fail(std::string(op_name(op)) + " at " + where(site) + ": lane " + std::to_string(l) +
           " of the mask has exited\n" + thread_states());
    }
    if (f.state != State::kShuffle) continue;
    if (f.op != op || f.mask != mask || f.width != width || f.site.line() != site.line() ||
        std::strcmp(f.site.file_name(), site.file_name()) != 0) {
      std::ostringstream os;
      os << "divergent shuffle in warp " << warp_base / 32 << ": lane " << lane << " at " << op_name(op) << " "
         << where(site) << " (mask 0x" << std::hex << mask << std::dec << ", width " << width << ") while lane " << l
         << " waits at " << op_name(f.op) << " " << where(f.site) << " (mask 0x" << std::hex << f.mask << std::dec
         << ", width " << f.width << ")\n"
         << thread_states();
      fail(os.str());
    }
  }
  Fiber& me = r.fibers[r.current];
  me.state = State::kShuffle;
  me.op = op;
  me.mask = mask;
  me.param = param;
  me.width = width;
  me.bits = bits;
  me.site = site;
  try_complete_shuffle(warp_base, warp_lanes);
  if (!r.error.empty()) yield_forever();
  yield();
  return r.fibers[r.current].result;
}

void launch(int64_t blocks, int threads, size_t shared_bytes, void (*body)(void*), void* arg) {
  Runtime& r = rt();
  if (threads <= 0 || threads > 1024) throw std::runtime_error("simt: invalid block size " + std::to_string(threads));
  if (shared_bytes > 48 * 1024) throw std::runtime_error("simt: dynamic shared memory over 48 KiB without opt-in");
  if (blocks <= 0) throw std::runtime_error("simt: a launch of zero blocks is a CUDA error");
  install_segv_handler();
  r.rng.seed(r.config.seed * 0x9E3779B97F4A7C15ull + 1);
  std::vector<int64_t> order(static_cast<size_t>(blocks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), r.rng);
  r.fibers.assign(static_cast<size_t>(threads), Fiber{});
  for (Fiber& f : r.fibers) f.stack = map_stack();
  r.shared_bytes = shared_bytes;
  r.shared =
      shared_bytes > 0 ? static_cast<unsigned char*>(guarded_alloc(shared_bytes, Placement::kFlushEnd, -1)) : nullptr;
  r.body = body;
  r.body_arg = arg;
  r.error.clear();
  if (r.counting) {
    r.counters.push_back(LaunchCounters{});
    r.counters.back().label = r.label;
    r.counters.back().blocks = blocks;
    r.counters.back().threads = threads;
    r.launch_sectors.clear();
  }
  r.in_launch = true;
  const unsigned int saved_csr = _mm_getcsr();
  if (r.config.ftz) _mm_setcsr(saved_csr | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
  blockDim = dim3{static_cast<unsigned>(threads), 1, 1};
  gridDim = dim3{static_cast<unsigned>(blocks), 1, 1};
  for (int64_t b : order) {
    r.block = b;
    blockIdx = dim3{static_cast<unsigned>(b), 1, 1};
    run_block(threads);
    if (!r.error.empty()) break;
  }
  _mm_setcsr(saved_csr);
  if (r.counting) r.counters.back().unique_sectors = static_cast<int64_t>(r.launch_sectors.size());
  r.in_launch = false;
  r.current = -1;
  for (Fiber& f : r.fibers) munmap(f.stack, kStackBytes);
  r.fibers.clear();
  if (r.shared != nullptr) guarded_free(r.shared);
  r.shared = nullptr;
  if (!r.error.empty()) throw std::runtime_error("simt: " + r.error);
}

}  // namespace simt
