#include "pool.h"

#include <algorithm>
#include <chrono>
#include <exception>

#include <unistd.h>

#include "errors.h"
#include "util.h"

namespace vkv {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Calls fn(first, count) for each run of consecutive values in sorted `pages`.
template <typename Fn>
void for_each_run(const std::vector<size_t>& pages, Fn fn) {
  size_t i = 0;
  while (i < pages.size()) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
    fn(pages[i], j - i);
    i = j;
  }
}

}  // namespace

// ------------------------------------------------------------------ PagePool

PagePool::PagePool(std::shared_ptr<Backend> backend, size_t max_pages)
    : backend_(require(backend, "PagePool: backend")), max_pages_(max_pages) {
  counters_.page_size = backend_->page_size();
  publish_available_locked();  // no other thread can see the pool yet
}

PagePool::~PagePool() {
  // In a forked child the pages are the parent's: destroying one would punch
  // a hole in the memfd the parent still maps.
  if (origin_.forked()) return;
  // Every reservation holds the pool alive, so no page is mapped any more.
  std::optional<ThreadBinding> bound;
  try {
    bound.emplace(*backend_);
  } catch (...) {
  }
  for (const auto& batch : pending_) backend_->fence_destroy(batch.fence);
  for (PageHandle p : free_) backend_->destroy_page(p);
}

size_t PagePool::prefill(size_t num_pages) {
  origin_.check();
  Lock lock(*this);
  ThreadBinding bound(*backend_);
  num_pages = std::min(num_pages, max_pages_);
  size_t limit = backend_->page_limit();
  if (num_pages > limit)  // refused up front: the loop below would run for ages (host pages never fail)
    throw OutOfPages("prefill of " + std::to_string(num_pages) + " pages of " + std::to_string(page_size()) +
                         " bytes: the " + backend_->name() + " backend holds at most " + std::to_string(limit) +
                         " pages (the machine's memory and swap); nothing was created",
                     num_pages - std::min(num_pages, created_), limit > created_ ? limit - created_ : 0);
  while (created_ < num_pages) {
    PageHandle p = backend_->create_page();
    ++created_;
    ++counters_.pages_created_total;
    free_.push_back(p);
    never_mapped_.insert(p);
  }
  return created_;
}

void PagePool::set_max_pages(size_t max_pages) {
  origin_.check();
  Lock lock(*this);
  ThreadBinding bound(*backend_);
  max_pages_ = max_pages;
  while (created_ > max_pages_ && !free_.empty()) {
    destroy_locked(free_.back());
    free_.pop_back();
  }
}

size_t PagePool::trim(size_t keep_free) {
  origin_.check();
  Lock lock(*this);
  ThreadBinding bound(*backend_);
  reap_locked(0);
  size_t destroyed = 0;
  while (free_.size() > keep_free) {
    destroy_locked(free_.back());
    free_.pop_back();
    ++destroyed;
  }
  return destroyed;
}

void PagePool::reap() {
  origin_.check();
  Lock lock(*this);
  ThreadBinding bound(*backend_);
  reap_locked(0);
}

PoolStats PagePool::stats() {
  origin_.check();
  Lock lock(*this);
  PoolStats s = counters_;
  s.max_pages = max_pages_;
  s.created_pages = created_;
  s.free_pages = free_.size();
  s.mapped_pages = mappings_.size();
  s.pending_pages = pending_pages_;
  return s;
}

size_t PagePool::available() const {
  origin_.check();
  // Acquire pairs with the release in publish_available_locked(); the value
  // is self-contained, so nothing else read here depends on it.
  return available_.load(std::memory_order_acquire);
}

void PagePool::destroy_locked(PageHandle page) {
  backend_->destroy_page(page);
  never_mapped_.erase(page);
  --created_;
  ++counters_.pages_destroyed_total;
}

size_t PagePool::available_locked() const {
  if (created_ <= max_pages_) return free_.size() + (max_pages_ - created_) + pending_pages_;
  // Shrunk below the pages that exist: release_locked() destroys pages until
  // the budget holds again, so that many pending pages never become free.
  size_t excess = created_ - max_pages_;
  return free_.size() + (pending_pages_ > excess ? pending_pages_ - excess : 0);
}

