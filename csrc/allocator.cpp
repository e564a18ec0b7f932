#include "allocator.h"

#include <map>
#include <mutex>

#include "backend.h"
#include "errors.h"
#include "fork.h"
#include "pool.h"
#include "util.h"

namespace vkv {
namespace {

struct Region {
  Origin origin;  // a forked child forgets inherited regions without freeing them
  size_t bytes;
  std::shared_ptr<Backend> backend;
  std::weak_ptr<Reservation> adopted_by;
};

// The C ABI carries no context object, so the regions handed out are kept in
// one process-wide table keyed by address. It holds no other state: caches,
// pools and reservations stay independent of each other.
struct Registry {
  std::mutex mu;
  std::map<uintptr_t, Region> regions;
  std::string last_error;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: vkv_free may run at exit
  return *r;
}

}  // namespace

uintptr_t allocator_reserve(std::shared_ptr<Backend> backend, size_t size) {
  size_t ps = require(backend, "allocator_reserve: backend")->page_size();
  if (size > SIZE_MAX - (ps - 1))
    throw InvalidArgument("allocator_reserve: expected a size of at most " + std::to_string(SIZE_MAX - (ps - 1)) +
                          " bytes, got " + std::to_string(size));
  size_t bytes = (size + ps - 1) / ps * ps;
  ThreadBinding bound(*backend);
  uintptr_t addr = backend->reserve(bytes);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.regions[addr] = Region{Origin(), bytes, std::move(backend), {}};
  return addr;
}

bool allocator_release(uintptr_t addr) {
  Region region;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.regions.find(addr);
    if (it == r.regions.end()) return false;
    region = std::move(it->second);
    r.regions.erase(it);
  }
  if (region.origin.forked()) return true;  // the parent's range: nothing to free here
  if (auto res = region.adopted_by.lock()) res->on_address_freed();
  ThreadBinding bound(*region.backend);
  region.backend->release(addr, region.bytes);
  return true;
}

size_t allocator_region_bytes(uintptr_t addr) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.regions.find(addr);
  if (it == r.regions.end())
    throw InvalidArgument("address " + hex(addr) + " was not returned by vkv_alloc");
  return it->second.bytes;
}

std::shared_ptr<Reservation> allocator_adopt(std::shared_ptr<PagePool> pool, uintptr_t addr) {
  require(pool, "Reservation.adopt: pool");
  std::shared_ptr<Reservation> res = Reservation::adopt(std::move(pool), addr, allocator_region_bytes(addr));
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.regions.find(addr);
  if (it == r.regions.end())
    throw InvalidArgument("address " + hex(addr) + " was freed while it was being adopted");
  if (it->second.adopted_by.lock())
    throw InvalidArgument("address " + hex(addr) + " is already adopted by another reservation");
  it->second.adopted_by = res;
  return res;
}

size_t allocator_num_regions() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.regions.size();
}

std::string allocator_last_error() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.last_error;
}

}  // namespace vkv

extern "C" void* vkv_alloc(ssize_t size, int device, void* /*stream*/) {
  // PyTorch treats nullptr as out of memory and raises its own OOM error;
  // allocator_last_error() keeps the driver's reason for torch_vkv's message.
  try {
    if (size <= 0) return nullptr;
    return reinterpret_cast<void*>(vkv::allocator_reserve(vkv::cuda_backend(device), static_cast<size_t>(size)));
  } catch (const std::exception& e) {
    vkv::Registry& r = vkv::registry();
    std::lock_guard<std::mutex> lock(r.mu);
    r.last_error = e.what();
    return nullptr;
  }
}

extern "C" void vkv_free(void* ptr, size_t /*size*/, int /*device*/, void* /*stream*/) {
  try {
    vkv::allocator_release(reinterpret_cast<uintptr_t>(ptr));
  } catch (...) {
    // Nothing to report to: the caller is PyTorch's allocator.
  }
}
