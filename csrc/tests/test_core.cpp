// Standalone tests of the C++ core on the host backend: no Python, no GPU.
//
//   g++ -std=c++17 -fsanitize=thread -g -O1 -Icsrc csrc/tests/test_core.cpp
//       $(ls csrc/*.cpp | grep -v bindings.cpp) -ldl -pthread -o test_core
//   TSAN_OPTIONS=halt_on_error=1 ./test_core [--iterations N]
//
// Exits 0 when every check passed, 1 (after printing the failed check) when one
// failed. tests/test_cpp_core.py builds and runs it under ThreadSanitizer.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <mutex>
#include <condition_variable>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "allocator.h"
#include "backend.h"
#include "committer.h"
#include "errors.h"
#include "pool.h"
#include "slots.h"

using namespace vkv;

namespace {

int g_checks = 0;

#define CHECK(cond)                                                                     \
  do {                                                                                  \
    ++g_checks;                                                                         \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "FAILED: %s:%d: CHECK(%s)\n", __FILE__, __LINE__, #cond);    \
      return 1;                                                                         \
    }                                                                                   \
  } while (0)

#define CHECK_EQ(a, b)                                                                                  \
  do {                                                                                                  \
    ++g_checks;                                                                                         \
    auto va_ = (a);                                                                                     \
    auto vb_ = (b);                                                                                     \
    if (!(va_ == vb_)) {                                                                                \
      std::fprintf(stderr, "FAILED: %s:%d: CHECK_EQ(%s, %s): %lld != %lld\n", __FILE__, __LINE__, #a, #b, \
                   static_cast<long long>(va_), static_cast<long long>(vb_));                           \
      return 1;                                                                                         \
    }                                                                                                   \
  } while (0)

