#include "committer.h"

#include "errors.h"

namespace vkv {

Committer::Committer() : thread_([this] { run(); }) {}

Committer::~Committer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

uint64_t Committer::submit(std::vector<CommitJob> jobs) {
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ticket = ++next_ticket_;
    queue_.emplace_back(ticket, std::move(jobs));
  }
  cv_.notify_all();
  return ticket;
}

void Committer::wait(uint64_t ticket) {
  std::unique_lock<std::mutex> lock(mu_);
  if (ticket > next_ticket_) throw InvalidArgument("unknown committer ticket " + std::to_string(ticket));
  cv_.wait(lock, [&] { return finished_ >= ticket; });
  auto it = errors_.find(ticket);
  if (it != errors_.end()) {
    std::exception_ptr e = it->second;
    errors_.erase(it);
    std::rethrow_exception(e);
  }
}

bool Committer::done(uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_ >= ticket;
}

size_t Committer::pages_committed() {
  std::lock_guard<std::mutex> lock(mu_);
  return pages_committed_;
}

void Committer::run() {
  for (;;) {
    std::pair<uint64_t, std::vector<CommitJob>> item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left to do
      item = std::move(queue_.front());
      queue_.pop_front();
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
      std::lock_guard<std::mutex> lock(mu_);
      if (error) errors_[item.first] = error;
      pages_committed_ += committed;
      finished_ = item.first;
    }
    cv_.notify_all();
  }
}

}  // namespace vkv
