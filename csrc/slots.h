// Layer 2: the slot table of a KVCache. Per slot (batch row): whether it is
// active, the tokens its request uses, the pages committed under it (per
// buffer, from the slot's first page) and the tokens they cover; per windowed
// buffer group, the first page still held. On top of that table, the per-step
// decision: what to commit now, what to prefetch on the background committer,
// what a sliding window gives back.
//
// The per-step call (step) is the hot path of decoding: one compare per slot
// against the committed pages, and nothing else in the common case where no
// slot crosses a page boundary. Whatever needs Python (a precise message for
// bad input, reclaiming freed slots' pages, the CUDA stream a window's
// decommit waits for) is reported back as a status with nothing changed, and
// the caller retries or finishes the work.
//
// Threads: one mutex guards the table; the committer never touches it (a
// prefetch's pages are credited to the table by join, on the caller's thread).
// The arrays handed out by *_data() are for reading and for the cache's own
// bookkeeping writes, which its caller serialises with every other call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "committer.h"
#include "pool.h"

namespace vkv {

// The shape of a cache's rows, in tokens and pages.
struct SlotGeometry {
  size_t num_slots = 0;        // max_batch_size
  int64_t max_seq_len = 0;     // tokens a slot may use
  int64_t padded_seq_len = 0;  // tokens in a slot's row (whole pages)
  size_t pages_per_slot = 0;   // pages of a row, per buffer
  int64_t margin_tokens = 0;   // rows committed past every request's end
  size_t bytes_per_token = 0;  // bytes of one token in one buffer
  size_t page_size = 0;
};

// What step / plan_pages report. Every status but kStepDone and kStepTrim left
// the table unchanged (a finished prefetch may have been joined).
enum StepStatus : int {
  kStepDone = 0,     // committed (if anything), lengths updated, prefetch queued (if any)
  kStepInvalid = 1,  // seq_lens is not B integers in [0, max_seq_len], 0 on inactive slots
  kStepShort = 2,    // the pool lacks pages: short_pages() says how many were wanted
  kStepTrim = 3,     // done; windowed buffers have pages to give back: call trim_windows
  kStepBusy = 4,     // step_quiet only: the step has driver work to do (call step)
};

class SlotTable {
 public:
  // `buffers`: the cache's reservations; `buffer_windows[i]`: the sliding
  // window (tokens) of buffer i, 0 for a global one.
  SlotTable(SlotGeometry geometry, std::vector<std::shared_ptr<Reservation>> buffers,
            std::vector<int64_t> buffer_windows, std::shared_ptr<Committer> committer);
  SlotTable(const SlotTable&) = delete;
  SlotTable& operator=(const SlotTable&) = delete;

  const SlotGeometry& geometry() const { return g_; }
  size_t num_groups() const { return windows_.size(); }
  const std::vector<int64_t>& window_sizes() const { return windows_; }
  const std::vector<int>& buffer_groups() const { return buffer_group_; }

  // Pages per buffer that back tokens [0, num_tokens) plus the margin; 0 for <= 0.
  int64_t pages_for(int64_t num_tokens) const;
  // The largest num_tokens that `pages` pages back (margin excluded, <= max_seq_len).
  int64_t tokens_for(int64_t pages) const;