std::vector<PageHandle> PagePool::acquire_locked(size_t n, std::vector<bool>& fresh) {
  size_t available = available_locked();
  if (n > available)
    throw OutOfPages("out of physical pages: asked for " + std::to_string(n) + " page(s) of " +
                         std::to_string(page_size()) + " bytes, " + std::to_string(available) +
                         " available (budget " + std::to_string(max_pages_) + " pages, " +
                         std::to_string(mappings_.size()) + " in use)",
                     n, available);
  // Recycled pages first, then new ones within the budget, and only then wait
  // for in-flight decommits.
  reap_locked(0);
  std::exception_ptr driver_full;
  try {
    while (free_.size() < n && created_ < max_pages_) {
      PageHandle p = backend_->create_page();  // OutOfPages if the driver is full
      ++created_;
      ++counters_.pages_created_total;
      free_.push_back(p);
      never_mapped_.insert(p);
    }
  } catch (const OutOfPages&) {
    driver_full = std::current_exception();  // pending decommits may still cover it
  }
  reap_locked(n);
  // Still short only after waiting for every pending fence: the driver is full,
  // or pending pages were aliased (an unmap frees no page while another
  // reservation maps it, so available_locked() counted them too early).
  if (free_.size() < n) {
    if (driver_full) std::rethrow_exception(driver_full);
    throw OutOfPages("out of physical pages: asked for " + std::to_string(n) + " page(s) of " +
                         std::to_string(page_size()) + " bytes, " + std::to_string(free_.size()) +
                         " available after waiting for pending decommits (budget " + std::to_string(max_pages_) +
                         " pages, " + std::to_string(mappings_.size()) + " in use)",
                     n, free_.size());
  }
  std::vector<PageHandle> out;
  out.reserve(n);
  fresh.clear();
  for (size_t i = 0; i < n; ++i) {
    PageHandle p = free_.back();
    free_.pop_back();
    fresh.push_back(never_mapped_.erase(p) > 0);
    mappings_[p] = PageUse{1, 0};
    out.push_back(p);
  }
  return out;
}

// pending_pages_ counts the pages whose every mapping is pending: each change
// of a page's counts goes through change_use_locked, which keeps it exact.
template <typename Change>
void PagePool::change_use_locked(PageHandle page, Change change) {
  PageUse& use = mappings_.at(page);
  auto frees = [](const PageUse& u) { return u.pending > 0 && u.pending == u.maps; };
  bool before = frees(use);
  change(use);
  bool after = frees(use);
  if (before && !after) --pending_pages_;
  if (!before && after) ++pending_pages_;
}

void PagePool::retain_locked(PageHandle page) {
  change_use_locked(page, [](PageUse& u) { ++u.maps; });
}

void PagePool::release_locked(PageHandle page) {
  auto it = mappings_.find(page);
  if (it == mappings_.end()) return;
  change_use_locked(page, [](PageUse& u) { --u.maps; });  // the other mappings may all be pending now
  if (it->second.maps > 0) return;
  mappings_.erase(it);
  if (created_ > max_pages_) {
    destroy_locked(page);  // over budget after a shrink
  } else {
    free_.push_back(page);
  }
}

void PagePool::add_pending_locked(std::weak_ptr<Reservation> owner, Fence fence,
                                  const std::vector<PageHandle>& pages) {
  pending_.push_back({fence, std::move(owner)});
  for (PageHandle page : pages) change_use_locked(page, [](PageUse& u) { ++u.pending; });
}

void PagePool::cancel_pending_locked(PageHandle page) {
  change_use_locked(page, [](PageUse& u) { --u.pending; });
}

bool PagePool::mapped_elsewhere_locked(PageHandle page) const {
  auto it = mappings_.find(page);
  return it != mappings_.end() && it->second.maps > 1;
}

bool PagePool::frees_when_reaped_locked(PageHandle page) const {
  auto it = mappings_.find(page);
  return it != mappings_.end() && it->second.pending > 0 && it->second.pending == it->second.maps;
}

