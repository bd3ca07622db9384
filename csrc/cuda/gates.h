// Gates: one 32-bit device flag per layer, for loads whose copies are enqueued after the events
// that announce them (from a helper thread). Stream `feed` carries the copies; after layer i's
// copies, open(i) enqueues a write of the flag there. The gates' own stream waits for flag i
// (wait(i)) and the caller records layer i's event on it right away, so every event is recorded
// before anything that waits on it launches: a CUDA graph binds an external-event wait to the
// event's latest record at launch (cuStreamWaitValue32 / cuStreamWriteValue32, driver API, taken
// through cudaGetDriverEntryPointByVersion so that the extension does not link libcuda).
#pragma once
#include <cstdint>
#include <vector>

namespace kvstore {
namespace gpu {

class Gates {
 public:
  // `count` closed gates, zeroed on `feed`; the waiting stream gets `priority`.
  Gates(int device, int count, uintptr_t feed, int priority);
  // Opens every gate not yet opened (nothing may wait forever), then frees the flags on `feed`
  // once the waiting stream has passed its waits. Stream-ordered: no host synchronisation.
  ~Gates();
  Gates(const Gates&) = delete;
  Gates& operator=(const Gates&) = delete;

  void wait(int i);  // enqueued on stream(): waits until gate i is open
  void open(int i);  // enqueued on feed: gate i opens once the work enqueued there so far is done
  uintptr_t stream() const { return waiter_; }
  int count() const { return int(opened_.size()); }

 private:
  void check(int i) const;
  int device_ = 0;
  uintptr_t feed_ = 0, waiter_ = 0;
  uint32_t* flags_ = nullptr;
  std::vector<bool> opened_;
  uintptr_t zeroed_ = 0, passed_ = 0;  // cudaEvent_t: flags zeroed (feed), waits passed (waiter)
};

// Whether the device supports the stream memory operations Gates use.
bool gates_supported(int device);

}  // namespace gpu
}  // namespace kvstore
