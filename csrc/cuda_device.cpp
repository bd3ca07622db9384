#include "cuda_device.h"

#include "errors.h"

#ifdef KVSTORE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvstore {

#ifdef KVSTORE_WITH_CUDA
bool built_with_cuda() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

bool cuda_host_register(void* ptr, size_t nbytes) {
  if (cuda_device_count() == 0) return false;
  cudaError_t rc = cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (rc != cudaSuccess) throw CudaFailure(std::string("cudaHostRegister: ") + cudaGetErrorString(rc));
  return true;
}

void cuda_host_unregister(void* ptr) { cudaHostUnregister(ptr); }

void require_gpu() {
  if (cuda_device_count() == 0) throw GpuUnavailable("no CUDA device or driver is available on this machine");
}
#else
bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_runtime_version() { return ""; }
bool cuda_host_register(void*, size_t) { return false; }
void cuda_host_unregister(void*) {}
void require_gpu() {
  throw GpuUnavailable("kvstore._C was built without CUDA (nvcc was not found at build time)");
}
#endif

}  // namespace kvstore