// Runs `stmt` and checks that it throws exactly `Exc`.
#define CHECK_THROWS(Exc, stmt)                                                                    \
  do {                                                                                             \
    ++g_checks;                                                                                    \
    bool thrown_ = false;                                                                          \
    try {                                                                                          \
      stmt;                                                                                        \
    } catch (const Exc&) {                                                                         \
      thrown_ = true;                                                                              \
    } catch (const std::exception& e_) {                                                           \
      std::fprintf(stderr, "FAILED: %s:%d: %s threw another exception: %s\n", __FILE__, __LINE__, \
                   #stmt, e_.what());                                                              \
      return 1;                                                                                    \
    }                                                                                              \
    if (!thrown_) {                                                                                \
      std::fprintf(stderr, "FAILED: %s:%d: %s did not throw %s\n", __FILE__, __LINE__, #stmt, #Exc); \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

#define RUN(test)                                                  \
  do {                                                             \
    std::printf("%-52s", #test);                                   \
    std::fflush(stdout);                                           \
    int rc_ = test();                                              \
    std::printf("%s\n", rc_ == 0 ? "ok" : "FAILED");               \
    if (rc_ != 0) return rc_;                                      \
  } while (0)

constexpr size_t kPage = 4096;  // one OS page: keeps the tests small and fast
constexpr uintptr_t kStream = 1;  // any non-zero "stream": host fences ignore it

// A pipe for probing addresses from the kernel's side: read(2) and write(2)
// fail with EFAULT on an address they may not access instead of faulting.
int* probe_pipe() {
  static int fds[2] = {-1, -1};
  if (fds[0] < 0 && pipe(fds) != 0) fds[0] = fds[1] = -1;
  return fds;
}

// Whether the byte at `addr` can be read (committed, or a read-only zero page).
bool readable(uintptr_t addr) {
  int* fds = probe_pipe();
  if (write(fds[1], reinterpret_cast<const void*>(addr), 1) != 1) return false;
  char c;
  return read(fds[0], &c, 1) == 1;
}

// Whether the byte at `addr` can be written: its page is committed. The byte
// keeps its value.
bool writable(uintptr_t addr) {
  int* fds = probe_pipe();
  char c = 0;
  if (readable(addr)) c = *reinterpret_cast<volatile char*>(addr);
  if (write(fds[1], &c, 1) != 1) return false;
  if (read(fds[0], reinterpret_cast<void*>(addr), 1) == 1) return true;
  if (read(fds[0], &c, 1) != 1) return false;  // drains the byte left in the pipe
  return false;
}

// A page that is not committed reads as zeros and cannot be written (the
// host backend's default), or cannot even be read (strict mode).
bool reads_zero_only(const Reservation& r, size_t page) {
  uintptr_t addr = r.base() + page * r.page_size();
  if (!readable(addr) || writable(addr)) return false;
  const volatile uint8_t* p = reinterpret_cast<const volatile uint8_t*>(addr);
  for (size_t i = 0; i < r.page_size(); ++i)
    if (p[i] != 0) return false;
  return true;
}

uint8_t* at(const Reservation& r, size_t page, size_t offset = 0) {
  return reinterpret_cast<uint8_t*>(r.base() + page * r.page_size() + offset);
}

void fill(const Reservation& r, size_t page, uint8_t value) { std::memset(at(r, page), value, r.page_size()); }

// True when every byte of the page holds `value`.
bool holds(const Reservation& r, size_t page, uint8_t value) {
  const uint8_t* p = at(r, page);
  for (size_t i = 0; i < r.page_size(); ++i)
    if (p[i] != value) return false;
  return true;
}

std::shared_ptr<PagePool> make_pool(size_t max_pages) {
  return std::make_shared<PagePool>(make_host_backend(kPage), max_pages);
}

// ------------------------------------------------------------------ semantics

// available()'s lock-free snapshot equals the counters it mirrors (exact
// when no other thread is inside the pool).
bool available_matches(PagePool& pool) {
  PoolStats s = pool.stats();
  size_t creatable = s.created_pages < s.max_pages ? s.max_pages - s.created_pages : 0;
  return pool.available() == s.free_pages + creatable + s.pending_pages;
}

int test_reserve_commit_decommit() {
  auto pool = make_pool(16);
  CHECK_THROWS(InvalidArgument, Reservation::create(pool, 0));
  auto res = Reservation::create(pool, 8 * kPage - 100);  // rounded up to 8 pages
  CHECK_EQ(res->num_pages(), 8u);
  CHECK_EQ(res->bytes(), 8 * kPage);
  CHECK_EQ(res->base() % kPage, 0u);
  CHECK_EQ(res->num_committed(), 0u);
  for (size_t p = 0; p < 8; ++p) CHECK(!writable(res->base() + p * kPage));

  // Commit a contiguous run: one map per page, one set-access for the run.
  CHECK_EQ(res->commit(2, 3), 3u);
  PoolStats s = pool->stats();
  CHECK_EQ(s.map_calls, 3u);
  CHECK_EQ(s.set_access_calls, 1u);
  CHECK_EQ(s.mapped_pages, 3u);
  CHECK_EQ(s.created_pages, 3u);
  CHECK_EQ(res->num_committed(), 3u);
  CHECK(!res->is_committed(1) && res->is_committed(2) && res->is_committed(4) && !res->is_committed(5));
  CHECK(!writable(res->base() + 1 * kPage) && writable(res->base() + 2 * kPage) && !writable(res->base() + 5 * kPage));
  for (size_t p = 2; p < 5; ++p) CHECK(holds(*res, p, 0));  // fresh pages read as zeros
  auto ranges = res->committed_ranges();
  CHECK_EQ(ranges.size(), 1u);
  CHECK_EQ(ranges[0].first, 2u);
  CHECK_EQ(ranges[0].second, 3u);

  // Committing again is a no-op; an overlapping commit maps only the new pages,
  // and a commit with holes batches set-access per contiguous run.
  CHECK_EQ(res->commit(2, 3), 0u);
  CHECK_EQ(res->commit(0, 7), 4u);  // pages 0, 1, 5, 6: runs [0,2) and [5,7)
  s = pool->stats();
  CHECK_EQ(s.map_calls, 7u);
  CHECK_EQ(s.set_access_calls, 3u);
  CHECK_EQ(res->num_committed(), 7u);

  for (size_t p = 0; p < 7; ++p) fill(*res, p, static_cast<uint8_t>(0x10 + p));
  // Decommit the middle: its pages go back to the pool, the rest is intact.
  CHECK_EQ(res->decommit(2, 2, std::nullopt), 2u);
  CHECK_EQ(res->decommit(2, 2, std::nullopt), 0u);
  CHECK(reads_zero_only(*res, 2) && reads_zero_only(*res, 3));
  s = pool->stats();
  CHECK_EQ(s.free_pages, 2u);
  CHECK_EQ(s.mapped_pages, 5u);
  CHECK_EQ(s.unmap_calls, 1u);
  for (size_t p : {0, 1, 4, 5, 6}) CHECK(holds(*res, p, static_cast<uint8_t>(0x10 + p)));
  ranges = res->committed_ranges();
  CHECK_EQ(ranges.size(), 2u);
  CHECK(ranges[0] == std::make_pair(size_t{0}, size_t{2}));
  CHECK(ranges[1] == std::make_pair(size_t{4}, size_t{3}));

  // Recycling: no page is created, the recycled pages are not re-zeroed.
  CHECK_EQ(res->commit(7, 1), 1u);
  s = pool->stats();
  CHECK_EQ(s.created_pages, 7u);
  CHECK_EQ(s.pages_created_total, 7u);
  CHECK_EQ(s.free_pages, 1u);

  // Bad ranges are rejected before anything changes.
  CHECK_THROWS(InvalidArgument, res->commit(7, 2));
  CHECK_THROWS(InvalidArgument, res->commit(9, 0));
  CHECK_THROWS(InvalidArgument, res->decommit(0, 9, std::nullopt));
  CHECK_THROWS(InvalidArgument, res->is_committed(8));
  CHECK_EQ(res->num_committed(), 6u);

  // release_all and destruction hand every page back; trim returns them to the OS.
  res->release_all();
  CHECK_EQ(res->num_committed(), 0u);
  CHECK_EQ(pool->stats().free_pages, 7u);
  res.reset();
  CHECK_EQ(pool->trim(2), 5u);
  s = pool->stats();
  CHECK_EQ(s.created_pages, 2u);
  CHECK_EQ(s.pages_destroyed_total, 5u);
  return 0;
}

// Pages that are not committed are read-only zero pages, or PROT_NONE in
// strict mode (TORCH_VKV_DEBUG=1 when the range is reserved); close() returns
// the pages and refuses commits, leaving the range readable as zeros and
// writable (stale views must not fault), its writes reaching no pool page.
int test_unbacked_pages_and_strict_mode() {
  auto pool = make_pool(8);
  unsetenv("TORCH_VKV_DEBUG");
  auto res = Reservation::create(pool, 4 * kPage);
  for (size_t p = 0; p < 4; ++p) CHECK(reads_zero_only(*res, p));
  CHECK_EQ(res->commit(1, 2), 2u);
  fill(*res, 1, 0x11);
  CHECK(writable(res->base() + kPage) && holds(*res, 1, 0x11));
  CHECK(reads_zero_only(*res, 0) && reads_zero_only(*res, 3));
  CHECK_EQ(res->decommit(1, 1, std::nullopt), 1u);
  CHECK(reads_zero_only(*res, 1));  // the zero mapping is back, not the old bytes

  setenv("TORCH_VKV_DEBUG", "1", 1);
  auto strict = Reservation::create(pool, 2 * kPage);
  CHECK_EQ(res->decommit(2, 1, std::nullopt), 1u);
  CHECK(reads_zero_only(*res, 2));  // strictness is the reservation's, fixed when it was made
  CHECK(!readable(strict->base()) && !readable(strict->base() + kPage));
  CHECK_EQ(strict->commit(0, 1), 1u);
  CHECK(writable(strict->base()) && holds(*strict, 0, 0));
  CHECK_EQ(strict->decommit(0, 1, std::nullopt), 1u);
  CHECK(!readable(strict->base()));
  setenv("TORCH_VKV_DEBUG", "0", 1);  // "0" is off
  auto lax = Reservation::create(pool, kPage);
  CHECK(reads_zero_only(*lax, 0));
  unsetenv("TORCH_VKV_DEBUG");

  CHECK_EQ(res->commit(0, 4), 4u);
  fill(*res, 3, 0x33);
  CHECK(!res->closed());
  res->close();
  CHECK(res->closed());
  CHECK_EQ(res->num_committed(), 0u);
  for (size_t p = 0; p < 4; ++p) CHECK(holds(*res, p, 0) && writable(res->base() + p * kPage));
  CHECK_THROWS(InvalidArgument, res->commit(0, 1));
  CHECK_EQ(res->decommit(0, 4, std::nullopt), 0u);
  res->close();  // again: nothing to do
  CHECK_EQ(pool->stats().mapped_pages, 0u);
  auto next = Reservation::create(pool, 4 * kPage);
  CHECK_EQ(next->commit(0, 4), 4u);  // the pages res gave back
  for (size_t p = 0; p < 4; ++p) fill(*next, p, 0x55);
  fill(*res, 3, 0x44);  // a stale write after close
  CHECK(holds(*res, 3, 0x44));
  for (size_t p = 0; p < 4; ++p) CHECK(holds(*next, p, 0x55));
  // Strict mode keeps faulting after close, as CUDA does on freed memory.
  CHECK_EQ(strict->commit(0, 2), 2u);
  strict->close();
  CHECK(!readable(strict->base()) && !readable(strict->base() + kPage));
  return 0;
}

int test_pool_budget_prefill_and_shrink() {
  auto pool = make_pool(4);
  CHECK_EQ(pool->prefill(10), 4u);  // capped by the budget
  PoolStats s = pool->stats();
  CHECK_EQ(s.free_pages, 4u);
  CHECK_EQ(s.max_pages, 4u);
  auto res = Reservation::create(pool, 6 * kPage);
  CHECK_EQ(res->commit(0, 3), 3u);
  CHECK_EQ(pool->stats().pages_created_total, 4u);  // prefilled pages were used
  for (size_t p = 0; p < 3; ++p) CHECK(holds(*res, p, 0));  // prefilled pages are zeroed when first mapped

  // Shrinking destroys free pages now, pages in use when released.
  pool->set_max_pages(1);
  s = pool->stats();
  CHECK_EQ(s.created_pages, 3u);
  CHECK_EQ(s.free_pages, 0u);
  CHECK_EQ(res->decommit(0, 3, std::nullopt), 3u);
  s = pool->stats();
  CHECK_EQ(s.created_pages, 1u);
  CHECK_EQ(s.free_pages, 1u);
  CHECK_THROWS(OutOfPages, res->commit(0, 2));
  CHECK(available_matches(*pool));
  // Growing again creates pages on demand.
  pool->set_max_pages(6);
  CHECK_EQ(pool->available(), 6u);
  CHECK_EQ(res->commit(0, 6), 6u);
  CHECK_EQ(pool->stats().created_pages, 6u);
  CHECK_EQ(pool->available(), 0u);
  CHECK_EQ(res->decommit(0, 2, std::nullopt), 2u);
  CHECK_EQ(pool->trim(1), 1u);
  CHECK_EQ(pool->available(), 2u);  // one free page, one creatable
  CHECK(available_matches(*pool));
  return 0;
}

int test_alias() {
  auto pool = make_pool(8);
  auto a = Reservation::create(pool, 4 * kPage);
  auto b = Reservation::create(pool, 4 * kPage);
  CHECK_EQ(a->commit(0, 3), 3u);
  fill(*a, 0, 0xA0);
  fill(*a, 1, 0xA1);
  fill(*a, 2, 0xA2);

  // b's pages [1, 3) show a's pages [0, 2): same physical pages, no new ones.
  CHECK_EQ(b->alias(1, *a, 0, 2), 2u);
  PoolStats s = pool->stats();
  CHECK_EQ(s.mapped_pages, 3u);
  CHECK_EQ(s.created_pages, 3u);
  CHECK_EQ(b->num_committed(), 2u);
  CHECK(holds(*b, 1, 0xA0) && holds(*b, 2, 0xA1));
  // Writes through either alias are seen through the other.
  fill(*b, 1, 0xB1);
  CHECK(holds(*a, 0, 0xB1));
  *at(*a, 1, 123) = 0x5A;
  CHECK_EQ(*at(*b, 2, 123), 0x5A);

  // Alias errors: committed target, uncommitted source, overlap with itself,
  // out of range. Nothing changes.
  CHECK_THROWS(InvalidArgument, b->alias(2, *a, 2, 1));  // target page 2 committed
  CHECK_THROWS(InvalidArgument, b->alias(0, *a, 3, 1));  // source page 3 not committed
  CHECK_THROWS(InvalidArgument, a->alias(1, *a, 0, 2));  // overlapping self-alias
  CHECK_THROWS(InvalidArgument, b->alias(3, *a, 0, 2));  // target out of range
  CHECK_EQ(b->num_committed(), 2u);
  CHECK_EQ(pool->stats().map_calls, 5u);
  // A different pool's reservation cannot be aliased.
  auto other_pool = make_pool(2);
  auto c = Reservation::create(other_pool, 2 * kPage);
  CHECK_THROWS(InvalidArgument, c->alias(0, *a, 0, 1));

  // A page stays alive while any alias maps it.
  CHECK_EQ(a->decommit(0, 2, std::nullopt), 2u);
  s = pool->stats();
  CHECK_EQ(s.mapped_pages, 3u);
  CHECK_EQ(s.free_pages, 0u);
  CHECK(holds(*b, 1, 0xB1));
  CHECK_EQ(*at(*b, 2, 123), 0x5A);
  CHECK(!writable(a->base()));
  CHECK_EQ(b->decommit(1, 2, std::nullopt), 2u);
  s = pool->stats();
  CHECK_EQ(s.mapped_pages, 1u);
  CHECK_EQ(s.free_pages, 2u);

  // Destroying the source leaves the alias valid.
  auto d = Reservation::create(pool, kPage);
  CHECK_EQ(d->alias(0, *a, 2, 1), 1u);
  a.reset();
  CHECK(holds(*d, 0, 0xA2));
  CHECK_EQ(pool->stats().mapped_pages, 1u);
  d.reset();
  CHECK_EQ(pool->stats().mapped_pages, 0u);
  CHECK_EQ(pool->stats().free_pages, 3u);
  return 0;
}

int test_out_of_pages_changes_nothing() {
  auto pool = make_pool(4);
  auto a = Reservation::create(pool, 4 * kPage);
  auto b = Reservation::create(pool, 4 * kPage);
  CHECK_EQ(a->commit(0, 3), 3u);
  for (size_t p = 0; p < 3; ++p) fill(*a, p, static_cast<uint8_t>(0x30 + p));
  PoolStats before = pool->stats();

  bool thrown = false;
  try {
    b->commit(0, 2);  // needs 2, 1 left
  } catch (const OutOfPages& e) {
    thrown = true;
    CHECK_EQ(e.requested, 2u);
    CHECK_EQ(e.available, 1u);
    CHECK(std::string(e.what()).find("out of physical pages") != std::string::npos);
  }
  CHECK(thrown);
  // Nothing changed: no page of b, the same counters, a's data intact.
  PoolStats after = pool->stats();
  CHECK_EQ(b->num_committed(), 0u);
  CHECK(!writable(b->base()) && !writable(b->base() + kPage));
  CHECK_EQ(after.map_calls, before.map_calls);
  CHECK_EQ(after.created_pages, before.created_pages);
  CHECK_EQ(after.free_pages, before.free_pages);
  CHECK_EQ(after.mapped_pages, before.mapped_pages);
  CHECK_EQ(pool->available(), 1u);
  for (size_t p = 0; p < 3; ++p) CHECK(holds(*a, p, static_cast<uint8_t>(0x30 + p)));

  // A commit overlapping committed pages needs only the new ones, and fails as
  // a whole when they are not there.
  CHECK_EQ(b->commit(3, 1), 1u);  // the last page
  CHECK_THROWS(OutOfPages, a->commit(2, 2));
  CHECK_EQ(a->num_committed(), 3u);
  CHECK(!a->is_committed(3));

  // Through the committer: the ticket's error is rethrown by wait(), the jobs
  // after the failed one are skipped, and the failed job changed nothing.
  Committer committer;
  uint64_t t = committer.submit({{b, 0, 1}, {a, 3, 1}});
  CHECK_THROWS(OutOfPages, committer.wait(t));
  CHECK(committer.done(t));
  CHECK_EQ(pool->available(), 0u);  // published by the committer's failed section, read here
  CHECK_EQ(b->num_committed(), 1u);
  CHECK_EQ(a->num_committed(), 3u);
  CHECK_THROWS(InvalidArgument, committer.wait(t + 100));  // unknown ticket

  // After a decommit the same commit succeeds through the committer.
  CHECK_EQ(a->decommit(0, 1, std::nullopt), 1u);
  t = committer.submit({{b, 0, 1}});
  committer.wait(t);
  CHECK(b->is_committed(0) && holds(*b, 0, 0x30));  // recycled page keeps its bytes
  CHECK_EQ(committer.pages_committed(), 1u);
  return 0;
}

int test_fences_keep_pages_mapped() {
  auto pool = make_pool(4);
  Backend& backend = pool->backend();
  auto a = Reservation::create(pool, 4 * kPage);
  CHECK_EQ(a->commit(0, 4), 4u);
  for (size_t p = 0; p < 4; ++p) fill(*a, p, static_cast<uint8_t>(0x40 + p));

  host_hold_fences(backend, true);
  // Ordered decommit: the pages stop counting as committed at once, but stay
  // mapped (and readable by "kernels still running") until the fence is done.
  CHECK_EQ(a->decommit(0, 2, kStream), 2u);
  PoolStats s = pool->stats();
  CHECK_EQ(s.pending_pages, 2u);
  CHECK_EQ(s.mapped_pages, 4u);
  CHECK_EQ(s.unmap_calls, 0u);
  CHECK_EQ(pool->available(), 2u);  // pending pages count: a commit can wait for them
  CHECK_EQ(a->num_committed(), 2u);
  CHECK(!a->is_committed(0) && !a->is_committed(1));
  CHECK(writable(a->base()) && holds(*a, 0, 0x40) && holds(*a, 1, 0x41));
  pool->reap();  // the fence is still pending: nothing happens
  CHECK_EQ(pool->stats().pending_pages, 2u);
  CHECK(holds(*a, 1, 0x41));

  // Re-committing a pending page revives it: same physical page, no map call.
  CHECK_EQ(a->commit(1, 1), 1u);
  s = pool->stats();
  CHECK_EQ(s.pending_pages, 1u);
  CHECK_EQ(s.map_calls, 4u);
  CHECK_EQ(pool->available(), 1u);
  CHECK(a->is_committed(1) && holds(*a, 1, 0x41));

  // Releasing the fences lets the next reap unmap the remaining pending page.
  host_hold_fences(backend, false);
  pool->reap();
  s = pool->stats();
  CHECK_EQ(s.pending_pages, 0u);
  CHECK_EQ(s.mapped_pages, 3u);
  CHECK_EQ(s.free_pages, 1u);
  CHECK_EQ(s.unmap_calls, 1u);
  CHECK(!writable(a->base()));
  CHECK(a->is_committed(1) && holds(*a, 1, 0x41));  // the revived page stayed

  // A commit that needs a page held by a pending fence waits for it (the host
  // backend's wait releases a held fence, as a finished kernel would).
  host_hold_fences(backend, true);
  auto b = Reservation::create(pool, 2 * kPage);
  CHECK_EQ(b->commit(0, 1), 1u);  // takes the free page
  CHECK_EQ(a->decommit(2, 2, kStream), 2u);
  CHECK(holds(*a, 3, 0x43));
  CHECK_EQ(b->commit(1, 1), 1u);  // budget spent: waits for the fence of a's pages
  s = pool->stats();
  CHECK_EQ(s.pending_pages, 0u);  // the whole batch was unmapped: one page went to b
  CHECK_EQ(s.free_pages, 1u);
  CHECK(!writable(a->base() + 2 * kPage) && !writable(a->base() + 3 * kPage));
  CHECK(b->is_committed(1));

  // A reservation destroyed with pages still pending waits for them and
  // returns every page; the pool forgets the fence.
  CHECK_EQ(b->decommit(0, 2, kStream), 2u);
  CHECK_EQ(pool->stats().pending_pages, 2u);
  b.reset();
  s = pool->stats();
  CHECK_EQ(s.pending_pages, 0u);
  CHECK_EQ(s.mapped_pages, 1u);
  CHECK(available_matches(*pool));  // the destructor's locked section published too
  pool->reap();
  CHECK_EQ(pool->stats().free_pages, 3u);

  // release_all waits too.
  CHECK_EQ(a->decommit(1, 1, kStream), 1u);
  a->release_all();
  s = pool->stats();
  CHECK_EQ(s.pending_pages, 0u);
  CHECK_EQ(s.mapped_pages, 0u);
  CHECK_EQ(s.free_pages, 4u);
  host_hold_fences(backend, false);
  return 0;
}

// An aliased page decommitted behind a fence frees no page when its fence
// completes (the alias still maps it): a commit counting on it must fail with
// OutOfPages, not take a page that does not exist.
int test_pending_alias_is_not_a_free_page() {
  auto pool = make_pool(1);
  host_hold_fences(pool->backend(), true);
  auto a = Reservation::create(pool, kPage);
  auto b = Reservation::create(pool, kPage);
  auto c = Reservation::create(pool, kPage);
  CHECK_EQ(a->commit(0, 1), 1u);
  fill(*a, 0, 0x77);
  CHECK_EQ(b->alias(0, *a, 0, 1), 1u);
  CHECK_EQ(a->decommit(0, 1, kStream), 1u);
  CHECK_THROWS(OutOfPages, c->commit(0, 1));
  CHECK_EQ(c->num_committed(), 0u);
  CHECK(holds(*b, 0, 0x77));
  PoolStats s = pool->stats();
  CHECK_EQ(s.mapped_pages, 1u);
  CHECK_EQ(s.created_pages, 1u);
  // Once the alias goes too, the page is free for c.
  CHECK_EQ(b->decommit(0, 1, std::nullopt), 1u);
  CHECK_EQ(c->commit(0, 1), 1u);
  CHECK(holds(*c, 0, 0x77));
  c.reset();
  b.reset();
  a.reset();

  // A pending page another range still maps is not counted as available: the
  // commit that would need it fails at once, changing nothing (before, it was
  // counted, revived pages were unmapped again after waiting, and steps that
  // trusted available() failed).
  pool->set_max_pages(2);
  a = Reservation::create(pool, 3 * kPage);
  b = Reservation::create(pool, kPage);
  CHECK_EQ(a->commit(0, 2), 2u);
  CHECK_EQ(b->alias(0, *a, 0, 1), 1u);
  CHECK_EQ(a->decommit(0, 2, kStream), 2u);  // page 0 aliased by b, page 1 not
  CHECK_EQ(pool->stats().pending_pages, 1u);  // only page 1 frees when reaped
  CHECK_EQ(pool->available(), 1u);
  CHECK_THROWS(OutOfPages, a->commit(1, 2));  // page 1 comes back to a; page 2 needs one more
  CHECK_EQ(a->num_committed(), 0u);
  CHECK(!a->is_committed(1) && !a->is_committed(2));
  s = pool->stats();
  CHECK_EQ(s.pending_pages, 1u);
  CHECK_EQ(s.mapped_pages, 2u);
  CHECK_EQ(s.free_pages, 0u);
  // b lets its alias go: both pending mappings of page 0 free it once reaped.
  CHECK_EQ(b->decommit(0, 1, kStream), 1u);
  CHECK_EQ(pool->stats().pending_pages, 2u);
  CHECK_EQ(pool->available(), 2u);
  // A pending target page is unmapped (after its fence) before an alias maps
  // there (it answered "already committed").
  CHECK_EQ(a->commit(1, 1), 1u);  // revives page 1
  fill(*a, 1, 0x55);
  CHECK_EQ(b->alias(0, *a, 1, 1), 1u);
  CHECK(holds(*b, 0, 0x55));
  s = pool->stats();
  CHECK_EQ(s.pending_pages, 1u);  // page 0, pending in a alone now
  CHECK_EQ(s.mapped_pages, 2u);
  host_hold_fences(pool->backend(), false);
  return 0;
}

// The pluggable allocator's path on the host backend: reserve, adopt, commit,
// free the address under the reservation.
int test_allocator_adopt() {
  auto pool = make_pool(4);
  size_t regions = allocator_num_regions();
  uintptr_t addr = allocator_reserve(make_host_backend(kPage), 3 * kPage - 1);
  CHECK_EQ(allocator_region_bytes(addr), 3 * kPage);
  CHECK_EQ(allocator_num_regions(), regions + 1);
  auto res = allocator_adopt(pool, addr);
  CHECK_EQ(res->base(), addr);
  CHECK_EQ(res->num_pages(), 3u);
  CHECK_THROWS(InvalidArgument, allocator_adopt(pool, addr));        // adopted twice
  CHECK_THROWS(InvalidArgument, allocator_adopt(pool, addr + kPage));  // unknown address
  CHECK_EQ(res->commit(0, 3), 3u);
  fill(*res, 2, 0x99);
  CHECK(holds(*res, 2, 0x99));
  // vkv_free while the reservation lives: its pages go back to the pool and
  // later calls are refused or do nothing.
  CHECK(allocator_release(addr));
  CHECK(!allocator_release(addr));
  CHECK_EQ(allocator_num_regions(), regions);
  CHECK_EQ(res->num_committed(), 0u);
  CHECK_EQ(pool->stats().free_pages, 3u);
  CHECK_THROWS(InvalidArgument, res->commit(0, 1));
  CHECK_EQ(res->decommit(0, 1, std::nullopt), 0u);
  res.reset();
  vkv_free(nullptr, 0, -1, nullptr);  // unknown address: ignored
  return 0;
}

// ---------------------------------------------------------------- concurrency

// The background committer commits the low half of several reservations while
// the main thread commits and decommits (with and without fences) the high
// half, writes and checks data, toggles held fences and reads stats, and a
// third thread polls stats and an allocator region's life cycle. Everything
// shares one pool, hence one mutex. Run under ThreadSanitizer.
int test_concurrent_committer(int iterations) {
  constexpr size_t kRes = 4, kPages = 64, kHalf = kPages / 2;
  auto pool = make_pool(kRes * kPages + 8);
  Backend& backend = pool->backend();
  std::vector<std::shared_ptr<Reservation>> res;
  for (size_t i = 0; i < kRes; ++i) res.push_back(Reservation::create(pool, kPages * kPage));
  auto committer = std::make_unique<Committer>();

  std::atomic<bool> stop{false};
  std::atomic<int> poller_error{0};
  // available() without the mutex, racing every commit and decommit: never
  // above the budget (no aliases here) and free of data races (ThreadSanitizer).
  std::thread reader([&] {
    const size_t budget = kRes * kPages + 8;
    while (!stop.load())
      if (pool->available() > budget) poller_error.store(3);
  });
  std::thread poller([&] {
    std::mt19937 rng(7);
    auto spare = Reservation::create(pool, 4 * kPage);
    while (!stop.load()) {
      PoolStats s = pool->stats();
      if (s.mapped_pages > s.created_pages || s.free_pages > s.created_pages || s.created_pages > s.max_pages)
        poller_error.store(1);
      (void)committer->pages_committed();
      (void)committer->done(1);
      for (auto& r : res) (void)r->num_committed();
      // A small commit / write / read / decommit cycle of its own.
      size_t first = rng() % 4, count = 1 + rng() % (4 - first);
      spare->commit(first, count);
      fill(*spare, first, 0xEE);
      if (!holds(*spare, first, 0xEE)) poller_error.store(2);
      spare->decommit(first, count, std::nullopt);
      // The allocator's table is process-wide: reserve, adopt, release.
      uintptr_t addr = allocator_reserve(make_host_backend(kPage), 2 * kPage);
      auto adopted = allocator_adopt(pool, addr);
      adopted->commit(0, 1);
      *at(*adopted, 0, 5) = 1;
      allocator_release(addr);
    }
  });

  std::mt19937 rng(12345);
  auto pick = [&](size_t lo, size_t hi, size_t& first, size_t& count) {  // a range inside [lo, hi)
    first = lo + rng() % (hi - lo);
    count = 1 + rng() % (hi - first);
  };
  std::vector<uint8_t> mark(kRes * kPages, 0);  // expected byte of each committed high-half page
  for (int it = 0; it < iterations; ++it) {
    if (it % 97 == 0) host_hold_fences(backend, (it / 97) % 2 == 0);

    // Queue commits of the low half of every reservation.
    std::vector<CommitJob> jobs;
    std::vector<std::pair<size_t, size_t>> lo(kRes);
    for (size_t r = 0; r < kRes; ++r) {
      pick(0, kHalf, lo[r].first, lo[r].second);
      jobs.push_back({res[r], lo[r].first, lo[r].second});
    }
    uint64_t ticket = committer->submit(std::move(jobs));

    // Meanwhile: the high half of one reservation.
    size_t r = static_cast<size_t>(it) % kRes;
    size_t first, count;
    pick(kHalf, kPages, first, count);
    res[r]->commit(first, count);
    for (size_t p = first; p < first + count; ++p) {
      CHECK(res[r]->is_committed(p));
      uint8_t v = static_cast<uint8_t>(1 + (it + p) % 250);
      *at(*res[r], p, (it * 64) % kPage) = v;
      CHECK_EQ(*at(*res[r], p, (it * 64) % kPage), v);
      mark[r * kPages + p] = v;
    }
    pick(kHalf, kPages, first, count);
    std::optional<uintptr_t> stream;
    if (rng() % 2) stream = kStream;
    res[r]->decommit(first, count, stream);
    for (size_t p = first; p < first + count; ++p) {
      CHECK(!res[r]->is_committed(p));
      mark[r * kPages + p] = 0;
    }
    PoolStats s = pool->stats();
    CHECK(s.mapped_pages <= s.created_pages);
    CHECK(s.created_pages <= s.max_pages);
    (void)res[r]->committed_ranges();
    if (it % 5 == 0) pool->reap();

    // The committer's pages are committed once the ticket is done.
    committer->wait(ticket);
    for (size_t k = 0; k < kRes; ++k) {
      for (size_t p = lo[k].first; p < lo[k].first + lo[k].second; ++p) {
        CHECK(res[k]->is_committed(p));
        *at(*res[k], p, 17) = static_cast<uint8_t>(it);
        CHECK_EQ(*at(*res[k], p, 17), static_cast<uint8_t>(it));
      }
      size_t f, c;
      pick(0, kHalf, f, c);
      res[k]->decommit(f, c, (rng() % 2) ? std::optional<uintptr_t>(kStream) : std::nullopt);
    }
    // High-half pages committed earlier kept their bytes through all of this.
    if (it % 50 == 0) {
      for (size_t k = 0; k < kRes; ++k)
        for (size_t p = kHalf; p < kPages; ++p)
          if (mark[k * kPages + p] != 0) CHECK(res[k]->is_committed(p));
    }
  }
  stop.store(true);
  poller.join();
  reader.join();
  CHECK_EQ(poller_error.load(), 0);
  CHECK(available_matches(*pool));

  // A last batch from the committer, then tear everything down: every page is
  // back in the pool.
  uint64_t ticket = committer->submit({{res[0], 0, kPages}, {res[1], 0, kPages}});
  committer->wait(ticket);
  CHECK_EQ(res[0]->num_committed(), kPages);
  committer.reset();  // joins the thread
  host_hold_fences(backend, false);
  res.clear();
  pool->reap();
  PoolStats s = pool->stats();
  CHECK_EQ(s.mapped_pages, 0u);
  CHECK_EQ(s.pending_pages, 0u);
  CHECK_EQ(s.free_pages, s.created_pages);
  CHECK_EQ(pool->available(), s.max_pages);
  return 0;
}

// Many short-lived committers and reservations whose last reference is
// dropped on the committer thread.
int test_committer_lifecycle() {
  auto pool = make_pool(64);
  for (int round = 0; round < 50; ++round) {
    Committer committer;
    uint64_t last = 0;
    for (int k = 0; k < 4; ++k) {
      auto r = Reservation::create(pool, 8 * kPage);
      last = committer.submit({{r, 0, 8}});
    }  // the committer holds the only references now
    committer.wait(last);
    CHECK(committer.done(last));
    CHECK_EQ(committer.pages_committed(), 32u);
  }  // destructors join with nothing left to do
  PoolStats s = pool->stats();
  CHECK_EQ(s.mapped_pages, 0u);
  CHECK_EQ(s.free_pages, s.created_pages);
  return 0;
}


// ---------------------------------------------------------------- slot table

// 4 slots of 8 pages (16 tokens a page, 120 tokens a slot) in two buffers:
// buffer 0 global, buffer 1 with a 20-token sliding window.
struct SlotFixture {
  static constexpr size_t kSlots = 4, kPagesPerSlot = 8;
  std::shared_ptr<PagePool> pool;
  std::vector<std::shared_ptr<Reservation>> res;
  std::shared_ptr<Committer> committer = std::make_shared<Committer>();
  std::unique_ptr<SlotTable> table;
  explicit SlotFixture(size_t budget, std::vector<int64_t> windows = {0, 20}, size_t slots = kSlots) {
    pool = make_pool(budget);
    for (size_t i = 0; i < windows.size(); ++i) res.push_back(Reservation::create(pool, slots * kPagesPerSlot * kPage));
    SlotGeometry g{slots, 120, 128, kPagesPerSlot, 0, kPage / 16, kPage};
    table = std::make_unique<SlotTable>(g, res, windows, committer);
  }
  // Pages of `slot` committed in buffer `b`.
  size_t held(size_t b, size_t slot) {
    size_t n = 0;
    for (size_t p = slot * kPagesPerSlot; p < (slot + 1) * kPagesPerSlot; ++p) n += res[b]->is_committed(p);
    return n;
  }
};

int test_slot_table_step() {
  SlotFixture f(20);
  SlotTable& t = *f.table;
  CHECK_EQ(t.pages_for(17), 2);
  CHECK_EQ(t.tokens_for(2), 32);
  CHECK_EQ(t.pages_for(0), 0);
  CHECK_EQ(t.tokens_for(100), 120);  // capped at max_seq_len
  t.active_data()[0] = t.active_data()[1] = true;
  std::vector<int64_t> need = {17, 0, 0, 0};

  CHECK_EQ(t.step(need.data(), 4, -1), kStepDone);  // commits now, no prefetch
  CHECK_EQ(t.committed_data()[0], 2);
  CHECK_EQ(t.covered_data()[0], 32);
  CHECK_EQ(t.used_data()[0], 17);
  CHECK_EQ(f.held(0, 0), 2u);
  CHECK_EQ(f.held(1, 0), 2u);
  CHECK(!t.pending());

  need[0] = 20;  // no page crossed, not even with the lookahead: the quiet path does it all
  CHECK_EQ(t.step_quiet(need.data(), 4, 1), kStepDone);
  CHECK_EQ(t.used_data()[0], 20);
  need[0] = 32;  // the lookahead crosses: busy, nothing changed
  CHECK_EQ(t.step_quiet(need.data(), 4, 1), kStepBusy);
  CHECK_EQ(t.used_data()[0], 20);
  CHECK_EQ(t.step(need.data(), 4, 1), kStepDone);  // page 3 prefetched in the background
  CHECK_EQ(t.used_data()[0], 32);
  CHECK(t.pending());
  CHECK_EQ(t.step_quiet(need.data(), 4, 1), kStepBusy);  // a queued prefetch is joined by step only
  t.join();
  CHECK(!t.pending());
  CHECK_EQ(t.committed_data()[0], 3);
  CHECK_EQ(f.held(0, 0), 3u);
  CHECK_EQ(t.commit_calls(), 2u);

  // Invalid input changes nothing: an inactive slot, past max_seq_len, negative, wrong length.
  for (auto bad : {std::vector<int64_t>{5, 0, 3, 0}, std::vector<int64_t>{121, 0, 0, 0},
                   std::vector<int64_t>{-1, 0, 0, 0}, std::vector<int64_t>{5, 0, 0}}) {
    CHECK_EQ(t.step(bad.data(), bad.size(), 1), kStepInvalid);
    CHECK_EQ(t.step_quiet(bad.data(), bad.size(), 1), kStepInvalid);
    CHECK_EQ(t.plan_pages(bad.data(), bad.size()), -1);
  }
  CHECK_EQ(t.used_data()[0], 32);
  std::vector<int32_t> need32 = {33, 0, 0, 0};
  CHECK_EQ(t.step(need32.data(), 4, -1), kStepDone);  // int32 lengths too
  CHECK_EQ(t.used_data()[0], 33);

  // Short of pages: 2 buffers x 8 pages wanted, 20 - 6 in the pool; nothing changes.
  need = {33, 120, 0, 0};
  CHECK_EQ(t.plan_pages(need.data(), 4), 16);
  CHECK_EQ(t.step(need.data(), 4, 1), kStepShort);
  CHECK_EQ(t.short_pages().first, 16u);
  CHECK_EQ(t.short_pages().second, 14u);
  CHECK_EQ(t.committed_data()[1], 0);
  CHECK_EQ(t.used_data()[1], 0);
  CHECK_EQ(f.held(0, 1) + f.held(1, 1), 0u);

  // The window: after a step from 60 tokens, rows < 40 are behind it: pages [0, 2) of buffer 1 go.
  need = {60, 0, 0, 0};
  CHECK_EQ(t.step(need.data(), 4, -1), kStepDone);  // from 33: row 13, page 0 still needed
  need[0] = 64;
  CHECK_EQ(t.step_quiet(need.data(), 4, -1), kStepBusy);
  CHECK_EQ(t.step(need.data(), 4, -1), kStepTrim);
  t.trim_windows(std::nullopt);
  CHECK_EQ(t.first_pages_data()[0], 2);
  CHECK_EQ(f.held(0, 0), 4u);  // the global buffer keeps every page
  CHECK_EQ(f.held(1, 0), 2u);
  CHECK(!f.res[1]->is_committed(0) && !f.res[1]->is_committed(1));

  // commit_slots and set_committed check their slots; close drops the buffers.
  CHECK_THROWS(InvalidArgument, t.commit_slots({{4, 1}}));
  CHECK_THROWS(InvalidArgument, t.commit_slots({{2, 1}, {2, 2}}));
  CHECK_THROWS(InvalidArgument, t.set_committed(0, 9));
  t.commit_slots({{2, 1}, {3, 2}});
  CHECK_EQ(t.committed_data()[2], 1);
  CHECK_EQ(t.committed_data()[3], 2);
  CHECK_EQ(f.held(0, 2), 1u);
  CHECK_EQ(f.held(1, 3), 2u);
  CHECK_THROWS(OutOfPages, t.commit_slots({{2, 2}, {3, 8}}));  // 2 + 12 pages, 20 - 12 in the pool
  CHECK_EQ(t.committed_data()[2], 1);
  CHECK_EQ(f.held(0, 2) + f.held(1, 2), 2u);
  t.close();
  CHECK_THROWS(InvalidArgument, t.step(need.data(), 4, 1));
  CHECK_EQ(t.pages_for(17), 2);
  return 0;
}

// Threads stepping their own slots of one table at once (each step may join
// another thread's prefetch), windows trimming, a poller reading counters and
// planning; between rounds every buffer must hold exactly what the table says.
int test_slot_table_threads(int iterations) {
  constexpr size_t kThreads = 4, kSlots = 2 * kThreads;
  SlotFixture f(2 * kSlots * SlotFixture::kPagesPerSlot, {0, 20}, kSlots);
  SlotTable& t = *f.table;
  for (size_t s = 0; s < kSlots; ++s) t.active_data()[s] = true;
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::thread poller([&] {
    std::vector<int64_t> zero(kSlots, 0);
    while (!stop.load()) {
      (void)t.commit_calls();
      (void)t.pending();
      if (t.plan_pages(zero.data(), kSlots) != 0) errors.store(1);
      PoolStats s = f.pool->stats();
      if (s.mapped_pages > s.created_pages) errors.store(2);
    }
  });
  int rounds = std::max(1, iterations / 500);
  for (int round = 0; round < rounds; ++round) {
    std::vector<std::thread> threads;
    for (size_t k = 0; k < kThreads; ++k) {
      threads.emplace_back([&, k] {
        std::mt19937 rng(static_cast<unsigned>(round * 31 + k));
        std::vector<int64_t> need(kSlots, 0);
        int64_t len[2] = {0, 0};
        while (len[0] < 120 || len[1] < 120) {
          for (int j = 0; j < 2; ++j) {
            len[j] = std::min<int64_t>(120, len[j] + 1 + rng() % 9);
            need[2 * k + j] = len[j];
          }
          StepStatus st = t.step_quiet(need.data(), kSlots, 1);
          if (st == kStepBusy) st = t.step(need.data(), kSlots, 1);
          if (st == kStepTrim) t.trim_windows(std::nullopt);
          else if (st != kStepDone) errors.store(3);
        }
      });
    }
    for (auto& th : threads) th.join();
    t.join();
    for (size_t s = 0; s < kSlots; ++s) {
      CHECK_EQ(t.used_data()[s], 120);
      CHECK_EQ(t.committed_data()[s], 8);
      CHECK_EQ(f.held(0, s), 8u);
      CHECK_EQ(static_cast<int64_t>(f.held(1, s)), 8 - t.first_pages_data()[s]);
      CHECK(t.first_pages_data()[s] >= 5);  // a trim lost to another thread's step is redone later
      // Back to empty for the next round (single-threaded here).
      for (auto& r : f.res) r->decommit(s * SlotFixture::kPagesPerSlot, SlotFixture::kPagesPerSlot, std::nullopt);
      t.set_committed(s, 0);
      t.used_data()[s] = 0;
      t.first_pages_data()[s] = 0;
    }
  }
  stop.store(true);
  poller.join();
  CHECK_EQ(errors.load(), 0);
  return 0;
}

// A backend whose fences are objects, as CUDA events are: using one after
// fence_destroy is an error (cuEventSynchronize of a destroyed CUevent). Its
// fence_done also lets a waiting thread run while the reap holds the mutex.
class EventFenceBackend final : public Backend {
 public:
  std::string name() const override { return "event-fences"; }
  int device() const override { return 0; }
  size_t page_size() const override { return kPage; }
  uintptr_t reserve(size_t bytes) override {
    uintptr_t a = next_;
    next_ += bytes + (1u << 20);
    return a;
  }
  void release(uintptr_t, size_t) override {}
  PageHandle create_page() override { return ++pages_; }
  void destroy_page(PageHandle) override {}
  void map(uintptr_t, PageHandle) override {}
  void set_access(uintptr_t, size_t) override {}
  void unmap(uintptr_t, size_t) override {}
  void zero(uintptr_t, size_t) override {}
  bool fresh_pages_are_zero() const override { return true; }
  Fence record_fence(uintptr_t) override {
    std::lock_guard<std::mutex> l(mu_);
    live_.insert(++last_);
    return last_;
  }
  bool fence_done(Fence f) override {
    use(f);
    {
      std::lock_guard<std::mutex> l(mu_);
      in_reap_ = true;
    }
    cv_.notify_all();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the other thread drops its reference now
    return true;
  }
  void fence_wait(Fence f) override { use(f); }
  void fence_destroy(Fence f) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!live_.erase(f)) ++misuses_;
  }
  void wait_for_reap() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return in_reap_; });
  }
  int misuses() {
    std::lock_guard<std::mutex> l(mu_);
    return misuses_;
  }

 private:
  void use(Fence f) {
    std::lock_guard<std::mutex> l(mu_);
    if (!live_.count(f)) ++misuses_;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool in_reap_ = false;
  std::set<Fence> live_;
  Fence last_ = 0;
  int misuses_ = 0;
  PageHandle pages_ = 0;
  uintptr_t next_ = uintptr_t{1} << 30;
};

// The last reference to a reservation with pending pages goes while another
// thread reaps: the reap finds no owner and destroys the fence; the
// reservation's destructor, waiting for the mutex meanwhile, waited on it then.
int test_a_reap_racing_the_last_reference_never_uses_a_destroyed_fence() {
  auto backend = std::make_shared<EventFenceBackend>();
  auto pool = std::make_shared<PagePool>(backend, 16);
  auto res = Reservation::create(pool, 4 * kPage);
  CHECK_EQ(res->commit(0, 4), 4u);
  CHECK_EQ(res->decommit(0, 4, kStream), 4u);
  CHECK_EQ(pool->stats().pending_pages, 4u);
  std::thread reaper([&] { pool->reap(); });
  backend->wait_for_reap();
  res.reset();
  reaper.join();
  CHECK_EQ(backend->misuses(), 0);
  PoolStats s = pool->stats();
  CHECK_EQ(s.mapped_pages, 0u);
  CHECK_EQ(s.pending_pages, 0u);
  CHECK_EQ(s.free_pages, 4u);
  return 0;
}

}  // namespace

