// Layer 2: the background committer. One long-lived thread commits page
// ranges while the GPU computes (the paper's step_async); the caller waits on
// a ticket before the pages are needed.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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
  ~Committer();  // finishes queued work, then joins the thread
  Committer(const Committer&) = delete;
  Committer& operator=(const Committer&) = delete;

  // Queues `jobs` (run in order); returns a ticket.
  uint64_t submit(std::vector<CommitJob> jobs);
  // Blocks until the ticket's jobs ran; rethrows the first error they raised.
  // Jobs after a failed one in the same ticket are skipped.
  void wait(uint64_t ticket);
  bool done(uint64_t ticket);
  size_t pages_committed();  // total pages the thread committed

 private:
  void run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<uint64_t, std::vector<CommitJob>>> queue_;
  std::map<uint64_t, std::exception_ptr> errors_;
  uint64_t next_ticket_ = 0;
  uint64_t finished_ = 0;  // tickets run in order, so all <= finished_ are done
  size_t pages_committed_ = 0;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace vkv
