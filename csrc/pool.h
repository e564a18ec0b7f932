// Layer 2: the physical page pool and the reservations that map its pages.
//
// One mutex per pool guards the pool and every reservation drawing on it, and
// serialises their driver calls, so the background committer and the Python
// thread can use them concurrently. The binding layer releases the GIL around
// every call into these classes, except PagePool::available(), which reads an
// atomic and never waits.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "backend.h"
#include "fork.h"

namespace vkv {

class Reservation;

struct PoolStats {
  size_t page_size = 0;
  size_t max_pages = 0;      // budget: pages that may exist at once
  size_t created_pages = 0;  // pages that exist now (mapped, free or pending)
  size_t free_pages = 0;     // created, mapped nowhere, ready to hand out
  size_t mapped_pages = 0;   // handed out to reservations
  size_t pending_pages = 0;  // decommitted, waiting for a fence before unmap, and free then (no other range maps them)
  uint64_t pages_created_total = 0;
  uint64_t pages_destroyed_total = 0;
  uint64_t map_calls = 0;
  uint64_t set_access_calls = 0;
  uint64_t unmap_calls = 0;
  double commit_seconds = 0;     // time spent mapping (commit and alias)
  double decommit_seconds = 0;   // time spent unmapping
};

// Physical pages, created up to a budget and recycled without re-creating
// (the paper's reserve_physical_pages). Pages are reference counted by the
// number of places they are mapped, so one page can back several requests.
class PagePool : public std::enable_shared_from_this<PagePool> {
 public:
  PagePool(std::shared_ptr<Backend> backend, size_t max_pages);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  Backend& backend() { return *backend_; }
  size_t page_size() const { return backend_->page_size(); }

  // Creates free pages until `num_pages` exist (capped by the budget).
  // Returns the number of pages that exist afterwards.
  size_t prefill(size_t num_pages);
  // Changes the budget. Shrinking destroys free pages (returning them to the
  // driver) until at most `max_pages` exist or no free page is left; pages in
  // use stay until released, and no new page is created while over budget.
  void set_max_pages(size_t max_pages);
  // Destroys free pages until at most `keep_free` are left; returns how many
  // were destroyed.
  size_t trim(size_t keep_free);
  // Finishes decommits whose fences completed (without waiting).
  void reap();
  PoolStats stats();
  // Pages a commit can have now: free, creatable within the budget, or
  // pending a fence (stats().free_pages + creatable + pending_pages).
  // Lock-free, so a reader never waits for a commit's driver calls: a
  // snapshot published by the last locked section to end. It is exact while
  // no other thread is inside the pool and may be stale by the sections in
  // flight, which is harmless because every commit re-checks under the mutex
  // and throws OutOfPages, changing nothing, when short.
  size_t available() const;

  // fork() support (fork.h): the prepare handler holds every pool's mutex
  // while fork() runs, so the child never sees a half-done commit.
  void lock_for_fork() { mu_.lock(); }
  void unlock_after_fork() { mu_.unlock(); }
  // Whether this pool was inherited from the parent of a fork.
  bool forked() const { return origin_.forked(); }
  const Origin& origin() const { return origin_; }

 private:
  // The locking protocol, shared with Reservation only: one mutex guards the
  // pool and every reservation drawing on it, and serialises driver calls.
  // Lock is the only way in (besides the fork handlers, which change nothing):
  // it publishes available_locked() when the section ends, normally or by an
  // exception, so no path that changes free_, created_, max_pages_ or
  // pending_pages_ can leave available() stale.
  friend class Reservation;
  class Lock {
   public:
    explicit Lock(PagePool& pool) : pool_(pool), lock_(pool.mu_) {}
    // The store happens under the mutex, so stores are ordered as the sections
    // are and the last one wins. The owners reap_locked() held die only after
    // the unlock: a Reservation's destructor takes this mutex itself (another
    // thread may have dropped every other reference meanwhile).
    ~Lock() {
      pool_.publish_available_locked();
      std::vector<std::shared_ptr<Reservation>> owners;
      owners.swap(pool_.reaped_owners_);
      lock_.unlock();
    }
    Lock(const Lock&) = delete;
    Lock& operator=(const Lock&) = delete;

