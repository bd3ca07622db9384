// Receiving one object from a socket while hashing it: each 1 MiB piece of checksum.h's two-level
// XXH3 is digested right after it has arrived, while it is still in cache, so verifying a remote
// fetch costs little on top of the copy out of the kernel (hashing the whole object afterwards
// re-reads it from memory).
#pragma once
#include <cstdint>
#include <string>

namespace kvstore {

// Receives exactly nbytes from the connected socket fd into dst and returns checksum(dst, nbytes).
// Waits at most timeout_s in all; throws IoError on timeout, on a connection closed early and on
// a socket error (what was received is then undefined). Call without the GIL.
uint64_t recv_checksummed(int fd, void* dst, int64_t nbytes, double timeout_s);

// Receives `count` objects of nbytes each, back to back, into dsts[i], and stores each one's
// checksum in checksums[i]. Returns how many arrived whole; when that is fewer than count,
// *error says why (timeout, connection closed, socket error). One deadline for all of them.
int64_t recv_objects_checksummed(int fd, const uint64_t* dsts, int64_t count, int64_t nbytes, double timeout_s,
                                 uint64_t* checksums, std::string* error);

}  // namespace kvstore