// Forwards every call to an inner backend; the test backends below change one behaviour each.
class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::shared_ptr<Backend> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  int device() const override { return inner_->device(); }
  size_t page_size() const override { return inner_->page_size(); }
  uintptr_t reserve(size_t bytes) override { return inner_->reserve(bytes); }
  void release(uintptr_t addr, size_t bytes) override { inner_->release(addr, bytes); }
  PageHandle create_page() override { return inner_->create_page(); }
  void destroy_page(PageHandle page) override { inner_->destroy_page(page); }
  void map(uintptr_t addr, PageHandle page) override { inner_->map(addr, page); }
  void set_access(uintptr_t addr, size_t bytes) override { inner_->set_access(addr, bytes); }
  void unmap(uintptr_t addr, size_t bytes) override { inner_->unmap(addr, bytes); }
  void zero(uintptr_t addr, size_t bytes) override { inner_->zero(addr, bytes); }
  bool fresh_pages_are_zero() const override { return inner_->fresh_pages_are_zero(); }
  Fence record_fence(uintptr_t stream) override { return inner_->record_fence(stream); }
  bool fence_done(Fence f) override { return inner_->fence_done(f); }
  void fence_wait(Fence f) override { inner_->fence_wait(f); }
  void fence_destroy(Fence f) override { inner_->fence_destroy(f); }

 protected:
  std::shared_ptr<Backend> inner_;
};

