#include "committer.h"

#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "errors.h"

namespace vkv {

struct Committer::State {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<uint64_t, std::vector<CommitJob>>> queue;
  std::map<uint64_t, std::exception_ptr> errors;
  uint64_t next_ticket = 0;
  uint64_t finished = 0;  // tickets run in order, so all <= finished are done
  size_t pages_committed = 0;
  bool stop = false;
  std::thread thread;
};

Committer::Committer() : state_(std::make_unique<State>()) {
  State* s = state_.get();
  s->thread = std::thread([s] { run(*s); });
}

Committer::~Committer() {
  if (origin_.forked()) {
    // The parent's thread does not exist here: joining it would block
    // forever, and so would destroying a condition variable it waited on.
    (void)state_.release();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
  }
  state_->cv.notify_all();
  if (state_->thread.joinable()) state_->thread.join();
}

uint64_t Committer::submit(std::vector<CommitJob> jobs) {
  origin_.check();
  for (const CommitJob& job : jobs) require(job.reservation, "Committer.submit: a job's reservation");
  State& s = *state_;
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    ticket = ++s.next_ticket;
    s.queue.emplace_back(ticket, std::move(jobs));
  }
  s.cv.notify_all();
  return ticket;
}

void Committer::wait(uint64_t ticket) {
  origin_.check();
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.mu);
  if (ticket > s.next_ticket) throw InvalidArgument("unknown committer ticket " + std::to_string(ticket));
  s.cv.wait(lock, [&] { return s.finished >= ticket; });
  auto it = s.errors.find(ticket);
  if (it != s.errors.end()) {
    std::exception_ptr e = it->second;
    s.errors.erase(it);
    std::rethrow_exception(e);
  }
}

bool Committer::done(uint64_t ticket) {
  origin_.check();
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->finished >= ticket;
}

size_t Committer::pages_committed() {
  origin_.check();
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->pages_committed;
}

void Committer::run(State& s) {
  for (;;) {
    std::pair<uint64_t, std::vector<CommitJob>> item;
    {
      std::unique_lock<std::mutex> lock(s.mu);
      s.cv.wait(lock, [&] { return s.stop || !s.queue.empty(); });
      if (s.queue.empty()) return;  // stop and nothing left to do
      item = std::move(s.queue.front());
      s.queue.pop_front();
    }
    std::exception_ptr error;
    size_t committed = 0;
    for (const CommitJob& job : item.second) {
      try {
        committed += job.reservation->commit(job.first, job.count);
      } catch (...) {
        error = std::current_exception();
        break;
      }
    }
    item.second.clear();  // drop reservation references outside the lock
    {
      std::lock_guard<std::mutex> lock(s.mu);
      if (error) s.errors[item.first] = error;
      s.pages_committed += committed;
      s.finished = item.first;
    }
    s.cv.notify_all();
  }
}

}  // namespace vkv
