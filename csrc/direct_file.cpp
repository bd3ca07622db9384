#include "direct_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "checksum.h"
#include "errors.h"
#include "thread_pool.h"

namespace kvstore {
namespace {
std::string errno_text(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}
}  // namespace

DirectFile::DirectFile(const std::string& path, bool direct) : path_(path), direct_(direct) {
  int flags = O_RDWR | O_CREAT | O_CLOEXEC | (direct ? O_DIRECT : 0);
  fd_ = ::open(path.c_str(), flags, 0644);
  if (fd_ < 0) throw IoError(errno_text(errno == EINVAL ? "O_DIRECT not supported by the filesystem of" : "cannot open", path));
}

DirectFile::~DirectFile() {
  if (fd_ >= 0) ::close(fd_);
}

int64_t DirectFile::size() const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw IoError(errno_text("fstat", path_));
  return st.st_size;
}

void DirectFile::reserve(int64_t nbytes) {
  if (nbytes <= size()) return;
  int rc = ::posix_fallocate(fd_, 0, nbytes);
  if (rc != 0) {
    errno = rc;
    throw IoError(errno_text("cannot preallocate " + std::to_string(nbytes) + " bytes in", path_));
  }
}

uint64_t DirectFile::transfer(int64_t offset, void* buf, int64_t payload, bool is_write) {
  KV_CHECK_ARG(offset % kDirectIoAlign == 0, "direct I/O offset must be 4 KiB aligned");
  KV_CHECK_ARG(reinterpret_cast<uintptr_t>(buf) % kDirectIoAlign == 0, "direct I/O buffer must be 4 KiB aligned");
  KV_CHECK_ARG(payload >= 0, "negative payload size");
  const int64_t io_bytes = align_up(payload, kDirectIoAlign);
  std::vector<uint64_t> digests(size_t(num_pieces(payload)));
  auto* bytes = static_cast<uint8_t*>(buf);
  io_pool()->parallel_for(int64_t(digests.size()), [&](int64_t i) {
    const int64_t off = i * kChecksumPieceBytes;
    const int64_t n = std::min(kChecksumPieceBytes, io_bytes - off);
    const int64_t hashed = std::max<int64_t>(0, std::min(kChecksumPieceBytes, payload - off));
    if (is_write) digests[size_t(i)] = piece_digest(bytes + off, hashed);
    for (int64_t done = 0; done < n;) {
      ssize_t rc = is_write ? ::pwrite(fd_, bytes + off + done, size_t(n - done), offset + off + done)
                            : ::pread(fd_, bytes + off + done, size_t(n - done), offset + off + done);
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0) throw IoError(errno_text(is_write ? "write to" : "read from", path_));
      if (rc == 0) throw IoError("short read from " + path_ + " at offset " + std::to_string(offset + off + done) + " (file truncated?)");
      done += rc;
    }
    if (!is_write) digests[size_t(i)] = piece_digest(bytes + off, hashed);
  });
  return combine_digests(digests);
}

uint64_t DirectFile::write(int64_t offset, const void* buf, int64_t payload) {
  return transfer(offset, const_cast<void*>(buf), payload, true);
}

uint64_t DirectFile::read(int64_t offset, void* buf, int64_t payload) { return transfer(offset, buf, payload, false); }

void DirectFile::sync() {
  if (::fdatasync(fd_) != 0) throw IoError(errno_text("fdatasync", path_));
}

}  // namespace kvstore
