#include "thread_pool.h"

#include <memory>

#include "errors.h"

namespace kvstore {

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int> running{0};
    std::mutex mu;
    std::condition_variable done;
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, n, &fn] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(shared->mu);
        if (!shared->error) shared->error = std::current_exception();
        shared->next.store(n);  // stop handing out work
      }
    }
  };
  int helpers = int(std::min<int64_t>(n - 1, int64_t(workers_.size())));
  shared->running = helpers;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (int h = 0; h < helpers; ++h)
      tasks_.emplace_back([shared, drain] {
        drain();
        std::lock_guard<std::mutex> lk2(shared->mu);
        if (--shared->running == 0) shared->done.notify_all();
      });
  }
  cv_.notify_all();
  drain();
  std::unique_lock<std::mutex> lk(shared->mu);
  // Helpers queued behind another call still run drain(), find no work and count down.
  shared->done.wait(lk, [&] { return shared->running == 0; });
  if (shared->error) std::rethrow_exception(shared->error);
}

namespace {
std::mutex g_pools_mu;
std::shared_ptr<ThreadPool> g_cpu, g_io;
int default_cpu_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  return int(hw == 0 ? 2 : (hw > 8 ? 8 : hw)) - 1;  // the caller thread is the last worker
}
}  // namespace

std::shared_ptr<ThreadPool> cpu_pool() {
  std::lock_guard<std::mutex> lk(g_pools_mu);
  if (!g_cpu) g_cpu = std::make_shared<ThreadPool>(default_cpu_threads());
  return g_cpu;
}

std::shared_ptr<ThreadPool> io_pool() {
  std::lock_guard<std::mutex> lk(g_pools_mu);
  if (!g_io) g_io = std::make_shared<ThreadPool>(7);
  return g_io;
}

void configure_pools(int cpu_threads, int io_threads) {
  if (cpu_threads < 1 || io_threads < 1) throw InvalidArgument("thread counts must be >= 1");
  std::lock_guard<std::mutex> lk(g_pools_mu);
  if (!g_cpu || g_cpu->size() != cpu_threads - 1) g_cpu = std::make_shared<ThreadPool>(cpu_threads - 1);
  if (!g_io || g_io->size() != io_threads - 1) g_io = std::make_shared<ThreadPool>(io_threads - 1);
}

}  // namespace kvstore
