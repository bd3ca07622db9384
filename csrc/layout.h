// The stride descriptor of an engine's paged KV cache, shared by the CPU and GPU movers.
//
// Address of one head row (head_nbytes contiguous bytes) of layer l, plane p (K=0, V=1; MLA has
// one plane), block b, token t, head h:
//     plane_ptrs[l * num_planes + p] + b * block_stride + t * token_stride + h * head_stride
//
// Stored object format (DESIGN.md §2), layer-major so one layer is one contiguous slice:
//     [layer][plane][token in chunk][head][head_nbytes]
// A chunk is blocks_per_chunk consecutive engine blocks given by the caller's block-id list.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "errors.h"

namespace kvstore {

struct Layout {
  std::vector<uint64_t> plane_ptrs;  // num_layers * num_planes base addresses
  int32_t num_layers = 0;
  int32_t num_planes = 0;  // 2 for K/V, 1 for MLA
  int32_t num_heads = 0;
  int32_t block_size = 0;  // tokens per engine block
  int64_t num_blocks = 0;
  int64_t head_nbytes = 0;
  int64_t block_stride = 0;  // bytes
  int64_t token_stride = 0;  // bytes
  int64_t head_stride = 0;   // bytes

  int64_t token_nbytes() const { return int64_t(num_heads) * head_nbytes; }
  int64_t layer_nbytes(int64_t chunk_tokens) const {
    return int64_t(num_planes) * chunk_tokens * token_nbytes();
  }
  int64_t object_nbytes(int64_t chunk_tokens) const { return num_layers * layer_nbytes(chunk_tokens); }
  uint64_t plane_ptr(int layer, int plane) const { return plane_ptrs[size_t(layer) * num_planes + plane]; }

  // Throws InvalidArgument naming the first inconsistent field.
  void validate() const {
    KV_CHECK_ARG(num_layers > 0 && num_planes >= 1 && num_planes <= 2, "layout: bad layer/plane count");
    KV_CHECK_ARG(num_heads > 0 && block_size > 0 && num_blocks > 0, "layout: heads, block_size and num_blocks must be > 0");
    KV_CHECK_ARG(head_nbytes > 0, "layout: head_nbytes must be > 0");
    KV_CHECK_ARG(plane_ptrs.size() == size_t(num_layers) * num_planes, "layout: plane_ptrs size != layers*planes");
    for (uint64_t p : plane_ptrs) KV_CHECK_ARG(p != 0, "layout: null plane pointer");
  }
};

// A block id of kSkipBlock leaves that block alone: a load into a chunk whose first blocks the
// engine already holds (a GPU prefix hit ending mid-chunk) must not rewrite blocks in use.
// Loads only: the GPU movers refuse it in a save.
constexpr int64_t kSkipBlock = -1;

// One batch of chunks to move: chunk c covers block_ids[c*blocks_per_chunk ... +blocks_per_chunk)
// and lives in the object at object_ptrs[c]. Only layers [layer_begin, layer_end) are moved.
struct ChunkBatch {
  const int64_t* block_ids = nullptr;
  const uint64_t* object_ptrs = nullptr;
  int64_t num_chunks = 0;
  int64_t blocks_per_chunk = 0;
  int32_t layer_begin = 0;
  int32_t layer_end = 0;

  int64_t chunk_tokens(const Layout& l) const { return blocks_per_chunk * l.block_size; }

  void validate(const Layout& l) const {
    KV_CHECK_ARG(num_chunks >= 0 && blocks_per_chunk > 0, "batch: blocks_per_chunk must be > 0");
    KV_CHECK_ARG(0 <= layer_begin && layer_begin < layer_end && layer_end <= l.num_layers,
                 "batch: layer range out of bounds");
    for (int64_t i = 0; i < num_chunks * blocks_per_chunk; ++i)
      if (block_ids[i] != kSkipBlock && (block_ids[i] < 0 || block_ids[i] >= l.num_blocks))
        throw InvalidArgument("batch: block id " + std::to_string(block_ids[i]) + " out of range [0, " +
                              std::to_string(l.num_blocks) + ")");
    for (int64_t c = 0; c < num_chunks; ++c) KV_CHECK_ARG(object_ptrs[c] != 0, "batch: null object pointer");
  }
};

}  // namespace kvstore