  // One iteration: `need[s]` tokens for each slot s (0: leave it alone).
  // Joins the previous prefetch, commits what `need` lacks (all or nothing
  // across slots and buffers), raises every slot's used tokens to `need`
  // and, with lookahead >= 0, queues the commit of need + lookahead on the
  // committer when the pool has the pages now (else skips it: the next step
  // decides). A driver error or a pool emptied by another user throws with
  // the table unchanged.
  template <typename T>
  StepStatus step(const T* need, size_t n, int64_t lookahead);
  // The common case of step, for a caller that should not give up a lock
  // (the GIL) for nothing: when no prefetch is queued and no slot of `need`
  // (nor need + lookahead) crosses a page boundary, nor any window, raises the
  // used tokens and returns kStepDone. Otherwise changes nothing and returns
  // kStepInvalid for invalid input, else kStepBusy (call step).
  template <typename T>
  StepStatus step_quiet(const T* need, size_t n, int64_t lookahead);
  // Pages (all buffers) that step(need) would have to take from the pool, or
  // -1 for invalid input. Joins the previous prefetch.
  template <typename T>
  int64_t plan_pages(const T* need, size_t n);
  // After kStepShort: (pages wanted, pages the pool had).
  std::pair<size_t, size_t> short_pages() const;
  // After kStepTrim: decommits, in the windowed buffers, the pages behind each
  // window (the unmap waits for a fence on `stream`, when given).
  void trim_windows(std::optional<uintptr_t> stream);

  // Waits for the queued prefetch and credits its pages; on failure rolls the
  // partial prefetch back (every buffer agrees again) and rethrows, except
  // OutOfPages: a prefetch that found no page is skipped (step_async's rule).
  void join();
  bool pending();
  // Commits pages [committed, pages) of each (slot, pages) in every buffer,
  // all or nothing (OutOfPages with nothing changed; no reclaiming here).
  void commit_slots(const std::vector<std::pair<size_t, int64_t>>& plan);
  // Bookkeeping only (the caller mapped or unmapped the pages).
  void set_committed(size_t slot, int64_t pages);
  uint64_t commit_calls();
  // Drops the table's references to the buffers and the committer (the cache
  // was closed, its queued prefetch joined); every call that would touch a
  // buffer then throws InvalidArgument. The arrays and the arithmetic stay.
  void close();

  // The table's arrays, B entries each (first_pages: G x B, row-major).
  int64_t* used_data() { return used_.data(); }
  int64_t* committed_data() { return committed_.data(); }
  int64_t* covered_data() { return covered_.data(); }
  bool* active_data() { return reinterpret_cast<bool*>(active_.data()); }
  int64_t* first_pages_data() { return first_pages_.data(); }

 private:
  template <typename T>
  bool valid_locked(const T* need, size_t n) const;
  void check_open_locked(const char* what) const;
  void join_locked();
  // Pages per buffer each slot of `need` must grow to, as (slot, pages).
  template <typename T>
  void plan_locked(const T* need, std::vector<std::pair<size_t, int64_t>>& plan) const;
  size_t plan_cost_locked(const std::vector<std::pair<size_t, int64_t>>& plan) const;
  void commit_plan_locked(const std::vector<std::pair<size_t, int64_t>>& plan);
  void set_committed_locked(size_t slot, int64_t pages);
  template <typename T>
  bool plan_trim_locked(const T* need);

  SlotGeometry g_;
  std::vector<std::shared_ptr<Reservation>> buffers_;
  std::shared_ptr<Committer> committer_;
  std::mutex mu_;
  std::vector<uint8_t> active_;
  std::vector<int64_t> used_, committed_, covered_;
  // Sliding windows: distinct window sizes (ascending), the group of each
  // buffer (-1: global), the buffers of each group, first page held per group and slot.
  std::vector<int64_t> windows_;
  std::vector<int> buffer_group_;
  std::vector<std::vector<std::shared_ptr<Reservation>>> group_buffers_;
  std::vector<int64_t> first_pages_;
  // The queued prefetch: its ticket (0: none) and (slot, pages) plan.
  uint64_t ticket_ = 0;
  std::vector<std::pair<size_t, int64_t>> pending_;
  // Scratch reused by every step (no allocation on the hot path).
  std::vector<std::pair<size_t, int64_t>> plan_;
  std::vector<std::tuple<size_t, size_t, int64_t>> trim_;  // (group, slot, new first page)
  size_t short_wanted_ = 0, short_available_ = 0;
  uint64_t commit_calls_ = 0;
  bool closed_ = false;
};

}  // namespace vkv
