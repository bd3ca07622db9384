// Gates (csrc/cuda/gates.h): stream memory operations of the driver API behind a small class.
#include "gates.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "../errors.h"
#include "cuda_check.h"

namespace kvstore {
namespace gpu {
namespace {

using WaitValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using WriteValue32 = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

struct MemOps {
  WaitValue32 wait = nullptr;
  WriteValue32 write = nullptr;
};

constexpr int kMaxGates = 512;  // flags per block: layers of one load

// The driver's entry points, looked up once (nullptr where the runtime or driver lacks them).
const MemOps& mem_ops() {
  static const MemOps ops = [] {
    MemOps m;
#if CUDART_VERSION >= 12050
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      m.wait = reinterpret_cast<WaitValue32>(fn);
    fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", &fn, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      m.write = reinterpret_cast<WriteValue32>(fn);
#endif
    cudaGetLastError();
    return m;
  }();
  return ops;
}

void check_driver(CUresult rc, const char* what) {
  if (rc != CUDA_SUCCESS) throw CudaFailure(std::string(what) + " failed: CUresult " + std::to_string(int(rc)));
}

// Flag blocks. Stream memory operations reject stream-ordered (pool) and managed memory
// (CUDA_ERROR_INVALID_VALUE: benchmarks/probes/memops_probe.cu, H100, driver 580), and cudaFree would
// synchronise the device, so blocks come from cudaMalloc once and are reused: a released block
// is handed out again only after its `released` event (recorded on the feed after the last wait
// passed) has completed. Process lifetime, like a memory pool's memory.
class FlagBlocks {
 public:
  uint32_t* acquire(int device) {
    std::lock_guard<std::mutex> g(mu_);
    auto& free = free_[device];
    for (auto it = free.begin(); it != free.end(); ++it) {
      if (cudaEventQuery(it->second) != cudaSuccess) continue;
      uint32_t* block = it->first;
      cudaEventDestroy(it->second);
      free.erase(it);
      cudaGetLastError();  // a query that said "not ready" leaves that error behind
      return block;
    }
    cudaGetLastError();
    void* p = nullptr;
    KV_CUDA(cudaMalloc(&p, sizeof(uint32_t) * kMaxGates));
    return static_cast<uint32_t*>(p);
  }
  // `released`: an event recorded after the block's last use (owned from now on).
  void release(int device, uint32_t* block, cudaEvent_t released) {
    std::lock_guard<std::mutex> g(mu_);
    free_[device].emplace_back(block, released);
  }

 private:
  std::mutex mu_;
  std::map<int, std::vector<std::pair<uint32_t*, cudaEvent_t>>> free_;
};

FlagBlocks& flag_blocks() {
  static FlagBlocks* blocks = new FlagBlocks;  // never destroyed: outlives every Gates at exit
  return *blocks;
}

}  // namespace

bool gates_supported(int device) {
  (void)device;  // stream memory operations on device memory: every device of a CUDA 12 driver
  return mem_ops().wait != nullptr && mem_ops().write != nullptr;
}

Gates::Gates(int device, int count, uintptr_t feed, int priority) : device_(device), feed_(feed) {
  KV_CHECK_ARG(count > 0 && count <= kMaxGates, "gates: count must be in [1, " + std::to_string(kMaxGates) + "]");
  if (!gates_supported(device))
    throw GpuUnavailable("stream memory operations (cuStreamWaitValue32) are not available from this CUDA driver");
  KV_CUDA(cudaSetDevice(device));
  cudaStream_t f = reinterpret_cast<cudaStream_t>(feed);
  cudaStream_t w = nullptr;
  cudaEvent_t zeroed = nullptr, passed = nullptr;
  try {
    KV_CUDA(cudaStreamCreateWithPriority(&w, cudaStreamNonBlocking, priority));
    waiter_ = reinterpret_cast<uintptr_t>(w);
    KV_CUDA(cudaEventCreateWithFlags(&zeroed, cudaEventDisableTiming));
    zeroed_ = reinterpret_cast<uintptr_t>(zeroed);
    KV_CUDA(cudaEventCreateWithFlags(&passed, cudaEventDisableTiming));
    passed_ = reinterpret_cast<uintptr_t>(passed);
    flags_ = flag_blocks().acquire(device);
    KV_CUDA(cudaMemsetAsync(flags_, 0, sizeof(uint32_t) * size_t(count), f));
    KV_CUDA(cudaEventRecord(zeroed, f));
    KV_CUDA(cudaStreamWaitEvent(w, zeroed, 0));  // no wait may read a flag before it was zeroed
  } catch (...) {
    if (flags_ && passed && cudaEventRecord(passed, f) == cudaSuccess)
      flag_blocks().release(device, flags_, passed);  // after whatever reached the feed
    else if (passed)
      cudaEventDestroy(passed);
    if (zeroed) cudaEventDestroy(zeroed);
    if (w) cudaStreamDestroy(w);
    cudaGetLastError();
    throw;
  }
  opened_.assign(size_t(count), false);
}

Gates::~Gates() {
  cudaSetDevice(device_);
  for (int i = 0; i < count(); ++i)
    if (!opened_[size_t(i)]) mem_ops().write(reinterpret_cast<CUstream>(feed_), CUdeviceptr(flags_ + i), 1, 0);
  cudaStream_t f = reinterpret_cast<cudaStream_t>(feed_);
  cudaEvent_t passed = reinterpret_cast<cudaEvent_t>(passed_);
  // The block is reused only after the waiting stream has read it for the last time and the
  // feed's last write to it has run: `passed` on the waiter, the feed waits, `passed` again there.
  cudaEventRecord(passed, reinterpret_cast<cudaStream_t>(waiter_));
  cudaStreamWaitEvent(f, passed, 0);
  cudaEventRecord(passed, f);
  flag_blocks().release(device_, flags_, passed);
  cudaEventDestroy(reinterpret_cast<cudaEvent_t>(zeroed_));
  cudaStreamDestroy(reinterpret_cast<cudaStream_t>(waiter_));
  cudaGetLastError();
}

void Gates::check(int i) const {
  KV_CHECK_ARG(0 <= i && i < count(), "gate " + std::to_string(i) + " outside [0, " + std::to_string(count()) + ")");
}

void Gates::wait(int i) {
  check(i);
  KV_CUDA(cudaSetDevice(device_));
  check_driver(mem_ops().wait(reinterpret_cast<CUstream>(waiter_), CUdeviceptr(flags_ + i), 1, CU_STREAM_WAIT_VALUE_GEQ),
               "cuStreamWaitValue32");
}

void Gates::open(int i) {
  check(i);
  KV_CHECK_ARG(!opened_[size_t(i)], "gate " + std::to_string(i) + " opened twice");
  KV_CUDA(cudaSetDevice(device_));
  // The default write comes after a memory fence: the copies before it are visible once it is.
  check_driver(mem_ops().write(reinterpret_cast<CUstream>(feed_), CUdeviceptr(flags_ + i), 1,
                               CU_STREAM_WRITE_VALUE_DEFAULT),
               "cuStreamWriteValue32");
  opened_[size_t(i)] = true;
}

}  // namespace gpu
}  // namespace kvstore