void PagePool::reap_locked(size_t wait_until_free) {
  // Fences complete in the order they were recorded on one stream, so the
  // front of the queue finishes first. A batch whose owner is gone is unmapped
  // by the owner's destructor, which may still be waiting for this mutex: it
  // then skips the fence destroyed here (release_all_locked).
  while (!pending_.empty()) {
    PendingBatch& batch = pending_.front();
    if (!backend_->fence_done(batch.fence)) {
      if (free_.size() >= wait_until_free) break;
      backend_->fence_wait(batch.fence);
    }
    Fence fence = batch.fence;
    std::shared_ptr<Reservation> owner = batch.owner.lock();
    pending_.pop_front();
    if (owner) {
      owner->finish_pending_locked(fence);
      reaped_owners_.push_back(std::move(owner));  // dropped after the unlock (Lock)
    }
    backend_->fence_destroy(fence);
  }
}

// --------------------------------------------------------------- Reservation

namespace {
std::atomic<size_t> g_table_bytes{0};  // page tables of the live reservations (Reservation::TableBytes)

size_t table_budget() {
  static const size_t budget = [] {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(size) / 4 : SIZE_MAX;
  }();
  return budget;
}
}  // namespace

namespace {
size_t table_bytes_of(size_t num_pages) {
  constexpr size_t per_page = sizeof(PageHandle) + sizeof(Fence);
  return num_pages <= SIZE_MAX / per_page ? num_pages * per_page : SIZE_MAX;
}

[[noreturn]] void refuse_table(size_t num_pages, size_t page_size, size_t live) {
  throw InvalidArgument("reservation of " + std::to_string(num_pages) + " pages of " + std::to_string(page_size) +
                        " bytes: expected a page table (16 bytes a page: " + std::to_string(table_bytes_of(num_pages)) +
                        " bytes of host memory) that fits, with the live reservations' " + std::to_string(live) +
                        " bytes, in a quarter of the machine's memory (" + std::to_string(table_budget()) +
                        " bytes); reserve less, or use larger pages (page_size)");
}
}  // namespace

void Reservation::TableBytes::check(size_t num_pages, size_t page_size) {
  size_t bytes = table_bytes_of(num_pages), live = g_table_bytes.load();
  if (bytes > table_budget() || live > table_budget() - bytes) refuse_table(num_pages, page_size, live);
}

Reservation::TableBytes::TableBytes(size_t num_pages, size_t page_size) : bytes_(table_bytes_of(num_pages)) {
  size_t live = g_table_bytes.fetch_add(bytes_);
  if (bytes_ > table_budget() || live > table_budget() - bytes_) {
    g_table_bytes.fetch_sub(bytes_);
    refuse_table(num_pages, page_size, live);
  }
}

Reservation::TableBytes::~TableBytes() { g_table_bytes.fetch_sub(bytes_); }

Reservation::Reservation(std::shared_ptr<PagePool> pool, uintptr_t base, size_t num_pages, bool owns_address)
    : pool_(std::move(pool)),
      table_bytes_(num_pages, pool_->page_size()),
      base_(base),
      page_size_(pool_->page_size()),
      owns_address_(owns_address),
      pages_(num_pages, kNoPage),
      pending_(num_pages, 0) {
  fork_register(this);
}

std::shared_ptr<Reservation> Reservation::create(std::shared_ptr<PagePool> pool, size_t bytes) {
  require(pool, "Reservation.create: pool")->origin().check();
  if (bytes == 0) throw InvalidArgument("reservation size must be > 0 bytes, got 0");
  size_t ps = pool->page_size();
  if (bytes > SIZE_MAX - (ps - 1))  // rounded up to whole pages it would wrap around to 0
    throw InvalidArgument("reservation size: expected at most " + std::to_string(SIZE_MAX - (ps - 1)) +
                          " bytes, got " + std::to_string(bytes));
  size_t num_pages = (bytes + ps - 1) / ps;
  TableBytes::check(num_pages, ps);  // before the address is reserved: the clearer error of the two
  uintptr_t base;
  {
    PagePool::Lock lock(*pool);
    ThreadBinding bound(pool->backend());
    base = pool->backend().reserve(num_pages * ps);
  }
  try {
    return std::shared_ptr<Reservation>(new Reservation(pool, base, num_pages, true));
  } catch (...) {  // its page table does not fit (TableBytes) or could not be allocated: the address goes back
    PagePool::Lock lock(*pool);
    ThreadBinding bound(pool->backend());
    pool->backend().release(base, num_pages * ps);
    throw;
  }
}

