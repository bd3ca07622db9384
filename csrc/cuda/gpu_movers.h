// GPU movers: engine paged KV blocks on the GPU <-> layer-major objects (pinned host memory
// mapped through UVA, or device memory). Host-side API only; no CUDA types leak out of here
// (streams and events travel as uintptr_t), so gpu_bindings.cpp compiles with any C++ compiler.
//
// Two paths, one kernel family (csrc/cuda/gpu_movers.cu), driven only by Layout + ChunkBatch:
//   direct  the kernel reads/writes the object slots in pinned host memory zero-copy over PCIe.
//   staged  objects (or their layer slices, each contiguous) are DMA'd to/from a small ring of
//           device staging buffers on an auxiliary stream, and the kernel moves between the ring
//           and the engine blocks at HBM speed with few CTAs; DMA and kernel overlap piece by piece.
// Every launch of a call is enqueued on the caller's stream (the staged path's DMA runs on a
// private stream joined back with events), so completion = the stream reaching that point.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../cpu_movers.h"
#include "../layout.h"

namespace kvstore {
namespace gpu {

// kDMA: no kernel at all: batched DMA (cudaMemcpyBatchAsync) straight between each engine unit
// and its place in the object, consecutive block ids merged into one segment, spread over a few
// streams; only where one (layer, plane, block) unit is contiguous in the engine cache
// (FlashAttention [2,B,N,H,D], MLA [B,N,D], vLLM [B,N,H,C]); elsewhere it runs as kStaged.
// Uses no SMs; fast when segments are big (block ids in runs), ~0.9x the ceiling on scattered
// 32 KiB units and poor on smaller ones (measured: results/gpu_H100-80GB-HBM3.md).
//
// 3 was kStagedCE, the staged ring with its device-side move made by cudaMemcpyBatchAsync instead
// of the kernel, meant to use no SMs. Removed: the driver makes every device-to-device copy with a
// kernel (~4 us per 32 KiB copy, 8 GB/s, and it waits while another kernel holds the SMs; probe
// benchmarks/probes/ce_copy_probe.cu), so it used SMs anyway at a tenth of the kernel's speed.
enum class Path : int { kAuto = 0, kDirect = 1, kStaged = 2, kDMA = 4 };

struct Options {
  Path path = Path::kAuto;
  int ctas = 0;             // CTAs of the copy kernel; 0 = the measured default of the path
  int threads = 0;          // threads per CTA; 0 = default (512)
  int64_t piece_bytes = 0;  // staged path: bytes per DMA piece; 0 = default
  int ring = 0;             // staged path: pieces in flight; 0 = default
};

struct DeviceInfo {
  int device = 0;
  std::string name;
  int sm_count = 0;
  int64_t total_mem = 0;
  int runtime_version = 0;
  int driver_version = 0;
};

// The device-resident description of one batch of chunks: layout plane pointers, block ids and
// object pointers uploaded once (stream-ordered) so that many launches (one per layer for
// layer-wise transfers) reuse them. Bound to one stream; all its work is enqueued there.
class Plan {
 public:
  Plan(const Layout& layout, const int64_t* block_ids, const uint64_t* object_ptrs, int64_t num_chunks,
       int64_t blocks_per_chunk, uintptr_t stream);
  ~Plan();
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  // Enqueues the move of layers [layer_begin, layer_end) of every chunk; returns the path used.
  Path run(Direction dir, int32_t layer_begin, int32_t layer_end, const Options& opt);
  // The path kAuto resolves to for this direction and layer range.
  Path choose(Direction dir, int32_t layer_begin, int32_t layer_end) const;
  // Mean bytes of one kDMA segment (engine units merged across consecutive block ids); 0 when
  // the layout's units are not contiguous (no kDMA).
  int64_t dma_segment_bytes() const;

  uintptr_t stream() const { return stream_; }
  int device() const { return device_; }
  int64_t num_chunks() const { return num_chunks_; }
  int64_t bytes(int32_t layer_begin, int32_t layer_end) const;

 private:
  void run_dma(bool gather, int32_t layer_begin, int32_t layer_end);

  struct Impl;
  std::unique_ptr<Impl> impl_;
  uintptr_t stream_ = 0;
  int device_ = 0;
  int64_t num_chunks_ = 0;
};

// One-shot: builds a Plan on `stream`, enqueues the move and lets the plan's memory go back to
// the stream-ordered pool after the work (no host synchronisation).
Path move(const Layout& layout, const ChunkBatch& batch, Direction dir, uintptr_t stream, const Options& opt);

// Copies helpers (benchmarks' baselines and the batched-DMA primitive).
void memcpy_async(uint64_t dst, uint64_t src, int64_t nbytes, uintptr_t stream);
// One cudaMemcpyAsync per segment (batched=false) or cudaMemcpyBatchAsync (batched=true, CUDA>=12.8).
void memcpy_segments(const std::vector<uint64_t>& dsts, const std::vector<uint64_t>& srcs,
                     const std::vector<int64_t>& sizes, uintptr_t stream, bool batched);

// Streams and events as integers.
uintptr_t stream_create(int device, int priority);
void stream_destroy(uintptr_t s);
void stream_synchronize(uintptr_t s);
uintptr_t event_create(int device);
void event_destroy(uintptr_t e);
void event_record(uintptr_t e, uintptr_t s);
// Inside CUDA-graph capture the wait is an external-event node (each replay waits on the event's
// last record at replay time); outside, an ordinary stream wait.
void stream_wait_event(uintptr_t s, uintptr_t e);
bool stream_is_capturing(uintptr_t s);
void event_synchronize(uintptr_t e);
bool event_query(uintptr_t e);
float event_elapsed_ms(uintptr_t start, uintptr_t stop);  // events made with timing (event_create_timed)
uintptr_t event_create_timed(int device);
DeviceInfo device_info(int device);
bool batch_memcpy_supported();

}  // namespace gpu
}  // namespace kvstore
