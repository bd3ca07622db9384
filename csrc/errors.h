// Typed errors thrown by the extension. bindings.cpp maps each to its kvstore.errors class,
// so Python callers catch the same KVStoreError subclasses whether a check failed in C++ or Python.
#pragma once
#include <stdexcept>
#include <string>

namespace kvstore {

struct InvalidArgument : std::runtime_error { using std::runtime_error::runtime_error; };
struct LayoutMismatch : std::runtime_error { using std::runtime_error::runtime_error; };
struct IoError : std::runtime_error { using std::runtime_error::runtime_error; };
struct GpuUnavailable : std::runtime_error { using std::runtime_error::runtime_error; };
struct CudaFailure : std::runtime_error { using std::runtime_error::runtime_error; };

#define KV_CHECK_ARG(cond, msg)                                                    \
  do {                                                                             \
    if (!(cond)) throw ::kvstore::InvalidArgument(std::string(msg));               \
  } while (0)

}  // namespace kvstore
