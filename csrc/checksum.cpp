#include "checksum.h"

#include <algorithm>

#include "thread_pool.h"

#define XXH_INLINE_ALL
#include "third_party/xxhash/xxhash.h"

namespace kvstore {

uint64_t piece_digest(const void* data, int64_t nbytes) { return XXH3_64bits(data, size_t(nbytes)); }

uint64_t combine_digests(const std::vector<uint64_t>& pieces) {
  return XXH3_64bits(pieces.data(), pieces.size() * sizeof(uint64_t));
}

uint64_t checksum(const void* data, int64_t nbytes) {
  std::vector<uint64_t> pieces(size_t(num_pieces(nbytes)));
  const auto* bytes = static_cast<const uint8_t*>(data);
  cpu_pool()->parallel_for(int64_t(pieces.size()), [&](int64_t i) {
    int64_t off = i * kChecksumPieceBytes;
    pieces[size_t(i)] = piece_digest(bytes + off, std::min(kChecksumPieceBytes, nbytes - off));
  });
  return combine_digests(pieces);
}

}  // namespace kvstore
