#include "master_index.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>

#include "errors.h"

namespace kvstore {
namespace {

constexpr size_t kNotFound = std::numeric_limits<size_t>::max();
constexpr size_t kInitialSlots = 1024;
// Keys looked up together in match: their slots, then their first replicas, are prefetched as
// a group so the cache misses of a group overlap instead of queueing one after the other.
constexpr size_t kMatchGroup = 16;

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 1); }

void check_node_tier(uint16_t node, uint8_t tier, size_t i) {
  KV_CHECK_ARG(node < kIndexMaxNodes, "entry " + std::to_string(i) + ": node " + std::to_string(node) +
                                          " out of range (at most " + std::to_string(kIndexMaxNodes) + " nodes)");
  KV_CHECK_ARG(tier == kTierDram || tier == kTierSsd,
               "entry " + std::to_string(i) + ": tier must be 1 (DRAM) or 2 (SSD), got " + std::to_string(tier));
}

}  // namespace

MasterIndex::MasterIndex() : slots_(kInitialSlots), mask_(kInitialSlots - 1), node_replicas_(kIndexMaxNodes, 0) {
  for (Slot& s : slots_) s.head = kNil;
}

uint64_t MasterIndex::hash(const void* key) {
  uint64_t lo, hi;
  std::memcpy(&lo, key, 8);
  std::memcpy(&hi, static_cast<const uint8_t*>(key) + 8, 8);
  return fmix64(lo ^ fmix64(hi ^ 0x6b7673746f7265ULL));
}

size_t MasterIndex::find(const void* key, uint64_t h) const {
  for (size_t i = h & mask_;; i = (i + 1) & mask_) {
    const Slot& s = slots_[i];
    if (s.head == kNil) return kNotFound;
    if (std::memcmp(s.key, key, kIndexKeyNbytes) == 0) return i;
  }
}

void MasterIndex::insert_slot(const void* key, uint64_t h, uint32_t head) {
  if ((used_ + 1) * 4 > slots_.size() * 3) grow();
  size_t i = h & mask_;
  while (slots_[i].head != kNil) i = (i + 1) & mask_;
  std::memcpy(slots_[i].key, key, kIndexKeyNbytes);
  slots_[i].head = head;
  ++used_;
}

void MasterIndex::erase_slot(size_t i) {
  // Backward-shift deletion: pull later members of the probe run into the hole, so lookups never
  // need tombstones.
  for (size_t j = (i + 1) & mask_; slots_[j].head != kNil; j = (j + 1) & mask_) {
    size_t home = hash(slots_[j].key) & mask_;
    bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (!stays) {
      slots_[i] = slots_[j];
      i = j;
    }
  }
  slots_[i].head = kNil;
  --used_;
}

void MasterIndex::grow() {
  std::vector<Slot> old(slots_.size() * 2);
  old.swap(slots_);
  for (Slot& s : slots_) s.head = kNil;
  mask_ = slots_.size() - 1;
  for (const Slot& s : old) {
    if (s.head == kNil) continue;
    size_t i = hash(s.key) & mask_;
    while (slots_[i].head != kNil) i = (i + 1) & mask_;
    slots_[i] = s;
  }
}

uint32_t MasterIndex::alloc_replica() {
  if (free_ != kNil) {
    uint32_t i = free_;
    free_ = rep(i).next;
    return i;
  }
  if ((pool_size_ >> kBlockShift) == blocks_.size())
    blocks_.emplace_back(new Replica[size_t(1) << kBlockShift]);
  return pool_size_++;
}

void MasterIndex::free_replica(uint32_t i) {
  rep(i).next = free_;
  free_ = i;
}

