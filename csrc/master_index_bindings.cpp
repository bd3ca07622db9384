// kvstore._C.MasterIndex: the master's cluster index (master_index.h). Keys travel as one
// buffer of 16 * N bytes, per-key fields as numpy arrays: no Python object per key. Every batch
// call releases the GIL while it runs (match: from kMatchReleaseGilKeys keys on).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>

#include "errors.h"
#include "master_index.h"

namespace py = pybind11;

namespace kvstore {
namespace {

// Below this many keys a match takes tens of microseconds: holding the GIL costs less than
// handing it to another thread and queueing to take it back.
constexpr size_t kMatchReleaseGilKeys = 2048;

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A contiguous buffer of packed 16-byte keys: returns (pointer, key count).
std::pair<const uint8_t*, size_t> packed_keys(const py::buffer_info& info) {
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    KV_CHECK_ARG(info.shape[d] <= 1 || info.strides[d] == expect, "keys must be one contiguous buffer");
    expect *= info.shape[d];
  }
  size_t nbytes = size_t(info.size) * size_t(info.itemsize);
  KV_CHECK_ARG(nbytes % kIndexKeyNbytes == 0, "packed keys must be 16 bytes each: got " + std::to_string(nbytes) +
                                                  " bytes, not a multiple of 16");
  return {static_cast<const uint8_t*>(info.ptr), nbytes / kIndexKeyNbytes};
}

template <typename T>
const T* field(const Array<T>& a, size_t n, const char* name) {
  KV_CHECK_ARG(a.ndim() == 1 && size_t(a.size()) == n,
               std::string(name) + " must be 1-D with one entry per key (" + std::to_string(n) + ")");
  return a.data();
}

template <typename T>
py::array_t<T> to_array(const T* data, size_t n) {
  py::array_t<T> out(static_cast<py::ssize_t>(n));
  if (n) std::memcpy(out.mutable_data(), data, n * sizeof(T));
  return out;
}

}  // namespace

