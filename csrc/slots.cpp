#include "slots.h"

#include <algorithm>
#include <exception>
#include <map>
#include <string>

#include "errors.h"

namespace vkv {

SlotTable::SlotTable(SlotGeometry geometry, std::vector<std::shared_ptr<Reservation>> buffers,
                     std::vector<int64_t> buffer_windows, std::shared_ptr<Committer> committer)
    : g_(geometry),
      buffers_(std::move(buffers)),
      committer_(std::move(committer)),
      active_(g_.num_slots, 0),
      used_(g_.num_slots, 0),
      committed_(g_.num_slots, 0),
      covered_(g_.num_slots, 0) {
  if (g_.num_slots == 0 || g_.max_seq_len <= 0 || g_.padded_seq_len < g_.max_seq_len || g_.page_size == 0 ||
      g_.bytes_per_token == 0 || g_.margin_tokens < 0 ||
      g_.pages_per_slot * g_.page_size != static_cast<size_t>(g_.padded_seq_len) * g_.bytes_per_token)
    throw InvalidArgument("slot table: inconsistent geometry (rows must be whole pages of whole tokens)");
  if (buffers_.empty()) throw InvalidArgument("slot table: expected buffers");
  require(committer_, "slot table: committer");
  for (const auto& b : buffers_) require(b, "slot table: a buffer");
  if (buffer_windows.size() != buffers_.size())
    throw InvalidArgument("slot table: expected one window per buffer, got " + std::to_string(buffer_windows.size()) +
                          " for " + std::to_string(buffers_.size()) + " buffers");
  for (const auto& b : buffers_)
    if (!b || b->num_pages() < g_.num_slots * g_.pages_per_slot || b->page_size() != g_.page_size)
      throw InvalidArgument("slot table: a buffer is smaller than num_slots * pages_per_slot pages");
  for (int64_t w : buffer_windows) {
    if (w < 0) throw InvalidArgument("slot table: a window must be >= 0 tokens (0: global)");
    if (w > 0 && std::find(windows_.begin(), windows_.end(), w) == windows_.end()) windows_.push_back(w);
  }
  std::sort(windows_.begin(), windows_.end());
  group_buffers_.resize(windows_.size());
  for (size_t i = 0; i < buffers_.size(); ++i) {
    int group = -1;
    if (buffer_windows[i] > 0) {
      group = static_cast<int>(std::find(windows_.begin(), windows_.end(), buffer_windows[i]) - windows_.begin());
      group_buffers_[group].push_back(buffers_[i]);
    }
    buffer_group_.push_back(group);
  }
  first_pages_.assign(windows_.size() * g_.num_slots, 0);
  plan_.reserve(g_.num_slots);
}

int64_t SlotTable::pages_for(int64_t num_tokens) const {
  if (num_tokens <= 0) return 0;
  // In 128 bits: a margin near 2**63 must not wrap.
  __int128 rows = std::min<__int128>(static_cast<__int128>(num_tokens) + g_.margin_tokens, g_.padded_seq_len);
  __int128 bytes = rows * static_cast<__int128>(g_.bytes_per_token);
  return static_cast<int64_t>((bytes + g_.page_size - 1) / g_.page_size);
}

int64_t SlotTable::tokens_for(int64_t pages) const {
  if (pages <= 0) return 0;
  // The whole row backs every length: pages_for() never asks for more, the
  // margin past max_seq_len included (else a full row "needs" pages forever).
  if (pages >= pages_for(g_.max_seq_len)) return g_.max_seq_len;
  __int128 rows = static_cast<__int128>(pages) * g_.page_size / g_.bytes_per_token;
  __int128 tokens = std::min<__int128>(g_.max_seq_len, rows - g_.margin_tokens);
  return static_cast<int64_t>(std::max<__int128>(0, tokens));
}

template <typename T>
bool SlotTable::valid_locked(const T* need, size_t n) const {
  if (n != g_.num_slots) return false;
  bool ok = true;
  for (size_t s = 0; s < n; ++s) {  // no early exit: a branch-free loop the compiler vectorises
    int64_t v = static_cast<int64_t>(need[s]);
    ok &= (v >= 0) & (v <= g_.max_seq_len) & ((v == 0) | (active_[s] != 0));
  }
  return ok;
}

template <typename T>
void SlotTable::plan_locked(const T* need, std::vector<std::pair<size_t, int64_t>>& plan) const {
  plan.clear();
  for (size_t s = 0; s < g_.num_slots; ++s)
    if (static_cast<int64_t>(need[s]) > covered_[s]) plan.emplace_back(s, pages_for(static_cast<int64_t>(need[s])));
}

size_t SlotTable::plan_cost_locked(const std::vector<std::pair<size_t, int64_t>>& plan) const {
  size_t pages = 0;
  for (const auto& [slot, want] : plan) pages += static_cast<size_t>(want - committed_[slot]);
  return pages * buffers_.size();
}

void SlotTable::set_committed_locked(size_t slot, int64_t pages) {
  committed_[slot] = pages;
  covered_[slot] = tokens_for(pages);
}

void SlotTable::commit_plan_locked(const std::vector<std::pair<size_t, int64_t>>& plan) {
  struct Done {
    Reservation* res;
    size_t first, count;
  };
  std::vector<Done> done;
  try {
    for (const auto& [slot, pages] : plan) {
      size_t first = slot * g_.pages_per_slot + static_cast<size_t>(committed_[slot]);
      size_t count = static_cast<size_t>(pages - committed_[slot]);
      for (const auto& res : buffers_) {
        res->commit(first, count);
        done.push_back({res.get(), first, count});
      }
    }
  } catch (...) {
    // All or nothing: undo this step's commits (never used, so no fence).
    for (const Done& d : done) {
      try {
        d.res->decommit(d.first, d.count, std::nullopt);
      } catch (...) {
      }
    }
    throw;
  }
  for (const auto& [slot, pages] : plan) set_committed_locked(slot, pages);
  ++commit_calls_;
}

template <typename T>
bool SlotTable::plan_trim_locked(const T* need) {
  // A windowed layer needs, after a step from length L, rows >= L - W only:
  // the step writes from L on and its first query (at L) reads keys from
  // L - W + 1 on. The page holding row L - W is the first one kept.
  trim_.clear();
  for (size_t gi = 0; gi < windows_.size(); ++gi) {
    int64_t* first = first_pages_.data() + gi * g_.num_slots;
    for (size_t s = 0; s < g_.num_slots; ++s) {
      if (need[s] <= 0) continue;
      int64_t row = std::max<int64_t>(used_[s] - windows_[gi], 0);
      int64_t target = std::min<int64_t>(row * static_cast<int64_t>(g_.bytes_per_token) /
                                             static_cast<int64_t>(g_.page_size), committed_[s]);
      if (target > first[s]) trim_.emplace_back(gi, s, target);
    }
  }
  return !trim_.empty();
}

template <typename T>
StepStatus SlotTable::step(const T* need, size_t n, int64_t lookahead) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open_locked("step");
  if (!valid_locked(need, n)) return kStepInvalid;
  join_locked();
  plan_locked(need, plan_);
  if (!plan_.empty()) {
    size_t wanted = plan_cost_locked(plan_);
    size_t available = buffers_[0]->pool().available();
    if (wanted > available) {
      short_wanted_ = wanted;
      short_available_ = available;
      return kStepShort;
    }
    commit_plan_locked(plan_);  // throws with nothing changed
  }
  // Only once every page is mapped: a failed step changes nothing.
  bool trim = !windows_.empty() && plan_trim_locked(need);
  for (size_t s = 0; s < n; ++s) used_[s] = std::max<int64_t>(used_[s], static_cast<int64_t>(need[s]));
  if (lookahead < 0) return trim ? kStepTrim : kStepDone;

