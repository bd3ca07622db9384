// GPU mover entry points. Filled in by the GPU-movers work; until then every call raises
// GPUUnavailableError with the reason.
#include <pybind11/pybind11.h>

#include "cuda_device.h"

namespace py = pybind11;

namespace kvstore {

void bind_gpu_movers(py::module_& m) {
  m.def("require_gpu", &require_gpu, "Raises GPUUnavailableError unless a CUDA device can be used.");
}

}  // namespace kvstore