// The host backend with a driver that makes only `pages` pages: create_page
// throws OutOfPages past them, as cuMemCreate does when the GPU is full.
class FewPagesBackend final : public ForwardingBackend {
 public:
  FewPagesBackend(std::shared_ptr<Backend> inner, size_t pages) : ForwardingBackend(std::move(inner)), left_(pages) {}
  PageHandle create_page() override {
    if (left_ == 0) throw OutOfPages("out of device memory (test backend)", 1, 0);
    --left_;
    return inner_->create_page();
  }

 private:
  size_t left_;  // only the committer thread creates pages after the first step
};

// The host backend whose unmap fails once, at its `fail_at`-th call (0: the
// first), as cuMemUnmap or the host's mmap (the kernel's map count) can.
class FailingUnmapBackend final : public ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  void fail_unmap_call(int index) { fail_at_ = index; }
  void unmap(uintptr_t addr, size_t bytes) override {
    if (fail_at_ >= 0 && fail_at_-- == 0) throw DriverError("unmap failed (test backend)");
    inner_->unmap(addr, bytes);
  }

 private:
  int fail_at_ = -1;
};

// An unmap that fails part-way through a decommit or a release of several
// runs: the runs unmapped before it are decommitted, the rest stay committed
// with their data, and the counts say so (before: the whole call's pages were
// counted decommitted, or none, whatever had been unmapped).
int test_an_unmap_failing_part_way_keeps_the_counts() {
  auto backend = std::make_shared<FailingUnmapBackend>(make_host_backend(kPage));
  auto pool = std::make_shared<PagePool>(backend, 16);
  auto res = Reservation::create(pool, 8 * kPage);
  for (size_t p : {0, 1, 3, 4, 6, 7}) {  // three runs: [0, 2), [3, 5), [6, 8)
    res->commit(p, 1);
    fill(*res, p, static_cast<uint8_t>(0x60 + p));
  }
  backend->fail_unmap_call(1);  // the second run
  CHECK_THROWS(DriverError, res->decommit(0, 8, std::nullopt));
  CHECK_EQ(res->num_committed(), 4u);
  CHECK(!res->is_committed(0) && !res->is_committed(1));
  for (size_t p : {3, 4, 6, 7}) CHECK(res->is_committed(p) && holds(*res, p, static_cast<uint8_t>(0x60 + p)));
  CHECK_EQ(pool->stats().free_pages, 2u);
  CHECK(available_matches(*pool));
  CHECK_EQ(res->decommit(0, 8, std::nullopt), 4u);  // the driver works again: the rest go
  CHECK_EQ(res->num_committed(), 0u);
  CHECK_EQ(pool->stats().free_pages, 6u);

  for (size_t p : {0, 1, 3, 4, 6, 7}) res->commit(p, 1);
  backend->fail_unmap_call(2);  // release_all: the third run
  CHECK_THROWS(DriverError, res->release_all());
  CHECK_EQ(res->num_committed(), 2u);
  CHECK(res->is_committed(6) && res->is_committed(7) && !res->is_committed(3));
  CHECK(available_matches(*pool));
  res->release_all();
  CHECK_EQ(res->num_committed(), 0u);
  CHECK_EQ(pool->stats().free_pages, 6u);
  CHECK(available_matches(*pool));
  return 0;
}

