// Host emulation of the CUDA features binary_kernels.cu uses, so that the same kernel source runs on a CPU in
// tests (tests/test_kernels_device.py) when no GPU is available. Built with g++ -DDBGEN_HOST_EMULATION.
//
// A launch runs its blocks one after another; a block's threads are std::threads, __syncthreads is a barrier
// (emu::Barrier), and __shared__ variables are function-local statics (shared by the block's threads; blocks
// never overlap).
// Warp primitives (shuffle, ballot, mma.sync) exchange values through a per-warp buffer between two warp
// barriers. The mma emulations follow the PTX ISA fragment layouts of mma.m16n8k256 (.b1, AND + popc) and
// mma.m16n8k16 (.f16/.bf16 -> .f32). This checks indexing, tiling, split-K and epilogues; it cannot check
// timing, memory coalescing or the hardware's own behaviour.
//
// cp.async is modelled as late as the PTX ISA allows: a thread's copies are queued per commit group and land
// (source read, destination written, zero fill) only at the cp.async.wait_group that covers their group, so a
// kernel that reads a stage before waiting for it reads stale shared memory and fails its test. Built with
// -DDBGEN_EMU_FAULT_WEAK_WAIT, wait_group N leaves N + 1 groups pending (an off-by-one wait count): the tests
// use that build to show that the device tests catch a missing wait.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <chrono>
#include <system_error>
#include <type_traits>
#include <vector>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)

using std::max;
using std::min;

namespace emu {

// A block barrier that spins only briefly, then sleeps on a futex until the last thread arrives. libstdc++'s
// std::barrier spins and yields for long: with a block's 128-256 threads on 2 shared cores the spinners starved
// the threads still to arrive, and a test beside other processes ran 6x slower than alone, for 3x less CPU.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    const uint32_t phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&phase_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
      return;
    }
    for (int spin = 0; spin < 64; ++spin)
      if (phase_.load(std::memory_order_acquire) != phase) return;
    while (phase_.load(std::memory_order_acquire) == phase)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&phase_), FUTEX_WAIT_PRIVATE, phase, nullptr, nullptr, 0);
  }

 private:
  const int count_;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> phase_{0};
};

struct Block {
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint32_t> exchange;  // per warp: 32 lanes x 16 words
  explicit Block(int threads) : block(threads), exchange((threads / 32) * 32 * 16) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Barrier>(32));
  }
};

inline thread_local uint3 tid_, bid_;
inline thread_local dim3 bdim_, gdim_;
inline thread_local Block* block_ = nullptr;
inline thread_local uint32_t* dyn_smem_ = nullptr;

inline int lane() { return (int)(tid_.x & 31); }
inline int warp() { return (int)(tid_.x >> 5); }
inline uint32_t* slot(int l) { return &block_->exchange[(warp() * 32 + l) * 16]; }
inline void warp_sync() { block_->warps[warp()]->arrive_and_wait(); }

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  const int threads = (int)(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b(threads);
        std::vector<uint32_t> dyn((smem + 3) / 4 + 4);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          // A busy host can refuse a thread for a moment (EAGAIN); an exception here would destroy joinable
          // threads (std::terminate: the whole process aborts), so wait and try again, for up to ~60 s.
          for (int attempt = 0;; ++attempt) {
            try {
              pool.emplace_back([&, t] {
                tid_ = make_uint3((unsigned)t, 0, 0);
                bid_ = make_uint3(x, y, z);
                bdim_ = block;
                gdim_ = grid;
                block_ = &b;
                dyn_smem_ = dyn.data();
                kernel(args...);
              });
              break;
            } catch (const std::system_error&) {
              if (attempt >= 6000) throw;  // threads already started wait at a barrier: nothing else to do
              std::this_thread::sleep_for(std::chrono::milliseconds(10));
            }
          }
        }
        for (auto& th : pool) th.join();
      }
}

inline int shfl_xor(int v, int mask) {
  slot(lane())[0] = (uint32_t)v;
  warp_sync();
  const int r = (int)slot(lane() ^ mask)[0];
  warp_sync();
  return r;
}

inline unsigned ballot(bool pred) {
  slot(lane())[0] = pred ? 1u : 0u;
  warp_sync();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= slot(l)[0] << l;
  warp_sync();
  return m;
}

