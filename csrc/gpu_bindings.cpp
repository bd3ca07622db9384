// GPU mover entry points of kvstore._C. Streams and events are integers (cudaStream_t /
// cudaEvent_t as uintptr; 0 is the legacy default stream). Built without CUDA, every entry point
// exists and raises GPUUnavailableError; built with CUDA on a machine with no device, likewise.
// Every call that enqueues or waits releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "cpu_movers.h"
#include "cuda_device.h"
#include "layout.h"

#ifdef KVSTORE_WITH_CUDA
#include "cuda/gpu_movers.h"
#endif

namespace py = pybind11;

namespace kvstore {
namespace {

using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using PtrArray = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

void check_batch_shape(const IdArray& ids, const PtrArray& objs, int64_t bpc) {
  KV_CHECK_ARG(bpc > 0, "blocks_per_chunk must be > 0");
  KV_CHECK_ARG(ids.ndim() == 1 && objs.ndim() == 1, "block_ids and object_ptrs must be 1-D");
  KV_CHECK_ARG(ids.size() == objs.size() * bpc,
               "block_ids must hold blocks_per_chunk ids per object (" + std::to_string(ids.size()) + " ids for " +
                   std::to_string(objs.size()) + " objects)");
}

#ifdef KVSTORE_WITH_CUDA
gpu::Options make_options(int path, int ctas, int threads, int64_t piece_bytes, int ring) {
  KV_CHECK_ARG(path == 0 || path == 1 || path == 2 || path == 4,
               "path must be 0 (auto), 1 (direct), 2 (staged) or 4 (dma); 3 (staged_ce) was removed");
  gpu::Options o;
  o.path = static_cast<gpu::Path>(path);
  o.ctas = ctas;
  o.threads = threads;
  o.piece_bytes = piece_bytes;
  o.ring = ring;
  return o;
}

struct PyPlan {
  std::unique_ptr<gpu::Plan> plan;
};
#endif

}  // namespace

void bind_gpu_movers(py::module_& m) {
  m.def("require_gpu", &require_gpu, "Raises GPUUnavailableError unless a CUDA device can be used.");
  m.attr("GPU_PATH_AUTO") = 0;
  m.attr("GPU_PATH_DIRECT") = 1;
  m.attr("GPU_PATH_STAGED") = 2;
  m.attr("GPU_PATH_DMA") = 4;

#ifdef KVSTORE_WITH_CUDA
  auto one_shot = [](Direction dir) {
    return [dir](const Layout& l, const IdArray& ids, const PtrArray& objs, int64_t bpc, int32_t lb, int32_t le,
                 uintptr_t stream, int path, int ctas, int threads, int64_t piece_bytes, int ring) {
      require_gpu();
      check_batch_shape(ids, objs, bpc);
      gpu::Options o = make_options(path, ctas, threads, piece_bytes, ring);
      ChunkBatch b{ids.data(), objs.data(), objs.size(), bpc, lb, le};
      py::gil_scoped_release nogil;
      return int(gpu::move(l, b, dir, stream, o));
    };
  };
#define KV_MOVE_ARGS                                                                                           \
  py::arg("layout"), py::arg("block_ids"), py::arg("object_ptrs"), py::arg("blocks_per_chunk"),               \
      py::arg("layer_begin"), py::arg("layer_end"), py::arg("stream") = 0, py::arg("path") = 0,               \
      py::arg("ctas") = 0, py::arg("threads") = 0, py::arg("piece_bytes") = 0, py::arg("ring") = 0
  m.def("gpu_gather", one_shot(Direction::kGather), KV_MOVE_ARGS,
        "Engine blocks on the GPU -> objects (pinned host or device memory), enqueued on `stream`. Returns the "
        "path used (1 direct, 2 staged, 4 dma).");
  m.def("gpu_scatter", one_shot(Direction::kScatter), KV_MOVE_ARGS,
        "Objects -> engine blocks on the GPU, enqueued on `stream`. Returns the path used.");
#undef KV_MOVE_ARGS

  py::class_<PyPlan>(m, "GpuPlan",
                     "Device-resident batch (block ids, object pointers) bound to one stream; run many launches "
                     "(e.g. one per layer) without re-uploading.")
      .def(py::init([](const Layout& l, const IdArray& ids, const PtrArray& objs, int64_t bpc, uintptr_t stream) {
             require_gpu();
             check_batch_shape(ids, objs, bpc);
             auto p = std::make_unique<PyPlan>();
             const int64_t* id = ids.data();
             const uint64_t* ob = objs.data();
             const int64_t n = objs.size();
             py::gil_scoped_release nogil;
             p->plan = std::make_unique<gpu::Plan>(l, id, ob, n, bpc, stream);
             return p;
           }),
           py::arg("layout"), py::arg("block_ids"), py::arg("object_ptrs"), py::arg("blocks_per_chunk"),
           py::arg("stream") = 0)
      .def("gather", [](PyPlan& p, int32_t lb, int32_t le, int path, int ctas, int threads, int64_t piece, int ring) {
             gpu::Options o = make_options(path, ctas, threads, piece, ring);
             py::gil_scoped_release nogil;
             return int(p.plan->run(Direction::kGather, lb, le, o));
           }, py::arg("layer_begin"), py::arg("layer_end"), py::arg("path") = 0, py::arg("ctas") = 0,
           py::arg("threads") = 0, py::arg("piece_bytes") = 0, py::arg("ring") = 0)
      .def("scatter", [](PyPlan& p, int32_t lb, int32_t le, int path, int ctas, int threads, int64_t piece, int ring) {
             gpu::Options o = make_options(path, ctas, threads, piece, ring);
             py::gil_scoped_release nogil;
             return int(p.plan->run(Direction::kScatter, lb, le, o));
           }, py::arg("layer_begin"), py::arg("layer_end"), py::arg("path") = 0, py::arg("ctas") = 0,
           py::arg("threads") = 0, py::arg("piece_bytes") = 0, py::arg("ring") = 0)
      .def("choose", [](PyPlan& p, bool gather, int32_t lb, int32_t le) {
             return int(p.plan->choose(gather ? Direction::kGather : Direction::kScatter, lb, le));
           }, py::arg("gather"), py::arg("layer_begin"), py::arg("layer_end"))
      .def("nbytes", [](PyPlan& p, int32_t lb, int32_t le) { return p.plan->bytes(lb, le); })
      .def("dma_segment_bytes", [](PyPlan& p) { return p.plan->dma_segment_bytes(); },
           "Mean bytes of one DMA-path segment (0: the layout's units are not contiguous).")
      .def_property_readonly("stream", [](PyPlan& p) { return p.plan->stream(); })
      .def_property_readonly("device", [](PyPlan& p) { return p.plan->device(); })
      .def_property_readonly("num_chunks", [](PyPlan& p) { return p.plan->num_chunks(); })
      .def("close", [](PyPlan& p) {
             py::gil_scoped_release nogil;
             p.plan.reset();
           }, "Returns the plan's device memory to the pool, stream-ordered after its work.");

  m.def("cuda_memcpy_async", [](uint64_t dst, uint64_t src, int64_t n, uintptr_t stream) {
    require_gpu();
    py::gil_scoped_release nogil;
    gpu::memcpy_async(dst, src, n, stream);
  }, py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream") = 0);
  m.def("cuda_memcpy_segments", [](const PtrArray& dsts, const PtrArray& srcs, const IdArray& sizes, uintptr_t stream,
                                   bool batched) {
    require_gpu();
    std::vector<uint64_t> d(dsts.data(), dsts.data() + dsts.size()), s(srcs.data(), srcs.data() + srcs.size());
    std::vector<int64_t> z(sizes.data(), sizes.data() + sizes.size());
    py::gil_scoped_release nogil;
    gpu::memcpy_segments(d, s, z, stream, batched);
  }, py::arg("dsts"), py::arg("srcs"), py::arg("sizes"), py::arg("stream") = 0, py::arg("batched") = false,
        "One cudaMemcpyAsync per segment, or cudaMemcpyBatchAsync (CUDA >= 12.8) when batched.");
  m.def("cuda_batch_memcpy_supported", &gpu::batch_memcpy_supported);
  m.def("cuda_stream_create", [](int device, int priority) {
    require_gpu();
    return gpu::stream_create(device, priority);
  }, py::arg("device") = 0, py::arg("priority") = 0);
  m.def("cuda_stream_destroy", [](uintptr_t s) { require_gpu(); gpu::stream_destroy(s); }, py::arg("stream"));
  m.def("cuda_stream_synchronize", [](uintptr_t s) {
    require_gpu();
    py::gil_scoped_release nogil;
    gpu::stream_synchronize(s);
  }, py::arg("stream"));
  m.def("cuda_event_create", [](int device, bool timing) {
    require_gpu();
    return timing ? gpu::event_create_timed(device) : gpu::event_create(device);
  }, py::arg("device") = 0, py::arg("timing") = false);
  m.def("cuda_event_destroy", [](uintptr_t e) { require_gpu(); gpu::event_destroy(e); }, py::arg("event"));
  m.def("cuda_event_record", [](uintptr_t e, uintptr_t s) { require_gpu(); gpu::event_record(e, s); },
        py::arg("event"), py::arg("stream"));
  m.def("cuda_stream_wait_event", [](uintptr_t s, uintptr_t e) { require_gpu(); gpu::stream_wait_event(s, e); },
        py::arg("stream"), py::arg("event"),
        "The stream waits on the event's last record; no host synchronisation. Inside CUDA-graph capture it "
        "becomes an external-event wait node: every replay waits on the event's last record at that time.");
  m.def("cuda_stream_is_capturing", [](uintptr_t s) { require_gpu(); return gpu::stream_is_capturing(s); },
        py::arg("stream"));
  m.def("cuda_event_synchronize", [](uintptr_t e) {
    require_gpu();
    py::gil_scoped_release nogil;
    gpu::event_synchronize(e);
  }, py::arg("event"));
  m.def("cuda_event_query", [](uintptr_t e) { require_gpu(); return gpu::event_query(e); }, py::arg("event"));
  m.def("cuda_event_elapsed_ms", [](uintptr_t a, uintptr_t b) { require_gpu(); return gpu::event_elapsed_ms(a, b); },
        py::arg("start"), py::arg("stop"));
  m.def("cuda_device_info", [](int device) {
    require_gpu();
    gpu::DeviceInfo d = gpu::device_info(device);
    py::dict r;
    r["device"] = d.device;
    r["name"] = d.name;
    r["sm_count"] = d.sm_count;
    r["total_mem"] = d.total_mem;
    r["runtime_version"] = d.runtime_version;
    r["driver_version"] = d.driver_version;
    return r;
  }, py::arg("device") = 0);
#else
  // CPU-only build: the same names, each raising GPUUnavailableError.
  auto unavailable = [](py::args, py::kwargs) -> py::object {
    require_gpu();  // always throws GpuUnavailable in a build without CUDA
    return py::none();
  };
  for (const char* name : {"gpu_gather", "gpu_scatter", "GpuPlan", "cuda_memcpy_async", "cuda_memcpy_segments",
                           "cuda_stream_create", "cuda_stream_destroy", "cuda_stream_synchronize",
                           "cuda_event_create", "cuda_event_destroy", "cuda_event_record", "cuda_stream_wait_event",
                           "cuda_stream_is_capturing",
                           "cuda_event_synchronize", "cuda_event_query", "cuda_event_elapsed_ms",
                           "cuda_device_info"})
    m.def(name, unavailable);
  m.def("cuda_batch_memcpy_supported", []() { return false; });
  (void)check_batch_shape;
#endif
}

}  // namespace kvstore
