// CPU reference movers: engine blocks <-> layer-major stored objects, by the Layout strides.
// These define correctness for the GPU kernels and serve CPU-only engines. Both run on the
// process cpu pool and must be called without the GIL.
#pragma once
#include "layout.h"

namespace kvstore {

enum class Direction { kGather, kScatter };  // gather: engine -> object; scatter: object -> engine

void cpu_move(const Layout& layout, const ChunkBatch& batch, Direction dir);

}  // namespace kvstore