  // The prefetch: what need + lookahead will want, where need names a slot.
  plan_.clear();
  int64_t ahead_cap = std::min<int64_t>(lookahead, g_.max_seq_len);
  for (size_t s = 0; s < n; ++s) {
    int64_t v = static_cast<int64_t>(need[s]);
    if (v == 0) continue;
    int64_t ahead = std::min<int64_t>(v + ahead_cap, g_.max_seq_len);
    if (ahead > covered_[s]) plan_.emplace_back(s, pages_for(ahead));
  }
  if (!plan_.empty() && plan_cost_locked(plan_) <= buffers_[0]->pool().available()) {
    // Only pages free now: no reclaiming in the background; the next step decides.
    std::vector<CommitJob> jobs;
    jobs.reserve(plan_.size() * buffers_.size());
    for (const auto& [slot, pages] : plan_) {
      size_t first = slot * g_.pages_per_slot + static_cast<size_t>(committed_[slot]);
      size_t count = static_cast<size_t>(pages - committed_[slot]);
      for (const auto& res : buffers_) jobs.push_back({res, first, count});
    }
    ticket_ = committer_->submit(std::move(jobs));
    pending_ = plan_;
    ++commit_calls_;
  }
  return trim ? kStepTrim : kStepDone;
}

template <typename T>
StepStatus SlotTable::step_quiet(const T* need, size_t n, int64_t lookahead) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open_locked("step");
  if (n != g_.num_slots) return kStepInvalid;
  // One branch-free pass (the compiler vectorises it): each entry valid, and
  // whether any slot wants pages, i.e. need + lookahead (>= need: one compare
  // covers the commit and the prefetch) passes what its pages cover.
  int64_t ahead_cap = lookahead < 0 ? 0 : std::min<int64_t>(lookahead, g_.max_seq_len);
  bool ok = true, busy = false;
  for (size_t s = 0; s < n; ++s) {
    int64_t v = static_cast<int64_t>(need[s]);
    ok &= (v >= 0) & (v <= g_.max_seq_len) & ((v == 0) | (active_[s] != 0));
    busy |= (v > 0) & (std::min<int64_t>(v + ahead_cap, g_.max_seq_len) > covered_[s]);
  }
  if (!ok) return kStepInvalid;
  if (busy || ticket_ != 0 || (!windows_.empty() && plan_trim_locked(need))) return kStepBusy;
  for (size_t s = 0; s < n; ++s) used_[s] = std::max<int64_t>(used_[s], static_cast<int64_t>(need[s]));
  return kStepDone;
}