// A background prefetch that finds no page (the driver is full, or another
// user of the pool took them) is rolled back and skipped, as step_async
// documents: joining it (any call, a free() giving memory back included) does
// not raise; the next synchronous step commits, or raises, when the need is real.
int test_a_prefetch_that_finds_no_page_is_skipped() {
  auto pool = std::make_shared<PagePool>(std::make_shared<FewPagesBackend>(make_host_backend(kPage), 4), 16);
  std::vector<std::shared_ptr<Reservation>> res{Reservation::create(pool, 4 * 8 * kPage)};
  SlotGeometry g{4, 120, 128, 8, 0, kPage / 16, kPage};  // 16 tokens a page
  SlotTable t(g, res, {0}, std::make_shared<Committer>());
  t.active_data()[0] = true;
  std::vector<int64_t> need = {16, 0, 0, 0};
  CHECK_EQ(t.step(need.data(), 4, 100), kStepDone);  // 1 page now; 7 more queued (the budget has 15)
  CHECK(t.pending());
  t.join();  // the driver made 3 of them: the prefetch is undone
  CHECK(!t.pending());
  CHECK_EQ(t.committed_data()[0], 1);
  CHECK_EQ(res[0]->num_committed(), 1u);
  need[0] = 80;  // a real need past what the driver can make (5 pages): raised by the synchronous step
  CHECK_THROWS(OutOfPages, t.step(need.data(), 4, -1));
  CHECK_EQ(t.committed_data()[0], 1);
  need[0] = 64;  // 4 pages: the 3 the prefetch made wait in the pool
  CHECK_EQ(t.step(need.data(), 4, -1), kStepDone);
  CHECK_EQ(t.committed_data()[0], 4);
  return 0;
}