std::shared_ptr<Reservation> Reservation::adopt(std::shared_ptr<PagePool> pool, uintptr_t addr, size_t bytes) {
  require(pool, "Reservation.adopt: pool")->origin().check();
  size_t ps = pool->page_size();
  if (bytes == 0 || bytes % ps != 0 || addr % ps != 0)
    throw InvalidArgument("a range of " + std::to_string(bytes) + " bytes at " + hex(addr) +
                          " cannot be adopted: expected a non-empty range aligned to the pool's page size " +
                          std::to_string(ps));
  return std::shared_ptr<Reservation>(new Reservation(std::move(pool), addr, bytes / ps, false));
}

Reservation::~Reservation() {
  fork_unregister(this);
  if (origin_.forked()) {
    // A forked child only gives its view of the range back: the pages, the
    // pool and the driver are the parent's.
    if (owns_address_) pool_->backend().forget(base_, bytes());
    return;
  }
  // A destructor must not throw; the driver already reported any error
  // through the call that failed, or the process is shutting down.
  try {
    PagePool::Lock lock(*pool_);
    ThreadBinding bound(pool_->backend());
    try {
      release_all_locked();
    } catch (...) {
    }
    if (owns_address_) pool_->backend().release(base_, bytes());
  } catch (...) {
  }
}

void Reservation::check_usable(const char* what) const {
  if (closed_) throw InvalidArgument(std::string(what) + ": the reservation was closed (its cache was closed)");
  if (!address_alive_) throw InvalidArgument(std::string(what) + ": the reservation's address was already freed");
}

void Reservation::check_range(const char* what, size_t first, size_t count) const {
  if (first > pages_.size() || count > pages_.size() - first)
    throw InvalidArgument(std::string(what) + ": page range [" + std::to_string(first) + ", " +
                          std::to_string(first + count) + ") is outside the reservation's " +
                          std::to_string(pages_.size()) + " pages");
}