template <typename T>
int64_t SlotTable::plan_pages(const T* need, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open_locked("plan_pages");
  if (!valid_locked(need, n)) return -1;
  join_locked();
  plan_locked(need, plan_);
  return static_cast<int64_t>(plan_cost_locked(plan_));
}

std::pair<size_t, size_t> SlotTable::short_pages() const { return {short_wanted_, short_available_}; }

void SlotTable::trim_windows(std::optional<uintptr_t> stream) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open_locked("trim_windows");
  for (const auto& [gi, slot, planned] : trim_) {
    // The plan is the last step's; if the slot shrank since (a crop), never past its committed end.
    int64_t target = std::min(planned, committed_[slot]);
    int64_t* first = first_pages_.data() + gi * g_.num_slots + slot;
    if (target <= *first) continue;
    for (const auto& res : group_buffers_[gi])
      res->decommit(slot * g_.pages_per_slot + static_cast<size_t>(*first), static_cast<size_t>(target - *first),
                    stream);
    *first = target;
  }
  trim_.clear();
}

void SlotTable::join() {
  std::lock_guard<std::mutex> lock(mu_);
  join_locked();
}

bool SlotTable::pending() {
  std::lock_guard<std::mutex> lock(mu_);
  return ticket_ != 0;
}

void SlotTable::join_locked() {
  if (ticket_ == 0) return;
  uint64_t ticket = ticket_;
  std::vector<std::pair<size_t, int64_t>> plan;
  plan.swap(pending_);
  ticket_ = 0;
  // Jobs run buffer by buffer: a failed prefetch is rolled back so that every
  // buffer agrees with the table again.
  auto roll_back = [&] {
    for (const auto& [slot, pages] : plan) {
      size_t first = slot * g_.pages_per_slot + static_cast<size_t>(committed_[slot]);
      size_t count = static_cast<size_t>(pages - committed_[slot]);
      for (const auto& res : buffers_) {
        try {
          res->decommit(first, count, std::nullopt);
        } catch (...) {
        }
      }
    }
  };
  try {
    committer_->wait(ticket);
  } catch (const OutOfPages&) {
    // The prefetch took pages that were free when it was queued, and another
    // user of the pool (a cache sharing it) took them first: skipped, as
    // step_async documents. The next step's synchronous part commits, or
    // raises OutOfPages, when the need is real; the call that joins here (a
    // free() giving memory back) must not fail for it.
    roll_back();
    return;
  } catch (...) {
    roll_back();
    throw;
  }
  for (const auto& [slot, pages] : plan) set_committed_locked(slot, std::max(committed_[slot], pages));
}

