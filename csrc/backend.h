// Layer 1: one interface over the two ways of backing virtual memory with
// physical pages. Both give the same semantics:
//   reserve     -> a virtual range with nothing backed: CUDA faults on access;
//                  the host backend reads zeros and faults on writes (strict
//                  mode, TORCH_VKV_DEBUG=1 when the range is reserved: faults
//                  on any access)
//   create_page -> a physical page of page_size() bytes, owned by the caller
//   map         -> put a page at an address inside a reservation (a page may be
//                  mapped at several addresses at once: aliasing)
//   set_access  -> make a run of mapped pages readable and writable
//   unmap       -> the range is as reserved again; the pages stay alive
// Fences order a decommit after GPU work: an unmap waits for the fence recorded
// after the last kernel that reads the page.
//
// Implementations are not thread safe on their own; PagePool serialises them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace vkv {

using PageHandle = uint64_t;
using Fence = uint64_t;  // 0: nothing to wait for

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;    // "cuda" or "host"
  virtual int device() const = 0;          // CUDA ordinal; -1 for host
  virtual size_t page_size() const = 0;    // bytes; also the mapping granularity

  virtual uintptr_t reserve(size_t bytes) = 0;
  virtual void release(uintptr_t addr, size_t bytes) = 0;
  virtual PageHandle create_page() = 0;
  // Pages that can exist at once; create_page throws OutOfPages past it. The host's pages are
  // sparse memfd memory that no call fails to create, so it bounds them by the machine's memory
  // and swap; CUDA's driver refuses by itself (cuMemCreate runs out of memory).
  virtual size_t page_limit() const { return SIZE_MAX; }
  virtual void destroy_page(PageHandle page) = 0;
  virtual void map(uintptr_t addr, PageHandle page) = 0;
  virtual void set_access(uintptr_t addr, size_t bytes) = 0;
  virtual void unmap(uintptr_t addr, size_t bytes) = 0;
  // The end of a range whose owner closed it for good (Reservation::close): replaces every
  // mapping in [addr, addr + bytes) at once, pages included, with memory that stale views can
  // still read and write until the address is released (a backend whose device may still have
  // work queued on the range waits for it first). Returns false when the backend cannot (CUDA,
  // the host in strict mode): the caller then unmaps the pages as usual.
  virtual bool retire(uintptr_t addr, size_t bytes) { return false; }
  // Fills a mapped range with zeros, finished when this returns.
  virtual void zero(uintptr_t addr, size_t bytes) = 0;
  // Whether a page fresh from create_page() already reads as zeros (memfd
  // pages do; cuMemCreate memory is garbage and may hold NaN).
  virtual bool fresh_pages_are_zero() const { return false; }

  // Records a fence on `stream` (a cudaStream_t as an integer) after the work
  // queued there so far.
  virtual Fence record_fence(uintptr_t stream) = 0;
  virtual bool fence_done(Fence fence) = 0;
  virtual void fence_wait(Fence fence) = 0;
  virtual void fence_destroy(Fence fence) = 0;

  // Waits for all work queued on the device (CUDA: cuCtxSynchronize), before
  // pages that a kernel may still read are unmapped for good.
  virtual void synchronize() {}

  // Makes this backend's context current on the calling thread (CUDA: the
  // device's primary context); returns what unbind_thread() takes to give the
  // thread back the context it had (0: nothing to give back). Cheap; every
  // entry point binds through a ThreadBinding.
  virtual uintptr_t bind_thread() { return 0; }
  virtual void unbind_thread(uintptr_t previous) {}

  // In the child of a fork only (fork.h); neither touches the physical pages
  // the parent still uses. make_private: the child's mapping of `page` at
  // `addr` becomes copy-on-write, so its writes never reach the parent.
  // forget: the child gives its view of a reserved range back. Both do
  // nothing on CUDA, which a forked child cannot use.
  virtual void make_private(uintptr_t addr, PageHandle page) {}
  virtual void forget(uintptr_t addr, size_t bytes) {}
};

// Binds a backend to the calling thread for its scope, then gives the thread
// back the context it had: a thread PyTorch runs on another device keeps its
// current device (torch.cuda.current_device(), streams, new tensors) after a
// call into a cache of this one.
class ThreadBinding {
 public:
  explicit ThreadBinding(Backend& backend) : backend_(backend), previous_(backend.bind_thread()) {}
  ~ThreadBinding() {
    try {
      backend_.unbind_thread(previous_);
    } catch (...) {
    }
  }
  ThreadBinding(const ThreadBinding&) = delete;
  ThreadBinding& operator=(const ThreadBinding&) = delete;

 private:
  Backend& backend_;
  uintptr_t previous_;
};

// memfd + mmap on the CPU. page_size must be a multiple of the OS page size.
std::shared_ptr<Backend> make_host_backend(size_t page_size);

// The CUDA driver's virtual memory API on `device`; page size = the driver's
// allocation granularity (2 MiB on H100/H200). One instance per device is shared.
std::shared_ptr<Backend> cuda_backend(int device);

// Test hook of the host backend: while held, fences recorded on the host
// backend stay pending until released, so CPU tests can exercise ordered
// decommit exactly like an unfinished kernel on the GPU.
void host_hold_fences(Backend& host, bool hold);

}  // namespace vkv
