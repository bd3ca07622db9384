// Probe: which memory kinds and driver entry points cuStreamWaitValue32 / cuStreamWriteValue32
// accept (the gated layer-wise loads tried in run T, reverted, relied on the answer). On the GPU machine:
//   nvcc -gencode=arch=compute_90,code=sm_90 -o /tmp/p benchmarks/probes/memops_probe.cu && /tmp/p
// H100, driver 580.159.04, CUDA 13.0 (2026-11-26): cudaMalloc and mapped host memory work;
// cudaMallocAsync (pool) and managed memory get CUDA_ERROR_INVALID_VALUE (1) from both calls.
#include <cuda.h>
#include <cuda_runtime.h>
#include <chrono>
#include <cstdio>
#include <thread>
using Wait = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using Write = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using Attr = CUresult (*)(int*, CUdevice_attribute, CUdevice);
template <class F> F get(const char* name, unsigned ver) {
  void* fn = nullptr; cudaDriverEntryPointQueryResult q{};
  cudaError_t rc = cudaGetDriverEntryPointByVersion(name, &fn, ver, cudaEnableDefault, &q);
  printf("entry %s v%u: rc=%d q=%d fn=%p\n", name, ver, int(rc), int(q), fn);
  return reinterpret_cast<F>(fn);
}
int main() {
  cudaSetDevice(0);
  cudaFree(0);
  Attr attr = get<Attr>("cuDeviceGetAttribute", 12000);
  for (int a : {92, 93, 94, 122, 123}) { int v = -1; CUresult r = attr(&v, CUdevice_attribute(a), 0); printf("attr %d = %d (rc %d)\n", a, v, int(r)); }
  for (unsigned ver : {12000u, 13000u}) {
    Wait wait = get<Wait>("cuStreamWaitValue32", ver);
    Write write = get<Write>("cuStreamWriteValue32", ver);
    if (!wait || !write) continue;
    for (int kind = 0; kind < 4; ++kind) {
      cudaStream_t s1, s2; cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking); cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking);
      uint32_t* p = nullptr; void* host = nullptr; const char* what = "";
      if (kind == 0) { what = "cudaMalloc"; cudaMalloc(&p, 64); cudaMemset(p, 0, 64); }
      if (kind == 1) { what = "cudaMallocAsync"; cudaMallocAsync((void**)&p, 64, s2); cudaMemsetAsync(p, 0, 64, s2); cudaStreamSynchronize(s2); }
      if (kind == 2) { what = "cudaHostAlloc mapped"; cudaHostAlloc(&host, 64, cudaHostAllocMapped); *(volatile uint32_t*)host = 0; cudaHostGetDevicePointer((void**)&p, host, 0); }
      if (kind == 3) { what = "cudaMallocManaged"; cudaMallocManaged(&p, 64); cudaMemset(p, 0, 64); cudaDeviceSynchronize(); }
      cudaEvent_t ev; cudaEventCreate(&ev);
      CUresult rw = wait((CUstream)s1, (CUdeviceptr)p, 1, CU_STREAM_WAIT_VALUE_GEQ);
      cudaEventRecord(ev, s1);
      bool early = cudaEventQuery(ev) == cudaSuccess;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      bool before = cudaEventQuery(ev) == cudaSuccess;
      CUresult rr = write((CUstream)s2, (CUdeviceptr)p, 1, CU_STREAM_WRITE_VALUE_DEFAULT);
      bool after = false;
      for (int i = 0; i < 200 && !after; ++i) { after = cudaEventQuery(ev) == cudaSuccess; std::this_thread::sleep_for(std::chrono::milliseconds(1)); }
      printf("v%u %-22s wait rc=%d write rc=%d: done before write %d/%d, after write %d; last err %s\n", ver, what, int(rw), int(rr), early, before, after, cudaGetErrorString(cudaGetLastError()));
      if (!after && rw == CUDA_SUCCESS) { write((CUstream)s1, (CUdeviceptr)p, 1, 0); }
    }
  }
  cudaDeviceSynchronize();
  printf("final: %s\n", cudaGetErrorString(cudaGetLastError()));
}
