// A fixed pool of worker threads with a blocking parallel_for. Callers may come from several
// Python threads at once: each call pulls its own indices from its own counter, and the calling
// thread works too, so a call never waits for a queue slot held by another call.
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvstore {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()); }
  // Runs fn(i) for i in [0, n) on the pool and the caller; rethrows the first exception.
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  std::vector<std::thread> workers_;
  std::deque<std::function<void()>> tasks_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
};

// Process-wide pools: "cpu" for memory copies, "io" for O_DIRECT requests (deeper queue).
// Callers keep the shared_ptr for the duration of a call, so a reconfiguration never frees a
// pool under a running parallel_for.
std::shared_ptr<ThreadPool> cpu_pool();
std::shared_ptr<ThreadPool> io_pool();
// Thread counts include the calling thread.
void configure_pools(int cpu_threads, int io_threads);

}  // namespace kvstore
