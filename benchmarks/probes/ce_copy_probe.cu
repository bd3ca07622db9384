// Probe: how fast the copy engines move one layer's scattered 32 KiB engine units (Llama-3.1-8B:
// 512 units = 16 MiB) host->device and device->device, and whether a device->device copy needs
// SMs (it is timed again while a kernel holds every SM). On the GPU machine:
//   nvcc -O2 -gencode=arch=compute_90,code=sm_90 -o /tmp/ce benchmarks/probes/ce_copy_probe.cu && /tmp/ce
// H100 80GB HBM3, driver 580.159.04, CUDA 13.0 (2026-11-26, two runs; us for 16 MiB, GB/s):
//   h2d one copy 309-315 us (53-54); h2d batch of 512 scattered units 382-497 us (34-44; alone,
//   host enqueueing included), done while a kernel holds every SM;
//   d2d one copy 13-14 us (1200-1300), d2d batch / per-copy of 512 units 1940-2150 us (8 GB/s),
//   with or without the prefer-overlap flag, 1 or 4 streams: every d2d copy waits for the SMs,
//   i.e. the driver makes device-to-device copies with kernels (~4 us per copy), not with the
//   copy engines. This is why the staged_ce path (ring + cudaMemcpyBatchAsync device side) ran at
//   2-9 GB/s; it was removed.
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#if CUDART_VERSION < 13000
#error "written for CUDA 13's cudaMemcpyBatchAsync (12.8/12.9 take an extra failIdx argument)"
#endif

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); std::exit(1); } } while (0)

constexpr size_t kUnit = 32 << 10, kUnits = 512, kLayer = kUnit * kUnits, kSlots = 2 * 640;

__global__ void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}

struct Copies { std::vector<void*> dst; std::vector<const void*> src; std::vector<size_t> size; };

// Batched copies on `streams` streams, `per_call` copies per cudaMemcpyBatchAsync call.
void batch(const Copies& c, std::vector<cudaStream_t>& streams, size_t per_call, unsigned flags) {
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = flags;
  size_t idx = 0;
  const size_t per_stream = (c.size.size() + streams.size() - 1) / streams.size();
  for (size_t s = 0; s < streams.size(); ++s)
    for (size_t i = s * per_stream; i < std::min(c.size.size(), (s + 1) * per_stream); i += per_call) {
      const size_t n = std::min({per_call, c.size.size() - i, (s + 1) * per_stream - i});
      CK(cudaMemcpyBatchAsync(const_cast<void* const*>(c.dst.data() + i), c.src.data() + i,
                              const_cast<size_t*>(c.size.data() + i), n, &attr, &idx, 1, streams[s]));
    }
}