size_t Reservation::commit(size_t first, size_t count) {
  origin_.check();
  check_range("commit", first, count);
  PagePool::Lock lock(*pool_);
  check_usable("commit");
  Backend& backend = pool_->backend();
  ThreadBinding bound(backend);
  auto t0 = Clock::now();
  pool_->reap_locked(0);

  // A pending page that another range still maps (an alias the decommit
  // ended: a fork's shared prefix) is not revived, which would share it again
  // behind the caller's back: once its fence is done it is unmapped (which
  // frees no page and leaves available_locked() as it is), and the range gets
  // a page of its own there.
  std::vector<size_t> to_map, shared_pending;
  size_t revivable = 0;
  std::unordered_set<PageHandle> counted;  // revivable pages available_locked() counts as freed by the reap
  for (size_t p = first; p < first + count; ++p) {
    if (pages_[p] == kNoPage) {
      to_map.push_back(p);
    } else if (pending_[p] != 0 && pool_->mapped_elsewhere_locked(pages_[p])) {
      to_map.push_back(p);
      shared_pending.push_back(p);
    } else if (pending_[p] != 0) {
      ++revivable;
      if (pool_->frees_when_reaped_locked(pages_[p])) counted.insert(pages_[p]);
    }
  }
  if (to_map.empty() && revivable == 0) return 0;

  // Pages of this range that are still pending would count as available
  // twice: they come back to this range, not to the new pages.
  size_t available = pool_->available_locked();
  available = available > counted.size() ? available - counted.size() : 0;
  if (to_map.size() > available)
    throw OutOfPages("out of physical pages: commit of pages [" + std::to_string(first) + ", " +
                         std::to_string(first + count) + ") needs " + std::to_string(to_map.size()) +
                         " new page(s) of " + std::to_string(page_size_) + " bytes, " +
                         std::to_string(available) + " available",
                     to_map.size(), available);

  unmap_now_locked(shared_pending);

  // Revive decommits still waiting for their fence: the page never left.
  std::vector<size_t> revived;
  for (size_t p = first; p < first + count; ++p) {
    if (pages_[p] != kNoPage && pending_[p] != 0) {
      pending_[p] = 0;
      pool_->cancel_pending_locked(pages_[p]);
      ++num_committed_;
      revived.push_back(p);
    }
  }

  std::vector<bool> fresh;
  std::vector<PageHandle> handles;
  try {
    handles = pool_->acquire_locked(to_map.size(), fresh);
  } catch (const OutOfPages&) {
    // acquire_locked gives up only after waiting for every pending fence, the
    // revived pages' fences included: unmap them as the reap would have, so
    // the reservation is as it was.
    num_committed_ -= revived.size();
    unmap_uncounted_locked(revived);
    throw;
  }
  size_t mapped = 0;
  try {
    for (; mapped < to_map.size(); ++mapped) {
      backend.map(base_ + to_map[mapped] * page_size_, handles[mapped]);
      pages_[to_map[mapped]] = handles[mapped];
      ++pool_->counters_locked().map_calls;
    }
    // One set-access per contiguous run, not per page: fewer driver calls. On
    // fresh mappings the cost is mostly per page (~20 us on an H200, batched or
    // not: docs/benchmarks.md); re-applying access to mapped pages is ~0.25 us a page.
    for_each_run(to_map, [&](size_t run_first, size_t run_count) {
      backend.set_access(base_ + run_first * page_size_, run_count * page_size_);
      ++pool_->counters_locked().set_access_calls;
    });
    // cuMemCreate memory is not zeroed and garbage can be NaN; recycled pages
    // hold earlier KV values, which are finite.
    if (!backend.fresh_pages_are_zero())
      for (size_t i = 0; i < to_map.size(); ++i)
        if (fresh[i]) backend.zero(base_ + to_map[i] * page_size_, page_size_);
  } catch (...) {
    // Fresh pages go back as fresh: handed out later, they are zeroed first
    // (cuMemCreate memory may hold NaN); destroy_locked() drops the mark.
    for (size_t i = 0; i < handles.size(); ++i)
      if (fresh[i]) pool_->never_mapped_.insert(handles[i]);
    unmap_uncounted_locked(std::vector<size_t>(to_map.begin(), to_map.begin() + mapped));
    for (size_t i = mapped; i < handles.size(); ++i) pool_->release_locked(handles[i]);
    throw;
  }
  num_committed_ += to_map.size();
  pool_->counters_locked().commit_seconds += seconds_since(t0);
  return to_map.size() + revivable;
}

size_t Reservation::decommit(size_t first, size_t count, std::optional<uintptr_t> stream) {
  origin_.check();
  check_range("decommit", first, count);
  PagePool::Lock lock(*pool_);
  if (!address_alive_) return 0;
  Backend& backend = pool_->backend();
  ThreadBinding bound(backend);
  auto t0 = Clock::now();
  std::vector<size_t> pages;
  for (size_t p = first; p < first + count; ++p)
    if (pages_[p] != kNoPage && pending_[p] == 0) pages.push_back(p);
  if (pages.empty()) return 0;
  Fence fence = stream ? backend.record_fence(*stream) : 0;
  if (fence != 0) {
    std::vector<PageHandle> handles;
    handles.reserve(pages.size());
    for (size_t p : pages) {
      pending_[p] = fence;
      handles.push_back(pages_[p]);
    }
    pool_->add_pending_locked(weak_from_this(), fence, handles);
  } else {
    try {
      unmap_runs_locked(pages);
    } catch (...) {
      // A driver error part-way: the runs unmapped before it are decommitted, the rest stay committed.
      for (size_t p : pages) num_committed_ -= pages_[p] == kNoPage ? 1 : 0;
      throw;
    }
  }
  num_committed_ -= pages.size();
  pool_->counters_locked().decommit_seconds += seconds_since(t0);
  return pages.size();
}

