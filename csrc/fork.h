// What fork() does to the core. A child process inherits every pool,
// reservation and committer of its parent as plain memory: the committer's
// thread does not exist there, CUDA is unusable there, and host pages are the
// parent's memfd pages. So:
//   * every object remembers the process that created it (Origin), and each
//     of its operations in another process throws Forked ("this cache was
//     created in process <pid>; create a new cache in the child");
//   * destructors in the child touch neither the driver, nor the memfd, nor
//     the parent's threads (a committer never joins, a pool destroys no page);
//   * pthread_atfork handlers, installed when the library loads, make the
//     child's mappings of committed host pages private (copy-on-write), so its
//     writes never reach the parent. While fork() runs, the prepare handler
//     holds every pool's mutex, so no commit is half done in the child.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace vkv {

class Reservation;

// The process an object was created in.
class Origin {
 public:
  Origin();
  // True in a process forked after the object was created.
  bool forked() const;
  pid_t pid() const { return pid_; }
  // Throws Forked when forked().
  void check() const;

 private:
  pid_t pid_;
  uint64_t generation_;
};

// Live reservations, for the fork handlers. Register after construction and
// unregister before destruction, never while holding a pool mutex.
void fork_register(Reservation* res);
void fork_unregister(Reservation* res);

}  // namespace vkv