int main() {
  CK(cudaSetDevice(0));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  char *engine, *staging, *host;
  CK(cudaMalloc(&engine, kSlots * kUnit));
  CK(cudaMalloc(&staging, kLayer));
  CK(cudaHostAlloc(&host, kLayer, cudaHostAllocMapped));
  std::mt19937 rng(7);
  std::vector<size_t> slots(kSlots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  Copies h2d, d2d;
  for (size_t k = 0; k < kUnits; ++k) {
    h2d.dst.push_back(engine + slots[k] * kUnit); h2d.src.push_back(host + k * kUnit); h2d.size.push_back(kUnit);
    d2d.dst.push_back(engine + slots[k] * kUnit); d2d.src.push_back(staging + k * kUnit); d2d.size.push_back(kUnit);
  }
  std::vector<cudaStream_t> st(4);
  for (auto& s : st) CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaStream_t hog;
  CK(cudaStreamCreateWithFlags(&hog, cudaStreamNonBlocking));
  cudaEvent_t e0, e1, h1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1)); CK(cudaEventCreate(&h1));
  const unsigned prefer = cudaMemcpyFlagPreferOverlapWithCompute;

  auto one_h2d = [&](std::vector<cudaStream_t>& s) { CK(cudaMemcpyAsync(staging, host, kLayer, cudaMemcpyDefault, s[0])); };
  auto one_d2d = [&](std::vector<cudaStream_t>& s) { CK(cudaMemcpyAsync(engine, staging, kLayer, cudaMemcpyDefault, s[0])); };
  auto per_copy_d2d = [&](std::vector<cudaStream_t>& s) {
    for (size_t k = 0; k < kUnits; ++k) CK(cudaMemcpyAsync(d2d.dst[k], d2d.src[k], kUnit, cudaMemcpyDefault, s[0]));
  };
  struct Run { const char* name; int streams; std::function<void(std::vector<cudaStream_t>&)> go; };
  std::vector<Run> runs = {
      {"h2d one 16 MiB copy (ceiling)", 1, one_h2d},
      {"h2d batch 512x32KiB scattered, 1 stream, prefer-overlap, 128/call", 1,
       [&](auto& s) { batch(h2d, s, 128, prefer); }},
      {"h2d batch 512x32KiB scattered, 4 streams, prefer-overlap, 128/call", 4,
       [&](auto& s) { batch(h2d, s, 128, prefer); }},
      {"d2d one 16 MiB copy", 1, one_d2d},
      {"d2d per-copy cudaMemcpyAsync 512x32KiB", 1, per_copy_d2d},
      {"d2d batch 512x32KiB scattered, 1 stream, prefer-overlap, 128/call (staged_ce)", 1,
       [&](auto& s) { batch(d2d, s, 128, prefer); }},
      {"d2d batch, 1 stream, prefer-overlap, 512/call", 1, [&](auto& s) { batch(d2d, s, 512, prefer); }},
      {"d2d batch, 1 stream, no flag, 512/call", 1, [&](auto& s) { batch(d2d, s, 512, 0); }},
      {"d2d batch, 4 streams, prefer-overlap, 128/call", 4, [&](auto& s) { batch(d2d, s, 128, prefer); }},
  };
  printf("%s, %d SMs; %zu units of %zu KiB per layer (%.0f MiB)\n", prop.name, prop.multiProcessorCount, kUnits,
         kUnit >> 10, kLayer / 1048576.0);
  printf("%-80s %10s %8s %22s\n", "case", "us (med)", "GB/s", "done while SMs held?");
  const long long spin_cycles = 2000LL * 1000 * 5;  // ~5 ms at ~2 GHz
  for (auto& r : runs) {
    std::vector<cudaStream_t> s(st.begin(), st.begin() + r.streams);
    std::vector<float> t;
    for (int rep = 0; rep < 21; ++rep) {
      CK(cudaDeviceSynchronize());
      CK(cudaEventRecord(e0, s[0]));
      for (size_t i = 1; i < s.size(); ++i) CK(cudaStreamWaitEvent(s[i], e0, 0));
      r.go(s);
      for (size_t i = 1; i < s.size(); ++i) { CK(cudaEventRecord(h1, s[i])); CK(cudaStreamWaitEvent(s[0], h1, 0)); }
      CK(cudaEventRecord(e1, s[0]));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (rep) t.push_back(ms);  // the first is a warm-up
    }
    std::sort(t.begin(), t.end());
    const float med = t[t.size() / 2];
    // Again while a kernel holds every SM for ~5 ms: a copy made by SMs finishes only after it.
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(e0, hog));
    spin<<<prop.multiProcessorCount * 2, 1024, 0, hog>>>(spin_cycles);
    CK(cudaGetLastError());
    CK(cudaEventRecord(h1, hog));
    for (auto& x : s) CK(cudaStreamWaitEvent(x, e0, 0));
    r.go(s);
    for (size_t i = 1; i < s.size(); ++i) { cudaEvent_t j; CK(cudaEventCreate(&j)); CK(cudaEventRecord(j, s[i]));
                                            CK(cudaStreamWaitEvent(s[0], j, 0)); CK(cudaEventDestroy(j)); }
    CK(cudaEventRecord(e1, s[0]));
    CK(cudaDeviceSynchronize());
    float copy_ms = 0, hog_ms = 0;
    CK(cudaEventElapsedTime(&copy_ms, e0, e1));
    CK(cudaEventElapsedTime(&hog_ms, e0, h1));
    char held[64];
    snprintf(held, sizeof held, "%s (%.2f / %.2f ms)", copy_ms < 0.9f * hog_ms ? "yes" : "NO", copy_ms, hog_ms);
    printf("%-80s %10.1f %8.1f %22s\n", r.name, med * 1e3, kLayer / (med * 1e-3) / 1e9, held);
  }
  return 0;
}