void bind_master_index(py::module_& m) {
  py::class_<MasterIndex>(m, "MasterIndex",
                          "Cluster index of the master: 16-byte key -> replicas (node, tier, nbytes, checksum, "
                          "generation, fingerprint). Nodes are small integers (< 65535) assigned by the caller.")
      .def(py::init<>())
      .def("admit",
           [](MasterIndex& ix, const py::buffer& keys, const Array<uint16_t>& nodes, const Array<uint8_t>& tiers,
              const Array<uint64_t>& nbytes, const Array<uint64_t>& checksums, const Array<uint64_t>& generations,
              const Array<uint64_t>& fingerprints) {
             py::buffer_info info = keys.request();
             auto [kp, n] = packed_keys(info);
             AdmitBatch b{kp,
                          field(nodes, n, "nodes"),
                          field(tiers, n, "tiers"),
                          field(nbytes, n, "nbytes"),
                          field(checksums, n, "checksums"),
                          field(generations, n, "generations"),
                          field(fingerprints, n, "fingerprints"),
                          n};
             py::array_t<uint8_t> outcome(static_cast<py::ssize_t>(n));
             uint8_t* out = outcome.mutable_data();
             {
               py::gil_scoped_release nogil;
               ix.admit(b, out);
             }
             return outcome;
           },
           py::arg("keys"), py::arg("nodes"), py::arg("tiers"), py::arg("nbytes"), py::arg("checksums"),
           py::arg("generations"), py::arg("fingerprints"),
           "Applies admits in order. Returns uint8 per admit: 0 ignored (older generation), 1 added, 2 replaced.")
      .def("evict",
           [](MasterIndex& ix, const py::buffer& keys, const Array<uint16_t>& nodes, const Array<uint8_t>& tiers) {
             py::buffer_info info = keys.request();
             auto [kp, n] = packed_keys(info);
             EvictBatch b{kp, field(nodes, n, "nodes"), field(tiers, n, "tiers"), n};
             py::array_t<uint8_t> evicted(static_cast<py::ssize_t>(n));
             uint8_t* out = evicted.mutable_data();
             {
               py::gil_scoped_release nogil;
               ix.evict(b, out);
             }
             return evicted;
           },
           py::arg("keys"), py::arg("nodes"), py::arg("tiers"),
           "Removes (key, node, tier) replicas. Returns uint8 per entry: 1 where one was removed.")
      .def("drop_node",
           [](MasterIndex& ix, uint16_t node) {
             std::vector<uint8_t> keys, tiers;
             {
               py::gil_scoped_release nogil;
               ix.drop_node(node, &keys, &tiers);
             }
             return py::make_tuple(py::bytes(reinterpret_cast<const char*>(keys.data()), keys.size()),
                                   to_array(tiers.data(), tiers.size()));
           },
           py::arg("node"), "Removes every replica of node. Returns (packed keys, tiers) of what was removed.")
      .def("match",
           [](const MasterIndex& ix, const py::buffer& keys, int exclude_node) {
             py::buffer_info info = keys.request();
             auto [kp, n] = packed_keys(info);
             MatchResult r;
             if (n >= kMatchReleaseGilKeys) {
               py::gil_scoped_release nogil;
               r = ix.match(kp, n, exclude_node);
             } else {
               r = ix.match(kp, n, exclude_node);
             }
             py::array_t<uint32_t> runs({static_cast<py::ssize_t>(r.runs.size()), py::ssize_t(3)});
             auto rv = runs.mutable_unchecked<2>();
             for (size_t i = 0; i < r.runs.size(); ++i) {
               rv(i, 0) = r.runs[i].node;
               rv(i, 1) = r.runs[i].tier;
               rv(i, 2) = r.runs[i].length;
             }
             py::list cands;
             for (const MatchCandidate& c : r.candidates)
               cands.append(py::make_tuple(c.node, to_array(c.checksums.data(), c.checksums.size()),
                                           to_array(c.nbytes.data(), c.nbytes.size())));
             return py::make_tuple(runs, cands);
           },
           py::arg("keys"), py::arg("exclude_node") = -1,
           "Leading runs of the packed keys. Returns (runs: uint32 [k, 3] of (node, tier or 0 for any tier, length), "
           "candidates: [(node, checksums uint64[length], nbytes uint64[length])] for every node with a run > 0 "
           "except exclude_node, unsorted).")
      .def("__len__", &MasterIndex::num_keys)
      .def_property_readonly("replicas", &MasterIndex::num_replicas)
      .def("node_replicas", &MasterIndex::node_replicas, py::arg("node"))
      .def_property_readonly("memory_bytes", &MasterIndex::memory_bytes, "bytes held by the table and the pool")
      .def("entries",
           [](const MasterIndex& ix) {
             std::vector<IndexEntry> e;
             {
               py::gil_scoped_release nogil;
               e = ix.entries();
             }
             size_t n = e.size();
             std::string keys(n * kIndexKeyNbytes, '\0');
             py::array_t<uint16_t> nodes(static_cast<py::ssize_t>(n));
             py::array_t<uint8_t> tiers(static_cast<py::ssize_t>(n));
             py::array_t<uint64_t> nb(static_cast<py::ssize_t>(n)), cs(static_cast<py::ssize_t>(n)),
                 gen(static_cast<py::ssize_t>(n)), fp(static_cast<py::ssize_t>(n));
             for (size_t i = 0; i < n; ++i) {
               std::memcpy(&keys[i * kIndexKeyNbytes], e[i].key, kIndexKeyNbytes);
               nodes.mutable_data()[i] = e[i].node;
               tiers.mutable_data()[i] = e[i].tier;
               nb.mutable_data()[i] = e[i].nbytes;
               cs.mutable_data()[i] = e[i].checksum;
               gen.mutable_data()[i] = e[i].generation;
               fp.mutable_data()[i] = e[i].fingerprint;
             }
             py::dict d;
             d["keys"] = py::bytes(keys);
             d["nodes"] = nodes;
             d["tiers"] = tiers;
             d["nbytes"] = nb;
             d["checksums"] = cs;
             d["generations"] = gen;
             d["fingerprints"] = fp;
             return d;
           },
           "Every replica, in table order: dict of keys (packed bytes), nodes, tiers, nbytes, checksums, "
           "generations, fingerprints.");
  m.attr("MASTER_INDEX_MAX_NODES") = kIndexMaxNodes;
}

}  // namespace kvstore
