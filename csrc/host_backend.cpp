// The host backend: a memfd is the "physical memory", page i lives at offset
// i * page_size in it. A reservation is one read-only anonymous private
// mapping: every page of it reads as zeros (the kernel's shared zero page, no
// memory used) and a write faults. map puts a file page over part of it with
// MAP_FIXED|MAP_SHARED (so two addresses can alias one page); unmap puts the
// read-only zero mapping back; retire (close) puts a writable one over the whole range. In strict mode (TORCH_VKV_DEBUG=1 when the
// range is reserved) the unbacked pages are PROT_NONE instead, so any read of
// them faults: the test suite's way to catch out-of-bounds reads.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>

#include "backend.h"
#include "errors.h"
#include "util.h"

namespace vkv {
namespace {

class HostBackend final : public Backend {
 public:
  explicit HostBackend(size_t page_size) : page_size_(page_size) {
    long os_page = sysconf(_SC_PAGESIZE);
    if (page_size == 0 || page_size % static_cast<size_t>(os_page) != 0)
      throw InvalidArgument("host page_size must be a positive multiple of the OS page size (" +
                            std::to_string(os_page) + " bytes), got " + std::to_string(page_size));
    struct sysinfo info;
    if (sysinfo(&info) == 0) {
      unsigned long long memory = (static_cast<unsigned long long>(info.totalram) + info.totalswap) * info.mem_unit;
      // A page larger than the machine's memory could never be committed: refuse it here, not at first use.
      if (memory > 0 && page_size > memory)
        throw InvalidArgument("host page_size must be at most the machine's memory (RAM + swap, " +
                              std::to_string(memory) + " bytes), got " + std::to_string(page_size));
      page_limit_ = std::max<size_t>(1, memory / page_size_);
    }
    fd_ = memfd_create("torch_vkv", MFD_CLOEXEC);
    if (fd_ < 0) throw DriverError(sys_error("memfd_create", "\"torch_vkv\""));
  }
  ~HostBackend() override {
    if (fd_ >= 0) close(fd_);
  }

  std::string name() const override { return "host"; }
  int device() const override { return -1; }
  size_t page_size() const override { return page_size_; }

  uintptr_t reserve(size_t bytes) override {
    // Over-reserve by a page and trim, so the range is aligned to page_size
    // as cuMemAddressReserve's is.
    bool strict = debug_mode();
    size_t span = bytes + page_size_;
    void* p = mmap(nullptr, span, unbacked_prot(strict), kUnbackedFlags, -1, 0);
    if (p == MAP_FAILED) throw DriverError(sys_error("mmap", "unbacked range, " + std::to_string(span) + " bytes"));
    uintptr_t start = reinterpret_cast<uintptr_t>(p);
    uintptr_t aligned = (start + page_size_ - 1) / page_size_ * page_size_;
    if (aligned > start) munmap(p, aligned - start);
    uintptr_t end = start + span, aligned_end = aligned + bytes;
    if (end > aligned_end) munmap(reinterpret_cast<void*>(aligned_end), end - aligned_end);
    std::lock_guard<std::mutex> lock(ranges_mu_);
    ranges_[aligned] = Range{bytes, strict};
    return aligned;
  }

  void release(uintptr_t addr, size_t bytes) override {
    munmap(reinterpret_cast<void*>(addr), bytes);
    std::lock_guard<std::mutex> lock(ranges_mu_);
    ranges_.erase(addr);
  }

  size_t page_limit() const override { return page_limit_; }

  PageHandle create_page() override {
    size_t index;
    if (holes_.empty() && file_pages_ >= page_limit_)
      throw OutOfPages("out of host memory: " + std::to_string(file_pages_) + " pages of " + std::to_string(page_size_) +
                           " bytes exist, as many as the machine's memory and swap hold",
                       1, 0);
    if (!holes_.empty()) {
      index = *holes_.begin();
      holes_.erase(holes_.begin());
    } else {
      index = file_pages_;
      if (ftruncate(fd_, static_cast<off_t>((file_pages_ + 1) * page_size_)) != 0)
        throw OutOfPages(sys_error("ftruncate", std::to_string((file_pages_ + 1) * page_size_) + " bytes"), 1, 0);
      ++file_pages_;
    }
    return index;
  }

  void destroy_page(PageHandle page) override {
    // Give the memory back to the OS; the offset is reused by a later page,
    // which then reads as zeros, like a fresh page.
    fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(page * page_size_),
              static_cast<off_t>(page_size_));
    holes_.insert(page);
  }