void MasterIndex::admit(const AdmitBatch& b, uint8_t* outcome) {
  for (size_t i = 0; i < b.n; ++i) check_node_tier(b.nodes[i], b.tiers[i], i);
  std::unique_lock lock(mu_);
  KV_CHECK_ARG(replicas_ + b.n < kMaxReplicas, "master index: more than " + std::to_string(kMaxReplicas) + " replicas");
  for (size_t i = 0; i < b.n; ++i) {
    const uint8_t* key = b.keys + i * kIndexKeyNbytes;
    uint64_t h = hash(key);
    size_t s = find(key, h);
    uint32_t mine = kNil;
    if (s != kNotFound) {
      for (uint32_t r = slots_[s].head; r != kNil; r = rep(r).next) {
        if (rep(r).node == b.nodes[i] && rep(r).tier == b.tiers[i]) {
          mine = r;
          break;
        }
      }
    }
    if (mine != kNil && rep(mine).generation > b.generations[i]) {
      outcome[i] = kAdmitIgnored;  // an older report arriving late
      continue;
    }
    if (mine == kNil) {
      mine = alloc_replica();
      Replica& r = rep(mine);
      r.node = b.nodes[i];
      r.tier = b.tiers[i];
      r.pad = 0;
      if (s == kNotFound) {
        r.next = kNil;
        insert_slot(key, h, mine);
      } else {
        r.next = slots_[s].head;
        slots_[s].head = mine;
      }
      ++replicas_;
      ++node_replicas_[b.nodes[i]];
      outcome[i] = kAdmitAdded;
    } else {
      outcome[i] = kAdmitReplaced;
    }
    Replica& r = rep(mine);
    r.nbytes = b.nbytes[i];
    r.checksum = b.checksums[i];
    r.generation = b.generations[i];
    r.fingerprint = b.fingerprints[i];
  }
}

void MasterIndex::evict(const EvictBatch& b, uint8_t* evicted) {
  for (size_t i = 0; i < b.n; ++i) check_node_tier(b.nodes[i], b.tiers[i], i);
  std::unique_lock lock(mu_);
  for (size_t i = 0; i < b.n; ++i) {
    evicted[i] = 0;
    const uint8_t* key = b.keys + i * kIndexKeyNbytes;
    size_t s = find(key, hash(key));
    if (s == kNotFound) continue;
    uint32_t* link = &slots_[s].head;
    while (*link != kNil && !(rep(*link).node == b.nodes[i] && rep(*link).tier == b.tiers[i])) link = &rep(*link).next;
    if (*link == kNil) continue;
    uint32_t gone = *link;
    *link = rep(gone).next;
    free_replica(gone);
    --replicas_;
    --node_replicas_[b.nodes[i]];
    evicted[i] = 1;
    if (slots_[s].head == kNil) erase_slot(s);
  }
}

size_t MasterIndex::drop_node(uint16_t node, std::vector<uint8_t>* keys_out, std::vector<uint8_t>* tiers_out) {
  KV_CHECK_ARG(node < kIndexMaxNodes, "node " + std::to_string(node) + " out of range");
  std::unique_lock lock(mu_);
  if (node_replicas_[node] == 0) return 0;
  // Pass 1 unlinks; a slot whose list empties is marked kEmptied (still occupied, so probing is
  // unchanged). Pass 2 erases those slots by key: erasing shifts slots, so not during the scan.
  std::vector<uint8_t> emptied;
  size_t dropped = 0;
  for (Slot& s : slots_) {
    if (s.head == kNil) continue;
    uint32_t* link = &s.head;
    while (*link != kNil) {
      uint32_t r = *link;
      if (rep(r).node != node) {
        link = &rep(r).next;
        continue;
      }
      keys_out->insert(keys_out->end(), reinterpret_cast<const uint8_t*>(s.key),
                       reinterpret_cast<const uint8_t*>(s.key) + kIndexKeyNbytes);
      tiers_out->push_back(rep(r).tier);
      *link = rep(r).next;
      free_replica(r);
      ++dropped;
    }
    if (s.head == kNil) {
      s.head = kEmptied;
      emptied.insert(emptied.end(), reinterpret_cast<const uint8_t*>(s.key),
                     reinterpret_cast<const uint8_t*>(s.key) + kIndexKeyNbytes);
    }
  }
  for (size_t off = 0; off < emptied.size(); off += kIndexKeyNbytes) {
    const uint8_t* key = emptied.data() + off;
    size_t s = find(key, hash(key));
    if (s != kNotFound) erase_slot(s);
  }
  replicas_ -= dropped;
  node_replicas_[node] = 0;
  return dropped;
}

