#include "host_memory.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "cuda_device.h"
#include "errors.h"

namespace kvstore {

HostAllocation host_alloc(size_t nbytes, bool pin) {
  KV_CHECK_ARG(nbytes > 0, "host_alloc: nbytes must be > 0");
  void* p = ::mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) throw IoError("mmap of " + std::to_string(nbytes) + " bytes failed: " + std::strerror(errno));
  // MAP_POPULATE faults the pages in now: slabs are allocated once, off the copy path.
  HostAllocation a{p, nbytes, false};
  if (pin) {
    try {
      a.pinned = cuda_host_register(p, nbytes);
    } catch (...) {
      ::munmap(p, nbytes);
      throw;
    }
  }
  return a;
}

void host_free(const HostAllocation& a) {
  if (!a.ptr) return;
  if (a.pinned) cuda_host_unregister(a.ptr);
  ::munmap(a.ptr, a.nbytes);
}

}  // namespace kvstore