size_t Reservation::alias(size_t first, Reservation& src, size_t src_first, size_t count) {
  origin_.check();
  check_range("alias", first, count);
  src.check_range("alias source", src_first, count);
  if (src.pool_ != pool_) throw InvalidArgument("alias: source and target reservations draw on different page pools");
  if (&src == this && first < src_first + count && src_first < first + count)
    throw InvalidArgument("alias: source and target page ranges overlap");
  PagePool::Lock lock(*pool_);
  check_usable("alias");
  src.check_usable("alias source");
  Backend& backend = pool_->backend();
  ThreadBinding bound(backend);
  auto t0 = Clock::now();
  std::vector<size_t> still_pending;  // target pages decommitted, their unmap waiting for a fence
  for (size_t i = 0; i < count; ++i) {
    if (src.pages_[src_first + i] == kNoPage || src.pending_[src_first + i] != 0)
      throw InvalidArgument("alias: source page " + std::to_string(src_first + i) + " is not committed");
    if (pages_[first + i] != kNoPage && pending_[first + i] == 0)
      throw InvalidArgument("alias: target page " + std::to_string(first + i) + " is already committed");
    if (pages_[first + i] != kNoPage) still_pending.push_back(first + i);
  }
  // A kernel queued before the decommit may still read those pages: wait for
  // it, then unmap them now, so the source's pages can be mapped there.
  unmap_now_locked(still_pending);
  std::vector<size_t> mapped;
  try {
    for (size_t i = 0; i < count; ++i) {
      PageHandle h = src.pages_[src_first + i];
      backend.map(base_ + (first + i) * page_size_, h);
      pool_->retain_locked(h);
      pages_[first + i] = h;
      mapped.push_back(first + i);
      ++pool_->counters_locked().map_calls;
    }
    for_each_run(mapped, [&](size_t run_first, size_t run_count) {
      backend.set_access(base_ + run_first * page_size_, run_count * page_size_);
      ++pool_->counters_locked().set_access_calls;
    });
  } catch (...) {
    unmap_uncounted_locked(mapped);
    throw;
  }
  num_committed_ += count;
  pool_->counters_locked().commit_seconds += seconds_since(t0);
  return count;
}

void Reservation::release_all() {
  origin_.check();
  PagePool::Lock lock(*pool_);
  ThreadBinding bound(pool_->backend());
  release_all_locked();
}

void Reservation::close() {
  origin_.check();
  PagePool::Lock lock(*pool_);
  ThreadBinding bound(pool_->backend());
  closed_ = true;  // even if the driver fails below: no commit after close
  // Before the unmaps below, so that no write ever meets the range unmapped (a backend whose range
  // queued device work may still read waits for it in retire; release_all_locked synchronizes anyway).
  if (address_alive_ && !retired_) retired_ = pool_->backend().retire(base_, bytes());
  release_all_locked();
}

void Reservation::release_all_locked() {
  if (!address_alive_) return;
  // Committed pages may still be read by queued kernels (pending ones wait
  // for their own fences in unmap_now_locked).
  if (num_committed_ > 0) pool_->backend().synchronize();
  std::vector<size_t> pages;
  for (size_t p = 0; p < pages_.size(); ++p)
    if (pages_[p] != kNoPage) pages.push_back(p);
  unmap_now_locked(pages);
}

void Reservation::unmap_now_locked(const std::vector<size_t>& pages) {
  if (pages.empty()) return;
  Backend& backend = pool_->backend();
  // From the destructor, a reap may already have destroyed a fence of ours: the
  // reservation's last reference went while the reap held the mutex, so it
  // found no owner to finish. Such a fence had completed; only queued ones are
  // waited for. (A live reservation's pending fences are all still queued: a
  // reap that pops one finishes its pages.)
  std::unordered_set<Fence> queued;
  for (const auto& batch : pool_->pending_) queued.insert(batch.fence);
  // Every wait before any change: a wait that throws (a driver error) leaves the pages as they were.
  std::unordered_set<Fence> waited;
  for (size_t p : pages) {
    Fence f = pending_[p];
    if (f != 0 && queued.count(f) && waited.insert(f).second) backend.fence_wait(f);  // the pool destroys it later
  }
  std::vector<char> counted(pages.size(), 0);  // counted in num_committed_ (not pending)
  for (size_t i = 0; i < pages.size(); ++i) {
    if (pending_[pages[i]] != 0) {
      pending_[pages[i]] = 0;
      pool_->cancel_pending_locked(pages_[pages[i]]);
    } else {
      counted[i] = 1;
    }
  }
  // A driver error part-way leaves the later runs mapped: those pages stay committed, counted as such.
  auto recount = [&] {
    for (size_t i = 0; i < pages.size(); ++i) {
      bool unmapped = pages_[pages[i]] == kNoPage;
      if (unmapped && counted[i]) --num_committed_;
      if (!unmapped && !counted[i]) ++num_committed_;
    }
  };
  try {
    unmap_runs_locked(pages);
  } catch (...) {
    recount();
    throw;
  }
  recount();
}