MatchResult MasterIndex::match(const uint8_t* keys, size_t n, int exclude_node) const {
  struct TierRun {
    uint16_t node;
    uint8_t tier;
    bool active;
    uint32_t length;
    size_t seen;  // key index at which it was last found
  };
  struct NodeRun {
    uint16_t node;
    bool active;
    bool collect;
    uint32_t length;
    uint32_t found;  // replica chosen for the current key (its DRAM copy first)
    size_t seen;
    size_t out;  // index into result.candidates when collect
  };
  MatchResult result;
  std::vector<TierRun> tier_runs;
  std::vector<NodeRun> node_runs;
  size_t active = 0;
  uint32_t heads[kMatchGroup];
  uint64_t hashes[kMatchGroup];

  std::shared_lock lock(mu_);
  for (size_t base = 0; base < n; base += kMatchGroup) {
    size_t group = std::min(kMatchGroup, n - base);
    const uint8_t* gkeys = keys + base * kIndexKeyNbytes;
    for (size_t g = 0; g < group; ++g) {
      hashes[g] = hash(gkeys + g * kIndexKeyNbytes);
      prefetch(&slots_[hashes[g] & mask_]);
    }
    for (size_t g = 0; g < group; ++g) {
      size_t s = find(gkeys + g * kIndexKeyNbytes, hashes[g]);
      heads[g] = s == kNotFound ? kNil : slots_[s].head;
      if (heads[g] != kNil) prefetch(&rep(heads[g]));
    }
    for (size_t g = 0; g < group; ++g) {
      size_t i = base + g;
      if (i == 0) {  // the first key names the candidates
        for (uint32_t r = heads[0]; r != kNil; r = rep(r).next) {
          const Replica& x = rep(r);
          tier_runs.push_back({x.node, x.tier, true, 0, kNotFound});
          auto same_node = [&](const NodeRun& c) { return c.node == x.node; };
          if (std::none_of(node_runs.begin(), node_runs.end(), same_node)) {
            bool collect = int(x.node) != exclude_node;
            node_runs.push_back({x.node, true, collect, 0, kNil, kNotFound, result.candidates.size()});
            if (collect) result.candidates.push_back({x.node, {}, {}});
          }
        }
        active = tier_runs.size() + node_runs.size();
        if (active == 0) return result;
        for (auto& c : result.candidates) {
          c.checksums.reserve(n);
          c.nbytes.reserve(n);
        }
      }
      for (uint32_t r = heads[g]; r != kNil; r = rep(r).next) {
        const Replica& x = rep(r);
        for (TierRun& t : tier_runs)
          if (t.active && t.node == x.node && t.tier == x.tier) t.seen = i;
        for (NodeRun& c : node_runs) {
          if (!c.active || c.node != x.node) continue;
          if (c.seen != i || x.tier == kTierDram) c.found = r;
          c.seen = i;
        }
      }
      for (TierRun& t : tier_runs) {
        if (!t.active) continue;
        if (t.seen == i) {
          ++t.length;
        } else {
          t.active = false;
          --active;
        }
      }
      for (NodeRun& c : node_runs) {
        if (!c.active) continue;
        if (c.seen != i) {
          c.active = false;
          --active;
          continue;
        }
        ++c.length;
        if (c.collect) {
          const Replica& x = rep(c.found);
          result.candidates[c.out].checksums.push_back(x.checksum);
          result.candidates[c.out].nbytes.push_back(x.nbytes);
        }
      }
      if (active == 0) break;
    }
    if (active == 0) break;
  }
  for (const TierRun& t : tier_runs) result.runs.push_back({t.node, t.tier, t.length});
  for (const NodeRun& c : node_runs) result.runs.push_back({c.node, 0, c.length});
  return result;
}

size_t MasterIndex::num_keys() const {
  std::shared_lock lock(mu_);
  return used_;
}

size_t MasterIndex::num_replicas() const {
  std::shared_lock lock(mu_);
  return replicas_;
}

uint64_t MasterIndex::node_replicas(uint16_t node) const {
  KV_CHECK_ARG(node < kIndexMaxNodes, "node " + std::to_string(node) + " out of range");
  std::shared_lock lock(mu_);
  return node_replicas_[node];
}

size_t MasterIndex::memory_bytes() const {
  std::shared_lock lock(mu_);
  return slots_.capacity() * sizeof(Slot) + blocks_.size() * (sizeof(Replica) << kBlockShift) +
         node_replicas_.capacity() * sizeof(uint64_t);
}

std::vector<IndexEntry> MasterIndex::entries() const {
  std::shared_lock lock(mu_);
  std::vector<IndexEntry> out;
  out.reserve(replicas_);
  for (const Slot& s : slots_) {
    for (uint32_t r = s.head; r != kNil; r = rep(r).next) {
      const Replica& x = rep(r);
      IndexEntry e;
      std::memcpy(e.key, s.key, kIndexKeyNbytes);
      e.node = x.node;
      e.tier = x.tier;
      e.nbytes = x.nbytes;
      e.checksum = x.checksum;
      e.generation = x.generation;
      e.fingerprint = x.fingerprint;
      out.push_back(e);
    }
  }
  return out;
}

}  // namespace kvstore