// mma.m16n8k256 .b1 AND.POPC: a0/a1 = rows g/g+8 words t, a2/a3 = rows g/g+8 words t+4; b0/b1 = column g
// words t / t+4; d0..d3 = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)  (g = lane/4, t = lane%4).
inline void mma_b1_and(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t* s = slot(lane());
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = b[0];
  s[5] = b[1];
  warp_sync();
  const int g = lane() >> 2, t = lane() & 3;
  int d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    int sum = c[e];
    for (int w = 0; w < 8; ++w) {
      const uint32_t aw = slot((row & 7) * 4 + (w & 3))[(row >= 8 ? 1 : 0) + (w >= 4 ? 2 : 0)];
      const uint32_t bw = slot(col * 4 + (w & 3))[4 + (w >= 4 ? 1 : 0)];
      sum += __builtin_popcount(aw & bw);
    }
    d[e] = sum;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

template <typename T>
inline float half_of(uint32_t w, int hi) {
  const uint16_t bits = (uint16_t)(hi ? (w >> 16) : (w & 0xffffu));
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same<T, __half>::value) return __half2float(v);
  else return __bfloat162float(v);
}

// mma.m16n8k16 (.f16/.bf16 in, .f32 accumulate): a0 = (g, k 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
// a3 = (g+8, 2t+8..); b0 = (k 2t..2t+1, col g), b1 = (k 2t+8.., col g); lower 16 bits = lower k; d as above.
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t* s = slot(lane());
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = b0;
  s[5] = b1;
  warp_sync();
  const int g = lane() >> 2, t = lane() & 3;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    float sum = c[e];
    for (int k = 0; k < 16; ++k) {
      const int kl = k & 7;
      const float av = half_of<T>(slot((row & 7) * 4 + kl / 2)[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], kl & 1);
      const float bv = half_of<T>(slot(col * 4 + kl / 2)[4 + (k >= 8 ? 1 : 0)], kl & 1);
      sum += av * bv;
    }
    d[e] = sum;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// cp.async: per thread, the copies of the open group and the committed groups, oldest first.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled (src_bytes 0 reads nothing)
};
inline thread_local std::vector<AsyncCopy> cp_open_;
inline thread_local std::deque<std::vector<AsyncCopy>> cp_groups_;
inline std::atomic<int> launch_error_{0};  // the first fault since the last cudaGetLastError

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  const bool aligned = (uintptr_t)dst % bytes == 0 && (src_bytes == 0 || (uintptr_t)src % bytes == 0);
  if (!aligned || src_bytes < 0 || src_bytes > bytes) {  // the device faults: report it as a launch error
    int none = 0;
    launch_error_.compare_exchange_strong(none, (int)cudaErrorMisalignedAddress);
    return;
  }
  cp_open_.push_back({dst, src, bytes, src_bytes});
}

inline void cp_async_commit() {
  cp_groups_.push_back(std::move(cp_open_));
  cp_open_.clear();
}

// Lands every committed group but the newest `pending`.
inline void cp_async_wait(int pending) {
#ifdef DBGEN_EMU_FAULT_WEAK_WAIT
  ++pending;
#endif
  while ((int)cp_groups_.size() > pending) {
    for (const AsyncCopy& c : cp_groups_.front()) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    cp_groups_.pop_front();
  }
}

inline int take_error() { return launch_error_.exchange(0); }

inline const char* error_string(int err) {
  if (err == 0) return "no error";
  if (err == (int)cudaErrorMisalignedAddress) return "misaligned address (emulated cp.async)";
  return "emulated launch error";
}

// A small device: 4 multiprocessors, Hopper's shared-memory limits.
inline cudaError_t device_attribute(int* value, cudaDeviceAttr attr) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = 4;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = 227 * 1024;
  else *value = 0;
  return cudaSuccess;
}

inline cudaError_t func_attributes(cudaFuncAttributes* attr) {
  std::memset(attr, 0, sizeof(*attr));
  return cudaSuccess;
}

}  // namespace emu

#define threadIdx (emu::tid_)
#define blockIdx (emu::bid_)
#define blockDim (emu::bdim_)
#define gridDim (emu::gdim_)
#define __syncthreads() (emu::block_->block.arrive_and_wait())
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor((v), (m))
#define __ballot_sync(mask, pred) emu::ballot((pred))
#define __popc(x) __builtin_popcount(x)
#define __fmul_rn(a, b) ((a) * (b))
#define __fadd_rn(a, b) ((a) + (b))
#define cudaSetDevice(d) (cudaSuccess)
#define cudaGetLastError() ((cudaError_t)emu::take_error())
#define cudaGetErrorString(e) emu::error_string((int)(e))
#define cudaDeviceGetAttribute(value, attr, device) emu::device_attribute((value), (attr))
#define cudaFuncGetAttributes(attr, kernel) emu::func_attributes((attr))
#define cudaFuncSetAttribute(kernel, attr, value) (cudaSuccess)
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, threads, smem) (*(n) = 1, cudaSuccess)

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }

#define DBGEN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu::launch(kernel, dim3(grid), dim3(block), (size_t)(smem), __VA_ARGS__)
#define DBGEN_DYNAMIC_SMEM(name) uint32_t* name = emu::dyn_smem_