  void map(uintptr_t addr, PageHandle page) override {
    void* p = mmap(reinterpret_cast<void*>(addr), page_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd_,
                   static_cast<off_t>(page * page_size_));
    if (p == MAP_FAILED) {
      // ENOMEM: the process is at the kernel's limit of memory mappings (vm.max_map_count) or out of memory.
      // A capacity error, as CUDA_ERROR_OUT_OF_MEMORY from cuMemMap is: a scheduler can free pages and retry.
      int err = errno;  // before the message's allocations
      std::string where = "MAP_FIXED at " + hex(addr) + ", page " + std::to_string(page);
      errno = err;
      std::string what = sys_error("mmap", where);
      if (err == ENOMEM) throw OutOfPages(what + " (out of host memory mappings: vm.max_map_count)", 1, 0);
      throw DriverError(what);
    }
  }

  void set_access(uintptr_t, size_t) override {}  // map already gave read/write

  void unmap(uintptr_t addr, size_t bytes) override {
    void* p = mmap(reinterpret_cast<void*>(addr), bytes, unbacked_prot(strict_at(addr)), kUnbackedFlags | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED)
      throw DriverError(sys_error("mmap", "unbacked pages over " + hex(addr) + ", " + std::to_string(bytes) + " bytes"));
  }

  bool retire(uintptr_t addr, size_t bytes) override {
    // Private anonymous zeros, writable: a tensor kept past close() (a slice of a cache view, a
    // NumPy array over it, a thread still writing while another closes) reads zeros and its
    // writes land in memory of its own, freed with the range, instead of faulting on the
    // read-only zero mapping. One mmap swaps the whole range, so no write sees it unmapped.
    // Strict mode keeps faulting, as CUDA does on freed memory.
    if (strict_at(addr)) return false;
    void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_READ | PROT_WRITE, kUnbackedFlags | MAP_FIXED, -1, 0);
    return p != MAP_FAILED;
  }

  void make_private(uintptr_t addr, PageHandle page) override {
    // Copy-on-write over the same file page: the child reads what the page
    // holds and keeps its own writes.
    mmap(reinterpret_cast<void*>(addr), page_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd_,
         static_cast<off_t>(page * page_size_));
  }

  // No lock: another thread of the parent may have held ranges_mu_ at fork().
  void forget(uintptr_t addr, size_t bytes) override { munmap(reinterpret_cast<void*>(addr), bytes); }

  bool fresh_pages_are_zero() const override { return true; }
  void zero(uintptr_t addr, size_t bytes) override { std::memset(reinterpret_cast<void*>(addr), 0, bytes); }

  Fence record_fence(uintptr_t) override {
    std::lock_guard<std::mutex> lock(fence_mu_);
    if (!hold_) return 0;
    Fence f = ++last_fence_;
    pending_.insert(f);
    return f;
  }
  bool fence_done(Fence f) override {
    std::lock_guard<std::mutex> lock(fence_mu_);
    return pending_.count(f) == 0;
  }
  void fence_wait(Fence f) override {
    // A held fence would never finish on its own; waiting releases it, as a
    // finished kernel would.
    std::lock_guard<std::mutex> lock(fence_mu_);
    pending_.erase(f);
  }
  void fence_destroy(Fence f) override {
    std::lock_guard<std::mutex> lock(fence_mu_);
    pending_.erase(f);
  }

  void hold_fences(bool hold) {
    std::lock_guard<std::mutex> lock(fence_mu_);
    hold_ = hold;
    if (!hold) pending_.clear();
  }

 private:
  static constexpr int kUnbackedFlags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  static int unbacked_prot(bool strict) { return strict ? PROT_NONE : PROT_READ; }

  // Whether the reserved range holding `addr` was reserved in strict mode.
  bool strict_at(uintptr_t addr) {
    std::lock_guard<std::mutex> lock(ranges_mu_);
    auto it = ranges_.upper_bound(addr);
    if (it == ranges_.begin()) return debug_mode();  // not reserved here: a caller's range
    --it;
    return addr < it->first + it->second.bytes ? it->second.strict : debug_mode();
  }

  struct Range {
    size_t bytes;
    bool strict;
  };

  size_t page_size_;
  size_t page_limit_ = SIZE_MAX;  // pages the machine's memory and swap hold
  int fd_ = -1;
  std::mutex ranges_mu_;
  std::map<uintptr_t, Range> ranges_;  // reserved ranges by base address
  size_t file_pages_ = 0;
  std::set<size_t> holes_;
  std::mutex fence_mu_;
  bool hold_ = false;
  Fence last_fence_ = 0;
  std::set<Fence> pending_;
};

}  // namespace

std::shared_ptr<Backend> make_host_backend(size_t page_size) { return std::make_shared<HostBackend>(page_size); }

void host_hold_fences(Backend& host, bool hold) {
  auto* h = dynamic_cast<HostBackend*>(&host);
  if (!h) throw InvalidArgument("hold_fences is a test hook of the host backend, got backend '" + host.name() + "'");
  h->hold_fences(hold);
}

}  // namespace vkv