void Reservation::finish_pending_locked(Fence fence) {
  std::vector<size_t> pages;
  for (size_t p = 0; p < pages_.size(); ++p)
    if (pages_[p] != kNoPage && pending_[p] == fence) pages.push_back(p);
  for (size_t p : pages) {
    pending_[p] = 0;
    pool_->cancel_pending_locked(pages_[p]);
  }
  if (address_alive_) unmap_runs_locked(pages);
}

void Reservation::unmap_uncounted_locked(const std::vector<size_t>& pages) noexcept {
  try {
    unmap_runs_locked(pages);
  } catch (...) {
    // The caller is failing with an error of its own; a page this left mapped is committed, so counted.
    for (size_t p : pages) num_committed_ += pages_[p] != kNoPage ? 1 : 0;
  }
}

void Reservation::unmap_runs_locked(const std::vector<size_t>& pages) {
  Backend& backend = pool_->backend();
  for_each_run(pages, [&](size_t run_first, size_t run_count) {
    if (!retired_) backend.unmap(base_ + run_first * page_size_, run_count * page_size_);
    ++pool_->counters_locked().unmap_calls;
    for (size_t p = run_first; p < run_first + run_count; ++p) {
      pool_->release_locked(pages_[p]);
      pages_[p] = kNoPage;
    }
  });
}

void Reservation::on_address_freed() {
  PagePool::Lock lock(*pool_);
  try {
    ThreadBinding bound(pool_->backend());
    release_all_locked();
  } catch (...) {
  }
  address_alive_ = false;
}

void Reservation::privatize_after_fork() {
  if (origin_.forked() || !address_alive_) return;
  for (size_t p = 0; p < pages_.size(); ++p)
    if (pages_[p] != kNoPage) pool_->backend().make_private(base_ + p * page_size_, pages_[p]);
}

bool Reservation::is_committed(size_t page) {
  origin_.check();
  check_range("is_committed", page, 1);
  PagePool::Lock lock(*pool_);
  return pages_[page] != kNoPage && pending_[page] == 0;
}

size_t Reservation::num_committed() {
  origin_.check();
  PagePool::Lock lock(*pool_);
  return num_committed_;
}

std::vector<std::pair<size_t, size_t>> Reservation::inherited_ranges() {
  // No origin check: a forked child reads its own copy of the page table. Its fork handler
  // made every mapped page private (pending decommits included: they stay mapped in the child)
  // and released the pool mutex, and nothing else runs there.
  PagePool::Lock lock(*pool_);
  std::vector<size_t> pages;
  for (size_t p = 0; p < pages_.size(); ++p)
    if (pages_[p] != kNoPage) pages.push_back(p);
  std::vector<std::pair<size_t, size_t>> out;
  for_each_run(pages, [&](size_t f, size_t c) { out.emplace_back(f, c); });
  return out;
}

std::vector<std::pair<size_t, size_t>> Reservation::committed_ranges() {
  origin_.check();
  PagePool::Lock lock(*pool_);
  std::vector<size_t> pages;
  for (size_t p = 0; p < pages_.size(); ++p)
    if (pages_[p] != kNoPage && pending_[p] == 0) pages.push_back(p);
  std::vector<std::pair<size_t, size_t>> out;
  for_each_run(pages, [&](size_t f, size_t c) { out.emplace_back(f, c); });
  return out;
}

}  // namespace vkv