   private:
    PagePool& pool_;
    std::unique_lock<std::mutex> lock_;
  };
  // Pages that can be had now or by waiting for pending decommits.
  size_t available_locked() const;
  // Stores available_locked() for available() (with the mutex held).
  void publish_available_locked() noexcept { available_.store(available_locked(), std::memory_order_release); }
  // Hands out `n` pages (reaping or waiting for pending decommits, creating
  // new pages within the budget). Throws OutOfPages, changing nothing, when
  // fewer than `n` can be had. `fresh` gets the pages that were never mapped.
  std::vector<PageHandle> acquire_locked(size_t n, std::vector<bool>& fresh);
  void retain_locked(PageHandle page);   // one more mapping of a page in use
  void release_locked(PageHandle page);  // one mapping fewer; at zero the page is free
  // A decommit of these mappings waits for `fence` (one entry per mapping).
  void add_pending_locked(std::weak_ptr<Reservation> owner, Fence fence, const std::vector<PageHandle>& pages);
  // One pending mapping of `page` revived or about to be unmapped.
  void cancel_pending_locked(PageHandle page);
  // Whether `page` is free once its pending unmaps are done: every mapping of
  // it is pending (an aliased page another range still maps frees nothing).
  bool frees_when_reaped_locked(PageHandle page) const;
  // Whether `page` has a mapping besides the one asking (pending or not).
  bool mapped_elsewhere_locked(PageHandle page) const;
  struct PageUse;
  template <typename Change>
  void change_use_locked(PageHandle page, Change change);
  void reap_locked(size_t wait_until_free);
  PoolStats& counters_locked() { return counters_; }
  void destroy_locked(PageHandle page);

  struct PendingBatch {
    Fence fence;
    std::weak_ptr<Reservation> owner;
  };

  Origin origin_;
  std::shared_ptr<Backend> backend_;
  std::mutex mu_;
  size_t max_pages_;
  std::vector<PageHandle> free_;
  std::unordered_set<PageHandle> never_mapped_;
  struct PageUse {  // a page in use: how it is mapped
    size_t maps = 0;     // times mapped (ranges sharing it after fork/alias)
    size_t pending = 0;  // of those, decommits waiting for a fence
  };
  std::unordered_map<PageHandle, PageUse> mappings_;  // pages in use
  size_t created_ = 0;
  size_t pending_pages_ = 0;  // pages whose every mapping is pending: free once reaped
  std::deque<PendingBatch> pending_;
  std::vector<std::shared_ptr<Reservation>> reaped_owners_;  // released by ~Lock, unlocked
  PoolStats counters_;
  // available_locked() as of the last locked section (see Lock): available()
  // reads it without the mutex. A plain store of the recomputed sum, never an
  // increment, so it cannot drift from the counters or wrap below zero.
  std::atomic<size_t> available_{0};
};

// A contiguous virtual range of `num_pages` pages whose pages are committed
// (mapped to physical pages of `pool`) and decommitted on demand. Releases
// everything in its destructor.
class Reservation : public std::enable_shared_from_this<Reservation> {
 public:
  // Reserves a new virtual range of at least `bytes` (rounded up to pages).
  static std::shared_ptr<Reservation> create(std::shared_ptr<PagePool> pool, size_t bytes);
  // Takes over `bytes` at `addr`, a range someone else reserved (the
  // pluggable allocator: allocator_adopt); the address stays theirs.
  static std::shared_ptr<Reservation> adopt(std::shared_ptr<PagePool> pool, uintptr_t addr, size_t bytes);
  ~Reservation();
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;

  uintptr_t base() const { return base_; }
  size_t num_pages() const { return pages_.size(); }
  size_t bytes() const { return pages_.size() * page_size_; }
  size_t page_size() const { return page_size_; }
  PagePool& pool() { return *pool_; }

