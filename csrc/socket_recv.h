// Receiving one object from a socket while hashing it: each 1 MiB piece of checksum.h's two-level
// XXH3 is digested right after it has arrived, while it is still in cache, so verifying a remote
// fetch costs little on top of the copy out of the kernel (hashing the whole object afterwards
// re-reads it from memory).
#pragma once
#include <cstdint>

namespace kvstore {

// Receives exactly nbytes from the connected socket fd into dst and returns checksum(dst, nbytes).
// Waits at most timeout_s in all; throws IoError on timeout, on a connection closed early and on
// a socket error (what was received is then undefined). Call without the GIL.
uint64_t recv_checksummed(int fd, void* dst, int64_t nbytes, double timeout_s);

}  // namespace kvstore
