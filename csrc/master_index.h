// The master's cluster index (DESIGN.md §4): 16-byte key -> replicas {node, tier, nbytes,
// checksum, generation, fingerprint}. Framework-free; master_index_bindings.cpp exposes it.
//
// Layout: an open-addressing table of 20-byte slots (key + head of the key's replica list,
// linear probing, backward-shift deletion, load <= 3/4) and a pool of 40-byte replica records
// linked per key, allocated in fixed blocks (no reallocation copies). About 70 bytes per key
// with one replica. Nodes are small integers assigned by the caller (master/state.py).
//
// Rules (the same as the Python index it replaces): one replica per (key, node, tier); an admit
// whose generation is lower than the stored one is ignored (an older report arriving late), an
// equal or higher one replaces it. A batch is validated whole before anything changes.
//
// Thread safety: one shared mutex; match and the counters read under the shared lock, every
// mutation takes it exclusively. Callers release the GIL around the batch calls.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <vector>

namespace kvstore {

constexpr size_t kIndexKeyNbytes = 16;
constexpr uint32_t kIndexMaxNodes = 65535;  // node ids 0 .. 65534
constexpr uint8_t kTierDram = 1;
constexpr uint8_t kTierSsd = 2;

// Per admit: what happened to it.
enum AdmitOutcome : uint8_t { kAdmitIgnored = 0, kAdmitAdded = 1, kAdmitReplaced = 2 };

struct AdmitBatch {
  const uint8_t* keys;  // n * 16 bytes
  const uint16_t* nodes;
  const uint8_t* tiers;
  const uint64_t* nbytes;
  const uint64_t* checksums;
  const uint64_t* generations;
  const uint64_t* fingerprints;
  size_t n;
};

struct EvictBatch {
  const uint8_t* keys;  // n * 16 bytes
  const uint16_t* nodes;
  const uint8_t* tiers;
  size_t n;
};

struct MatchRun {
  uint16_t node;
  uint8_t tier;  // 0: any tier of the node
  uint32_t length;
};

struct MatchCandidate {
  uint16_t node;
  std::vector<uint64_t> checksums;  // per key of the node's leading run (its DRAM copy first)
  std::vector<uint64_t> nbytes;
};

struct MatchResult {
  std::vector<MatchRun> runs;              // every (node, tier) and every node with a run > 0
  std::vector<MatchCandidate> candidates;  // nodes with a run > 0 except the excluded one, unsorted
};

// One replica as exported (tests, snapshots).
struct IndexEntry {
  uint8_t key[kIndexKeyNbytes];
  uint16_t node;
  uint8_t tier;
  uint64_t nbytes, checksum, generation, fingerprint;
};

class MasterIndex {
 public:
  MasterIndex();
  MasterIndex(const MasterIndex&) = delete;
  MasterIndex& operator=(const MasterIndex&) = delete;

  // Applies admits in order; outcome[i] is an AdmitOutcome. Throws InvalidArgument (changing
  // nothing) on a node >= kIndexMaxNodes or a tier other than DRAM / SSD.
  void admit(const AdmitBatch& b, uint8_t* outcome);
  // Removes the (key, node, tier) replicas; evicted[i] = 1 where one was removed.
  void evict(const EvictBatch& b, uint8_t* evicted);
  // Removes every replica of node; appends their keys and tiers. Returns how many.
  size_t drop_node(uint16_t node, std::vector<uint8_t>* keys_out, std::vector<uint8_t>* tiers_out);
  // Leading runs of keys[0..n) per (node, tier) and per node; the candidates' checksums and sizes.
  // exclude_node < 0: none excluded.
  MatchResult match(const uint8_t* keys, size_t n, int exclude_node) const;

  size_t num_keys() const;
  size_t num_replicas() const;
  uint64_t node_replicas(uint16_t node) const;
  size_t memory_bytes() const;
  std::vector<IndexEntry> entries() const;

 private:
  struct Slot {  // 20 bytes: the key as 4 words (4-byte aligned) + list head
    uint32_t key[4];
    uint32_t head;
  };
  struct Replica {  // 40 bytes
    uint64_t nbytes, checksum, generation, fingerprint;
    uint32_t next;
    uint16_t node;
    uint8_t tier;
    uint8_t pad;
  };
  static constexpr uint32_t kNil = 0xFFFFFFFFu;      // empty slot / end of list
  static constexpr uint32_t kEmptied = 0xFFFFFFFEu;  // drop_node: occupied, list emptied, erase pending
  static constexpr uint32_t kBlockShift = 16;        // 64 Ki replicas per pool block
  static constexpr size_t kMaxReplicas = size_t(kEmptied) - 1;

  static uint64_t hash(const void* key);
  size_t find(const void* key, uint64_t h) const;  // slot index or SIZE_MAX
  void insert_slot(const void* key, uint64_t h, uint32_t head);  // the key must be absent
  void erase_slot(size_t i);
  void grow();
  Replica& rep(uint32_t i) { return blocks_[i >> kBlockShift][i & ((1u << kBlockShift) - 1)]; }
  const Replica& rep(uint32_t i) const { return blocks_[i >> kBlockShift][i & ((1u << kBlockShift) - 1)]; }
  uint32_t alloc_replica();
  void free_replica(uint32_t i);

  mutable std::shared_mutex mu_;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t used_ = 0;  // occupied slots = keys
  std::vector<std::unique_ptr<Replica[]>> blocks_;
  uint32_t pool_size_ = 0;  // replica records handed out from the blocks so far
  uint32_t free_ = kNil;    // free list through Replica::next
  size_t replicas_ = 0;
  std::vector<uint64_t> node_replicas_;
};

}  // namespace kvstore
