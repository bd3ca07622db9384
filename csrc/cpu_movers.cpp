#include "cpu_movers.h"

#include <cstring>

#include "thread_pool.h"

namespace kvstore {
namespace {

// Copies one engine block of one (layer, plane) to/from its slice of an object, merging head
// rows into the longest contiguous runs the strides allow.
void move_block(const Layout& l, uint8_t* engine_block, uint8_t* obj, Direction dir) {
  const int64_t row = l.head_nbytes;
  const int64_t token_bytes = l.token_nbytes();
  const bool heads_contiguous = l.num_heads == 1 || l.head_stride == row;
  const bool tokens_contiguous = heads_contiguous && (l.block_size == 1 || l.token_stride == token_bytes);
  auto copy = [dir](uint8_t* engine, uint8_t* object, size_t n) {
    if (dir == Direction::kGather) std::memcpy(object, engine, n);
    else std::memcpy(engine, object, n);
  };
  if (tokens_contiguous) {
    copy(engine_block, obj, size_t(l.block_size) * token_bytes);
    return;
  }
  for (int t = 0; t < l.block_size; ++t) {
    uint8_t* eng_tok = engine_block + t * l.token_stride;
    uint8_t* obj_tok = obj + t * token_bytes;
    if (heads_contiguous) {
      copy(eng_tok, obj_tok, size_t(token_bytes));
      continue;
    }
    for (int h = 0; h < l.num_heads; ++h) copy(eng_tok + h * l.head_stride, obj_tok + h * row, size_t(row));
  }
}

}  // namespace

void cpu_move(const Layout& l, const ChunkBatch& b, Direction dir) {
  l.validate();
  b.validate(l);
  const int64_t chunk_tokens = b.chunk_tokens(l);
  const int64_t layer_bytes = l.layer_nbytes(chunk_tokens);
  const int64_t plane_bytes = chunk_tokens * l.token_nbytes();
  const int64_t block_obj_bytes = int64_t(l.block_size) * l.token_nbytes();
  const int64_t layers = b.layer_end - b.layer_begin;
  // One work item = one block of one plane of one layer of one chunk (tens of KiB for real models).
  const int64_t per_chunk = layers * l.num_planes * b.blocks_per_chunk;
  cpu_pool()->parallel_for(b.num_chunks * per_chunk, [&](int64_t item) {
    int64_t c = item / per_chunk, r = item % per_chunk;
    int64_t k = r % b.blocks_per_chunk;
    r /= b.blocks_per_chunk;
    int p = int(r % l.num_planes);
    int layer = b.layer_begin + int(r / l.num_planes);
    int64_t block = b.block_ids[c * b.blocks_per_chunk + k];
    if (block == kSkipBlock) return;
    auto* engine = reinterpret_cast<uint8_t*>(l.plane_ptr(layer, p)) + block * l.block_stride;
    auto* obj = reinterpret_cast<uint8_t*>(b.object_ptrs[c]) + layer * layer_bytes + p * plane_bytes +
                k * block_obj_bytes;
    move_block(l, engine, obj, dir);
  });
}

}  // namespace kvstore
