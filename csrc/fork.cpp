#include "fork.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <set>
#include <unordered_set>

#include "errors.h"
#include "pool.h"

namespace vkv {
namespace {

// Incremented in every child: an object whose generation differs was
// inherited from a parent process.
std::atomic<uint64_t> g_generation{0};

struct Registry {
  std::mutex mu;
  std::unordered_set<Reservation*> live;
  std::set<PagePool*> held;  // pools locked across fork(), in address order
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: forks may happen at exit
  return *r;
}

void prepare() {
  Registry& r = registry();
  r.mu.lock();
  r.held.clear();
  for (Reservation* res : r.live) r.held.insert(&res->pool());
  for (PagePool* pool : r.held) pool->lock_for_fork();
}

void unlock_all() {
  Registry& r = registry();
  for (auto it = r.held.rbegin(); it != r.held.rend(); ++it) (*it)->unlock_after_fork();
  r.held.clear();
  r.mu.unlock();
}

void in_child() {
  // Before the generation moves on: a reservation inherited by an earlier
  // fork is already private here, and fork() copies that on write.
  for (Reservation* res : registry().live) res->privatize_after_fork();
  g_generation.fetch_add(1);
  unlock_all();
}

// Installed when the library loads, before any object exists.
const bool g_installed = pthread_atfork(prepare, unlock_all, in_child) == 0;

}  // namespace

Origin::Origin() : pid_(getpid()), generation_(g_generation.load()) {}

bool Origin::forked() const { return g_generation.load(std::memory_order_relaxed) != generation_; }

void Origin::check() const {
  if (forked())
    throw Forked("this cache was created in process " + std::to_string(pid_) +
                 "; create a new cache in the child (process " + std::to_string(getpid()) +
                 "): objects inherited through fork() cannot be used there");
}

void fork_register(Reservation* res) {
  (void)g_installed;
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.live.insert(res);
}

void fork_unregister(Reservation* res) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.live.erase(res);
}

}  // namespace vkv