int main(int argc, char** argv) {
  int iterations = 10000;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--iterations" && i + 1 < argc) {
      iterations = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--iterations N]\n", argv[0]);
      return 2;
    }
  }
  try {
    RUN(test_reserve_commit_decommit);
    RUN(test_unbacked_pages_and_strict_mode);
    RUN(test_pool_budget_prefill_and_shrink);
    RUN(test_alias);
    RUN(test_out_of_pages_changes_nothing);
    RUN(test_fences_keep_pages_mapped);
    RUN(test_pending_alias_is_not_a_free_page);
    RUN(test_a_reap_racing_the_last_reference_never_uses_a_destroyed_fence);
    RUN(test_allocator_adopt);
    RUN(test_committer_lifecycle);
    RUN(test_slot_table_step);
    RUN(test_a_prefetch_that_finds_no_page_is_skipped);
    RUN(test_an_unmap_failing_part_way_keeps_the_counts);
    std::printf("%-52s", "test_slot_table_threads");
    std::fflush(stdout);
    if (int rc = test_slot_table_threads(iterations); rc != 0) return rc;
    std::printf("ok\n");
    std::printf("%-52s", "test_concurrent_committer");
    std::fflush(stdout);
    int rc = test_concurrent_committer(iterations);
    std::printf("%s (%d iterations)\n", rc == 0 ? "ok" : "FAILED", iterations);
    if (rc != 0) return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED: unexpected exception: %s\n", e.what());
    return 1;
  }
  std::printf("all %d checks passed\n", g_checks);
  return 0;
}
