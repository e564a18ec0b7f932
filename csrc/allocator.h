// The C allocator behind torch.cuda.memory.CUDAPluggableAllocator: it reserves
// virtual address space only. A Reservation then adopts the range
// (allocator_adopt) and commits pages into it on demand. This file depends on
// pool.h, never the other way round.
//
//   void* vkv_alloc(ssize_t size, int device, cudaStream_t stream);
//   void  vkv_free(void* ptr, size_t size, int device, cudaStream_t stream);
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace vkv {

class Backend;
class PagePool;
class Reservation;

// Reserves `size` bytes (rounded up to pages) on `backend` and records the
// region; returns its base address. Shared by vkv_alloc and the CPU tests.
uintptr_t allocator_reserve(std::shared_ptr<Backend> backend, size_t size);
// Releases a recorded region: the adopting reservation (if alive) drops its
// pages first. Unknown addresses are ignored. Returns whether it was known.
bool allocator_release(uintptr_t addr);
size_t allocator_region_bytes(uintptr_t addr);  // throws InvalidArgument if unknown
// A Reservation over the recorded region at `addr`, drawing pages from
// `pool`; vkv_free later drops its pages before freeing the address. Throws
// InvalidArgument for an unknown or already adopted address.
std::shared_ptr<Reservation> allocator_adopt(std::shared_ptr<PagePool> pool, uintptr_t addr);
size_t allocator_num_regions();
std::string allocator_last_error();

}  // namespace vkv

extern "C" {
__attribute__((visibility("default"))) void* vkv_alloc(ssize_t size, int device, void* stream);
__attribute__((visibility("default"))) void vkv_free(void* ptr, size_t size, int device, void* stream);
}
