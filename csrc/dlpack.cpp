#include "dlpack.h"

#include "pool.h"

namespace vkv {
namespace {

constexpr int32_t kDLCPU = 1;
constexpr int32_t kDLCUDA = 2;
constexpr uint8_t kDLUInt = 1;

struct Export {
  DLManagedTensor managed{};
  int64_t shape[1] = {0};
  std::shared_ptr<Reservation> owner;
};

// Runs when the last tensor over the range dies, possibly on any thread:
// dropping the reference may run ~Reservation (no Python involved).
void release_export(DLManagedTensor* self) { delete static_cast<Export*>(self->manager_ctx); }

}  // namespace

DLManagedTensor* export_dlpack(std::shared_ptr<Reservation> res) {
  int device = res->pool().backend().device();
  auto* e = new Export();
  e->shape[0] = static_cast<int64_t>(res->bytes());
  DLTensor& t = e->managed.dl_tensor;
  t.data = reinterpret_cast<void*>(res->base());
  t.device = device < 0 ? DLDevice{kDLCPU, 0} : DLDevice{kDLCUDA, device};
  t.ndim = 1;
  t.dtype = DLDataType{kDLUInt, 8, 1};
  t.shape = e->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  e->owner = std::move(res);
  e->managed.manager_ctx = e;
  e->managed.deleter = release_export;
  return &e->managed;
}

}  // namespace vkv
