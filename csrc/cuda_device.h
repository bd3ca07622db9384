// The few CUDA runtime calls the host side needs. Built against the CUDA runtime when nvcc is
// found (KVSTORE_WITH_CUDA), as stubs otherwise; either way nothing fails at import time on a
// machine with no GPU or driver: device_count() is then 0.
#pragma once
#include <cstddef>
#include <string>

namespace kvstore {

bool built_with_cuda();
int cuda_device_count();
std::string cuda_runtime_version();
// Page-locks an existing host range for DMA and maps it for device access (UVA: same address).
// Returns false, touching nothing, when no device is present.
bool cuda_host_register(void* ptr, size_t nbytes);
void cuda_host_unregister(void* ptr);
// Throws GpuUnavailable naming what is missing when no device can be used.
void require_gpu();

}  // namespace kvstore
