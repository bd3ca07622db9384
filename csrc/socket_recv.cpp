#include "socket_recv.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include "checksum.h"
#include "errors.h"

namespace kvstore {

uint64_t recv_checksummed(int fd, void* dst, int64_t nbytes, double timeout_s) {
  KV_CHECK_ARG(fd >= 0 && nbytes >= 0 && (nbytes == 0 || dst != nullptr) && timeout_s >= 0,
               "recv_checksummed: bad arguments");
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_s));
  auto* p = static_cast<uint8_t*>(dst);
  std::vector<uint64_t> digests;
  digests.reserve(size_t(num_pieces(nbytes)));
  int64_t got = 0, hashed = 0;
  auto progress = [&] { return std::to_string(got) + " of " + std::to_string(nbytes) + " bytes"; };
  while (got < nbytes) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
    if (left <= 0) throw IoError("remote fetch timed out after " + progress());
    pollfd pfd{fd, POLLIN, 0};
    const int ready = ::poll(&pfd, 1, int(std::min<long long>(left, INT_MAX)));
    if (ready < 0) {
      if (errno == EINTR) continue;
      throw IoError(std::string("poll: ") + std::strerror(errno));
    }
    if (ready == 0) continue;  // the deadline check above ends the loop
    const ssize_t n = ::recv(fd, p + got, size_t(nbytes - got), MSG_DONTWAIT);
    if (n == 0) throw IoError("connection closed by the source after " + progress());
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
      throw IoError(std::string("recv: ") + std::strerror(errno) + " after " + progress());
    }
    got += n;
    while (got - hashed >= kChecksumPieceBytes || (got == nbytes && hashed < nbytes)) {
      const int64_t len = std::min(kChecksumPieceBytes, nbytes - hashed);
      digests.push_back(piece_digest(p + hashed, len));
      hashed += len;
    }
  }
  if (nbytes == 0) digests.push_back(piece_digest(p, 0));
  return combine_digests(digests);
}

int64_t recv_objects_checksummed(int fd, const uint64_t* dsts, int64_t count, int64_t nbytes, double timeout_s,
                                 uint64_t* checksums, std::string* error) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (int64_t i = 0; i < count; ++i) {
    const double left = timeout_s - std::chrono::duration<double>(clock::now() - start).count();
    try {
      checksums[i] = recv_checksummed(fd, reinterpret_cast<void*>(dsts[i]), nbytes, std::max(0.0, left));
    } catch (const IoError& e) {
      *error = e.what();
      return i;
    }
  }
  return count;
}

}  // namespace kvstore
