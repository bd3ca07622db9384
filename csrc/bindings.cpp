// Python bindings of kvstore._C: definitions only. Every entry point that touches memory
// releases the GIL; every C++ error becomes its kvstore.errors class.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "checksum.h"
#include "socket_recv.h"
#include "cpu_movers.h"
#include "cuda_device.h"
#include "direct_file.h"
#include "host_memory.h"
#include "layout.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace kvstore;

namespace kvstore {
void bind_gpu_movers(py::module_& m);     // gpu_bindings.cpp
void bind_master_index(py::module_& m);  // master_index_bindings.cpp
}

namespace {

using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using PtrArray = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

[[noreturn]] void raise_as(const char* cls, const char* what) {
  py::object err = py::module_::import("kvstore.errors").attr(cls);
  PyErr_SetString(err.ptr(), what);
  throw py::error_already_set();
}

void move(const Layout& layout, const IdArray& block_ids, const PtrArray& object_ptrs, int64_t blocks_per_chunk,
          int32_t layer_begin, int32_t layer_end, Direction dir) {
  KV_CHECK_ARG(blocks_per_chunk > 0, "blocks_per_chunk must be > 0");
  KV_CHECK_ARG(block_ids.size() == object_ptrs.size() * blocks_per_chunk,
               "block_ids must hold blocks_per_chunk ids per object (" + std::to_string(block_ids.size()) +
                   " ids for " + std::to_string(object_ptrs.size()) + " objects)");
  ChunkBatch b{block_ids.data(), object_ptrs.data(), object_ptrs.size(), blocks_per_chunk, layer_begin, layer_end};
  py::gil_scoped_release nogil;
  cpu_move(layout, b, dir);
}

py::buffer_info writable_bytes(const py::buffer& buf, int64_t need) {
  py::buffer_info info = buf.request(true);
  KV_CHECK_ARG(info.ndim == 1 && info.itemsize == 1 && info.strides[0] == 1, "buffer must be 1-D contiguous bytes");
  KV_CHECK_ARG(info.size >= need, "buffer holds " + std::to_string(info.size) + " bytes, needs " + std::to_string(need));
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvstore native core: layouts, CPU movers, pinned memory, O_DIRECT slab files, checksums, master index";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      raise_as("InvalidArgumentError", e.what());
    } catch (const LayoutMismatch& e) {
      raise_as("LayoutError", e.what());
    } catch (const IoError& e) {
      raise_as("TierIOError", e.what());
    } catch (const GpuUnavailable& e) {
      raise_as("GPUUnavailableError", e.what());
    } catch (const CudaFailure& e) {
      raise_as("CudaError", e.what());
    }
  });

  py::class_<Layout>(m, "Layout")
      .def(py::init([](std::vector<uint64_t> plane_ptrs, int32_t num_layers, int32_t num_planes, int32_t num_heads,
                       int32_t block_size, int64_t num_blocks, int64_t head_nbytes, int64_t block_stride,
                       int64_t token_stride, int64_t head_stride) {
             Layout l{std::move(plane_ptrs), num_layers, num_planes,  num_heads,    block_size,
                      num_blocks,            head_nbytes, block_stride, token_stride, head_stride};
             l.validate();
             return l;
           }),
           py::kw_only(), py::arg("plane_ptrs"), py::arg("num_layers"), py::arg("num_planes"), py::arg("num_heads"),
           py::arg("block_size"), py::arg("num_blocks"), py::arg("head_nbytes"), py::arg("block_stride"),
           py::arg("token_stride"), py::arg("head_stride"))
      .def("object_nbytes", &Layout::object_nbytes, py::arg("chunk_tokens"))
      .def("layer_nbytes", &Layout::layer_nbytes, py::arg("chunk_tokens"));

  m.def("gather", [](const Layout& l, const IdArray& ids, const PtrArray& objs, int64_t bpc, int32_t lb, int32_t le) {
    move(l, ids, objs, bpc, lb, le, Direction::kGather);
  }, py::arg("layout"), py::arg("block_ids"), py::arg("object_ptrs"), py::arg("blocks_per_chunk"),
        py::arg("layer_begin"), py::arg("layer_end"), "Engine blocks -> stored objects (CPU reference mover).");
  m.def("scatter", [](const Layout& l, const IdArray& ids, const PtrArray& objs, int64_t bpc, int32_t lb, int32_t le) {
    move(l, ids, objs, bpc, lb, le, Direction::kScatter);
  }, py::arg("layout"), py::arg("block_ids"), py::arg("object_ptrs"), py::arg("blocks_per_chunk"),
        py::arg("layer_begin"), py::arg("layer_end"), "Stored objects -> engine blocks (CPU reference mover).");

  m.def("checksum", [](const py::buffer& buf, int64_t nbytes) {
    py::buffer_info info = buf.request();
    KV_CHECK_ARG(nbytes >= 0 && nbytes <= info.size * info.itemsize, "checksum: nbytes exceeds the buffer");
    const void* p = info.ptr;
    py::gil_scoped_release nogil;
    return checksum(p, nbytes);
  }, py::arg("buffer"), py::arg("nbytes"));
  m.def("recv_checksummed", [](int fd, const py::buffer& buf, int64_t nbytes, double timeout_s) {
    py::buffer_info info = buf.request(true);  // BufferError for a read-only buffer
    KV_CHECK_ARG(nbytes >= 0 && nbytes <= info.size * info.itemsize, "recv_checksummed: nbytes exceeds the buffer");
    void* p = info.ptr;
    py::gil_scoped_release nogil;
    return recv_checksummed(fd, p, nbytes, timeout_s);
  }, py::arg("fd"), py::arg("buffer"), py::arg("nbytes"), py::arg("timeout_s"),
        "Receives exactly nbytes from socket fd into buffer, hashing each piece as it arrives; returns "
        "checksum(buffer, nbytes). TierIOError on timeout, early close or socket error.");
  m.def("recv_objects_checksummed", [](int fd, const PtrArray& dsts, int64_t nbytes, double timeout_s) {
    KV_CHECK_ARG(fd >= 0 && nbytes > 0 && timeout_s >= 0, "recv_objects_checksummed: bad arguments");
    for (py::ssize_t i = 0; i < dsts.size(); ++i) KV_CHECK_ARG(dsts.at(i) != 0, "recv_objects_checksummed: null pointer");
    py::array_t<uint64_t> sums(dsts.size());
    uint64_t* out = sums.mutable_data();
    const uint64_t* d = dsts.data();
    const int64_t n = dsts.size();
    std::string error;
    int64_t done;
    {
      py::gil_scoped_release nogil;
      done = recv_objects_checksummed(fd, d, n, nbytes, timeout_s, out, &error);
    }
    return py::make_tuple(done, sums, error);
  }, py::arg("fd"), py::arg("dsts"), py::arg("nbytes"), py::arg("timeout_s"),
        "Receives len(dsts) objects of nbytes back to back into the memory at dsts (uint64 addresses the "
        "caller keeps alive, each >= nbytes), hashing each piece as it arrives. Returns (received whole, "
        "checksums, why it stopped early or '').");

  m.def("host_alloc", [](size_t nbytes, bool pin) {
    HostAllocation a;
    {
      py::gil_scoped_release nogil;
      a = host_alloc(nbytes, pin);
    }
    auto* owned = new HostAllocation(a);
    py::capsule owner(owned, [](void* p) {
      auto* alloc = static_cast<HostAllocation*>(p);
      host_free(*alloc);
      delete alloc;
    });
    py::array_t<uint8_t> arr({py::ssize_t(nbytes)}, {py::ssize_t(1)}, static_cast<uint8_t*>(a.ptr), owner);
    return py::make_tuple(arr, a.pinned);
  }, py::arg("nbytes"), py::arg("pin"),
        "Returns (uint8 array owning page-aligned memory, pinned: bool). The memory is freed with the array.");

  m.def("host_register", [](uint64_t ptr, size_t nbytes) {
    KV_CHECK_ARG(ptr != 0 && nbytes > 0, "host_register: need a non-null range");
    py::gil_scoped_release nogil;
    return cuda_host_register(reinterpret_cast<void*>(ptr), nbytes);
  }, py::arg("ptr"), py::arg("nbytes"),
        "Page-locks and device-maps an existing host range (e.g. a shared-memory pool mapped from the agent); "
        "False, touching nothing, where no CUDA device is present.");
  m.def("host_unregister", [](uint64_t ptr) {
    py::gil_scoped_release nogil;
    cuda_host_unregister(reinterpret_cast<void*>(ptr));
  }, py::arg("ptr"), "Undoes host_register (call before unmapping the range).");

  py::class_<DirectFile>(m, "DirectFile")
      .def(py::init<const std::string&, bool>(), py::arg("path"), py::arg("direct"))
      .def_property_readonly("size", &DirectFile::size)
      .def_property_readonly("direct", &DirectFile::direct)
      .def("reserve", [](DirectFile& f, int64_t n) { py::gil_scoped_release g; f.reserve(n); }, py::arg("nbytes"))
      .def("write", [](DirectFile& f, int64_t offset, const py::buffer& buf, int64_t payload) {
        py::buffer_info info = writable_bytes(buf, align_up(payload, kDirectIoAlign));
        py::gil_scoped_release g;
        return f.write(offset, info.ptr, payload);
      }, py::arg("offset"), py::arg("buffer"), py::arg("payload_nbytes"))
      .def("read", [](DirectFile& f, int64_t offset, const py::buffer& buf, int64_t payload) {
        py::buffer_info info = writable_bytes(buf, align_up(payload, kDirectIoAlign));
        py::gil_scoped_release g;
        return f.read(offset, info.ptr, payload);
      }, py::arg("offset"), py::arg("buffer"), py::arg("payload_nbytes"))
      .def("sync", [](DirectFile& f) { py::gil_scoped_release g; f.sync(); });

  m.def("configure_pools", &configure_pools, py::arg("cpu_threads"), py::arg("io_threads"));
  m.def("built_with_cuda", &built_with_cuda);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_runtime_version", &cuda_runtime_version);
  m.attr("DIRECT_IO_ALIGN") = kDirectIoAlign;

  bind_gpu_movers(m);
  bind_master_index(m);
}
