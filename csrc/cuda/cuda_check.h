// KV_CUDA(call): a CUDA runtime call whose failure becomes kvstore::CudaFailure naming the call.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "../errors.h"

#define KV_CUDA(call)                                                                              \
  do {                                                                                             \
    cudaError_t kv_rc_ = (call);                                                                   \
    if (kv_rc_ != cudaSuccess)                                                                     \
      throw ::kvstore::CudaFailure(std::string(#call) + ": " + cudaGetErrorString(kv_rc_));        \
  } while (0)
