// A slab file read and written with O_DIRECT in 1 MiB requests spread over the io pool.
// Buffers must be 4 KiB aligned; the I/O length is the payload rounded up to 4 KiB, so the
// buffer must hold that many bytes (pool slots do). Every read and write returns the payload's
// checksum (checksum.h), computed by the workers as the pieces pass through.
#pragma once
#include <cstdint>
#include <string>

namespace kvstore {

constexpr int64_t kDirectIoAlign = 4096;
inline int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

class DirectFile {
 public:
  // direct=false opens without O_DIRECT (for filesystems such as tmpfs that refuse it).
  DirectFile(const std::string& path, bool direct);
  ~DirectFile();
  DirectFile(const DirectFile&) = delete;
  DirectFile& operator=(const DirectFile&) = delete;

  int64_t size() const;
  // Grows the file to at least nbytes with real blocks (fallocate), so writes never hit ENOSPC.
  void reserve(int64_t nbytes);
  uint64_t write(int64_t offset, const void* buf, int64_t payload_nbytes);
  // Throws IoError on a short read (truncated file).
  uint64_t read(int64_t offset, void* buf, int64_t payload_nbytes);
  // fdatasync: the bytes written so far are durable when this returns.
  void sync();
  bool direct() const { return direct_; }
  const std::string& path() const { return path_; }

 private:
  uint64_t transfer(int64_t offset, void* buf, int64_t payload_nbytes, bool is_write);
  std::string path_;
  int fd_ = -1;
  bool direct_;
};

}  // namespace kvstore
