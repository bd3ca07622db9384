// Object checksum: XXH3-64 over the list of XXH3-64 digests of each 1 MiB piece of the payload.
// The two-level form lets O_DIRECT workers hash their piece while it is hot in cache, in parallel.
#pragma once
#include <cstdint>
#include <vector>

namespace kvstore {

constexpr int64_t kChecksumPieceBytes = 1 << 20;

uint64_t piece_digest(const void* data, int64_t nbytes);
uint64_t combine_digests(const std::vector<uint64_t>& pieces);
// Whole-buffer checksum, pieces hashed on the cpu pool. Call without the GIL.
uint64_t checksum(const void* data, int64_t nbytes);

inline int64_t num_pieces(int64_t nbytes) {
  return nbytes == 0 ? 1 : (nbytes + kChecksumPieceBytes - 1) / kChecksumPieceBytes;
}

}  // namespace kvstore
