// Layer 2: the background committer. One long-lived thread commits page
// ranges while the GPU computes (the paper's step_async); the caller waits on
// a ticket before the pages are needed.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "fork.h"
#include "pool.h"

namespace vkv {

struct CommitJob {
  std::shared_ptr<Reservation> reservation;
  size_t first;
  size_t count;
};

class Committer {
 public:
  Committer();
  // Finishes queued work, then joins the thread. In a forked child, where the
  // thread does not exist, it returns at once and leaks the queue's state.
  ~Committer();
  Committer(const Committer&) = delete;
  Committer& operator=(const Committer&) = delete;

  // Queues `jobs` (run in order); returns a ticket.
  uint64_t submit(std::vector<CommitJob> jobs);
  // Blocks until the ticket's jobs ran; rethrows the first error they raised.
  // Jobs after a failed one in the same ticket are skipped.
  void wait(uint64_t ticket);
  bool done(uint64_t ticket);
  size_t pages_committed();  // total pages the thread committed
  // Whether this committer was inherited from the parent of a fork; every
  // method but this one then throws Forked.
  bool forked() const { return origin_.forked(); }

 private:
  struct State;  // on the heap, so that a forked child can leak it
  static void run(State& s);

  Origin origin_;
  std::unique_ptr<State> state_;
};

}  // namespace vkv
