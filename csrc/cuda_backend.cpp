// The CUDA backend: cuMemAddressReserve / cuMemCreate / cuMemMap /
// cuMemSetAccess / cuMemUnmap on one device, in its primary context (the one
// PyTorch's runtime uses).
#include <map>
#include <mutex>

#include "backend.h"
#include "driver.h"
#include "errors.h"
#include "fork.h"
#include "util.h"

namespace vkv {
namespace {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device), api_(cu::api()) {
    cu::check(api_.cuDeviceGet(&dev_, device), "cuDeviceGet", "ordinal=" + std::to_string(device));
    cu::check(api_.cuDevicePrimaryCtxRetain(&ctx_, dev_), "cuDevicePrimaryCtxRetain", "device=" + std::to_string(device));
    ThreadBinding bound(*this);
    prop_ = {};
    prop_.type = cu::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.requestedHandleTypes = cu::CU_MEM_HANDLE_TYPE_NONE;
    prop_.location.type = cu::CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = dev_;
    cu::check(api_.cuMemGetAllocationGranularity(&page_size_, &prop_, cu::CU_MEM_ALLOC_GRANULARITY_MINIMUM),
              "cuMemGetAllocationGranularity", "device=" + std::to_string(device));
    access_.location = prop_.location;
    access_.flags = cu::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    // Our own non-blocking stream zeroes fresh pages, so zeroing neither waits
    // for nor delays the user's kernels.
    cu::check(api_.cuStreamCreate(&zero_stream_, cu::CU_STREAM_NON_BLOCKING), "cuStreamCreate", "NON_BLOCKING");
  }

  ~CudaBackend() override {
    // Destructors report nothing; the process may be shutting down. A forked
    // child cannot use CUDA at all: it makes no driver call.
    if (origin_.forked()) return;
    api_.cuCtxSetCurrent(ctx_);
    if (zero_stream_) api_.cuStreamDestroy(zero_stream_);
    api_.cuDevicePrimaryCtxRelease(dev_);
  }

  std::string name() const override { return "cuda"; }
  int device() const override { return device_; }
  size_t page_size() const override { return page_size_; }
  const Origin& origin() const { return origin_; }
  void synchronize() override { cu::check(api_.cuCtxSynchronize(), "cuCtxSynchronize", "device=" + std::to_string(device_)); }
  uintptr_t bind_thread() override {
    cu::CUcontext current = nullptr;
    cu::check(api_.cuCtxGetCurrent(&current), "cuCtxGetCurrent", "device=" + std::to_string(device_));
    if (current == ctx_) return 0;
    cu::check(api_.cuCtxSetCurrent(ctx_), "cuCtxSetCurrent", "device=" + std::to_string(device_));
    // A thread with no context keeps ours (the runtime would make a primary context current there too).
    return reinterpret_cast<uintptr_t>(current);
  }
  void unbind_thread(uintptr_t previous) override {
    if (previous != 0) api_.cuCtxSetCurrent(reinterpret_cast<cu::CUcontext>(previous));
  }

  uintptr_t reserve(size_t bytes) override {
    cu::CUdeviceptr p = 0;
    cu::check(api_.cuMemAddressReserve(&p, bytes, page_size_, 0, 0), "cuMemAddressReserve", "size=" + std::to_string(bytes));
    return p;
  }
  void release(uintptr_t addr, size_t bytes) override { api_.cuMemAddressFree(addr, bytes); }

  PageHandle create_page() override {
    cu::CUmemGenericAllocationHandle h = 0;
    cu::check(api_.cuMemCreate(&h, page_size_, &prop_, 0), "cuMemCreate", "size=" + std::to_string(page_size_));
    return h;
  }
  void destroy_page(PageHandle page) override { api_.cuMemRelease(page); }

  void map(uintptr_t addr, PageHandle page) override {
    cu::check(api_.cuMemMap(addr, page_size_, 0, page, 0), "cuMemMap",
              "ptr=" + hex(addr) + ", size=" + std::to_string(page_size_));
  }
  void set_access(uintptr_t addr, size_t bytes) override {
    cu::check(api_.cuMemSetAccess(addr, bytes, &access_, 1), "cuMemSetAccess",
              "ptr=" + hex(addr) + ", size=" + std::to_string(bytes));
  }
  void unmap(uintptr_t addr, size_t bytes) override {
    cu::check(api_.cuMemUnmap(addr, bytes), "cuMemUnmap", "ptr=" + hex(addr) + ", size=" + std::to_string(bytes));
  }
  void zero(uintptr_t addr, size_t bytes) override {
    cu::check(api_.cuMemsetD8Async(addr, 0, bytes, zero_stream_), "cuMemsetD8Async",
              "ptr=" + hex(addr) + ", size=" + std::to_string(bytes));
    cu::check(api_.cuStreamSynchronize(zero_stream_), "cuStreamSynchronize", "zero stream");
  }

  Fence record_fence(uintptr_t stream) override {
    cu::CUevent ev = nullptr;
    cu::check(api_.cuEventCreate(&ev, cu::CU_EVENT_DISABLE_TIMING), "cuEventCreate", "DISABLE_TIMING");
    cu::CUresult r = api_.cuEventRecord(ev, reinterpret_cast<cu::CUstream>(stream));
    if (r != cu::CUDA_SUCCESS) {
      api_.cuEventDestroy(ev);
      cu::check(r, "cuEventRecord", "stream=" + hex(stream));
    }
    return reinterpret_cast<Fence>(ev);
  }
  bool fence_done(Fence f) override {
    cu::CUresult r = api_.cuEventQuery(reinterpret_cast<cu::CUevent>(f));
    if (r == cu::CUDA_ERROR_NOT_READY) return false;
    cu::check(r, "cuEventQuery", "event=" + hex(f));
    return true;
  }
  void fence_wait(Fence f) override {
    cu::check(api_.cuEventSynchronize(reinterpret_cast<cu::CUevent>(f)), "cuEventSynchronize", "event=" + hex(f));
  }
  void fence_destroy(Fence f) override { api_.cuEventDestroy(reinterpret_cast<cu::CUevent>(f)); }

 private:
  Origin origin_;
  int device_;
  const cu::Api& api_;
  cu::CUdevice dev_ = 0;
  cu::CUcontext ctx_ = nullptr;
  cu::CUmemAllocationProp prop_{};
  cu::CUmemAccessDesc access_{};
  size_t page_size_ = 0;
  cu::CUstream zero_stream_ = nullptr;
};

}  // namespace

std::shared_ptr<Backend> cuda_backend(int device) {
  // One backend per device, shared by every pool and by the pluggable
  // allocator; it lives as long as someone holds it.
  static std::mutex mu;
  static std::map<int, std::weak_ptr<CudaBackend>> by_device;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) throw InvalidArgument("CUDA device ordinal must be >= 0, got " + std::to_string(device));
  auto& weak = by_device[device];
  if (auto alive = weak.lock()) {
    alive->origin().check();  // CUDA is not usable in a forked child
    return alive;
  }
  auto made = std::make_shared<CudaBackend>(device);
  weak = made;
  return made;
}

}  // namespace vkv