void SlotTable::commit_slots(const std::vector<std::pair<size_t, int64_t>>& plan) {
  std::lock_guard<std::mutex> lock(mu_);
  check_open_locked("commit_slots");
  std::vector<std::pair<size_t, int64_t>> grow;
  std::vector<bool> seen(g_.num_slots, false);
  for (const auto& [slot, pages] : plan) {
    if (slot >= g_.num_slots || pages < 0 || static_cast<size_t>(pages) > g_.pages_per_slot || seen[slot])
      throw InvalidArgument("commit_slots: expected distinct slots < " + std::to_string(g_.num_slots) +
                            " and pages in [0, " + std::to_string(g_.pages_per_slot) + "], got slot " +
                            std::to_string(slot) + ", pages " + std::to_string(pages));
    seen[slot] = true;
    if (pages > committed_[slot]) grow.emplace_back(slot, pages);
  }
  if (!grow.empty()) commit_plan_locked(grow);
}

void SlotTable::set_committed(size_t slot, int64_t pages) {
  std::lock_guard<std::mutex> lock(mu_);
  if (slot >= g_.num_slots || pages < 0 || static_cast<size_t>(pages) > g_.pages_per_slot)
    throw InvalidArgument("set_committed: expected a slot < " + std::to_string(g_.num_slots) + " and pages in [0, " +
                          std::to_string(g_.pages_per_slot) + "], got slot " + std::to_string(slot) + ", pages " +
                          std::to_string(pages));
  set_committed_locked(slot, pages);
}

void SlotTable::close() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
  buffers_.clear();
  group_buffers_.clear();
  committer_.reset();
  ticket_ = 0;
  pending_.clear();
  trim_.clear();
}

void SlotTable::check_open_locked(const char* what) const {
  if (closed_) throw InvalidArgument(std::string(what) + ": the slot table was closed (its cache was closed)");
}

uint64_t SlotTable::commit_calls() {
  std::lock_guard<std::mutex> lock(mu_);
  return commit_calls_;
}

template StepStatus SlotTable::step<int64_t>(const int64_t*, size_t, int64_t);
template StepStatus SlotTable::step<int32_t>(const int32_t*, size_t, int64_t);
template StepStatus SlotTable::step_quiet<int64_t>(const int64_t*, size_t, int64_t);
template StepStatus SlotTable::step_quiet<int32_t>(const int32_t*, size_t, int64_t);
template int64_t SlotTable::plan_pages<int64_t>(const int64_t*, size_t);
template int64_t SlotTable::plan_pages<int32_t>(const int32_t*, size_t);

}  // namespace vkv
