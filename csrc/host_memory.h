// Page-aligned anonymous host memory, page-locked and device-mapped when a CUDA device exists.
// Pinning happens once per allocation (slabs are large), never on a hot path.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvstore {

struct HostAllocation {
  void* ptr = nullptr;
  size_t nbytes = 0;
  bool pinned = false;
};

// pin=true pins when a device is present and silently stays pageable otherwise.
HostAllocation host_alloc(size_t nbytes, bool pin);
void host_free(const HostAllocation& a);

}  // namespace kvstore