  // Maps pages [first, first + count); pages already committed are left alone.
  // Returns the number of pages newly committed. All or nothing: on
  // OutOfPages or a driver error, nothing changed.
  size_t commit(size_t first, size_t count);
  // Decommits pages [first, first + count). With a stream, the unmap waits
  // for a fence recorded there now (the pages are reusable once the work
  // queued so far is done); without one, the pages are unmapped at once, and
  // the caller guarantees no queued work reads them. Returns pages decommitted.
  size_t decommit(size_t first, size_t count, std::optional<uintptr_t> stream);
  // Maps the pages committed at [src_first, src_first + count) of `src` also at
  // [first, first + count) here (both stay valid; writes through one are seen
  // through the other). Target pages must be uncommitted.
  size_t alias(size_t first, Reservation& src, size_t src_first, size_t count);
  // Decommits everything now, waiting for pending fences (and, on CUDA, for
  // the device: a kernel may still read the pages).
  void release_all();
  // release_all, after which commits are refused: the end of a cache. The
  // range stays reserved (host: it reads as zeros and takes writes, see
  // Backend::retire) until the last owner of the reservation drops it.
  void close();
  bool closed() const { return closed_.load(); }
  // Whether this reservation was inherited from the parent of a fork.
  bool forked() const { return origin_.forked(); }

  bool is_committed(size_t page);
  size_t num_committed();
  std::vector<std::pair<size_t, size_t>> committed_ranges();  // [(first, count)]
  // Pages mapped in this process, pending decommits included, read in any process (a forked
  // child's writes are checked against it; committed_ranges() refuses there).
  std::vector<std::pair<size_t, size_t>> inherited_ranges();

  // The allocator freed our address: forget every mapping without touching it.
  void on_address_freed();
  // In the child of a fork, with the pool's mutex held by the fork handler:
  // the committed pages become copy-on-write (Backend::make_private). Does
  // nothing for a reservation inherited by an earlier fork (already private).
  void privatize_after_fork();

 private:
  friend class PagePool;
  // With the pool mutex held: unmaps the pages still pending on `fence`.
  void finish_pending_locked(Fence fence);
  Reservation(std::shared_ptr<PagePool> pool, uintptr_t base, size_t num_pages, bool owns_address);
  void check_range(const char* what, size_t first, size_t count) const;
  // Unmaps and releases `pages`, one backend call per contiguous run. A backend error part-way leaves
  // the failed run and those after it mapped (pages_ unchanged); the caller recounts num_committed_.
  void unmap_runs_locked(const std::vector<size_t>& pages);
  // The same on an error path, for pages not counted in num_committed_: never throws; a page it
  // leaves mapped is counted as committed.
  void unmap_uncounted_locked(const std::vector<size_t>& pages) noexcept;
  // With the pool mutex held: unmaps `pages` (sorted, each mapped) now. A
  // pending page's decommit ends early: its fence is waited for first (a
  // kernel queued before the decommit may still read the page); a committed
  // page is decommitted.
  void unmap_now_locked(const std::vector<size_t>& pages);
  void release_all_locked();
  void check_usable(const char* what) const;  // with the pool mutex held

  // The host memory of a reservation's page table (pages_ and pending_: 16 bytes a page), counted
  // over every live reservation of the process against a quarter of the machine's memory. On CUDA's
  // 2 MiB pages a table is small (the 128 TiB address-space limit takes 1 GiB), but 4 KiB host pages
  // under a large capacity asked for hundreds of GiB: the kernel's OOM killer ended the process while
  // the vectors were filled. Now such a reservation is refused with InvalidArgument before.
  class TableBytes {
   public:
    // Throws InvalidArgument unless a table of `num_pages` fits now.
    static void check(size_t num_pages, size_t page_size);
    explicit TableBytes(size_t num_pages, size_t page_size);
    ~TableBytes();
    TableBytes(const TableBytes&) = delete;
    TableBytes& operator=(const TableBytes&) = delete;

   private:
    size_t bytes_;
  };

  Origin origin_;
  std::shared_ptr<PagePool> pool_;
  TableBytes table_bytes_;  // before pages_ and pending_: checked before they are allocated
  uintptr_t base_;
  size_t page_size_;
  bool owns_address_;
  bool address_alive_ = true;
  bool retired_ = false;  // close() gave the whole range to Backend::retire: the pages need no unmap
  std::atomic<bool> closed_{false};
  static constexpr PageHandle kNoPage = ~PageHandle{0};
  std::vector<PageHandle> pages_;  // physical page mapped at each virtual page, or kNoPage
  std::vector<Fence> pending_;     // fence a mapped page waits on before unmap; 0 = committed
  size_t num_committed_ = 0;
};

}  // namespace vkv
