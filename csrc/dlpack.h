// Layer 2: a reservation as a DLPack tensor, the storage PyTorch builds
// VirtualKVTensor on (torch.from_dlpack). The DLPack deleter holds a reference
// to the reservation, so every tensor and view over it keeps the virtual range
// alive, exactly like any other storage: the range (and any pages still
// committed) is released when the last of them dies.
//
// Only the few DLPack ABI types needed are declared, with the layout of
// dlpack.h (the unversioned "dltensor" capsule every framework reads).
#pragma once

#include <cstdint>
#include <memory>

namespace vkv {

class Reservation;

struct DLDevice {
  int32_t device_type;  // kDLCPU = 1, kDLCUDA = 2
  int32_t device_id;
};

struct DLDataType {
  uint8_t code;  // kDLUInt = 1
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // nullptr: compact row-major
  uint64_t byte_offset;
};

struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// A 1-D uint8 tensor over the whole reserved range of `res`, on its backend's
// device. The consumer calls `deleter` once when it no longer needs the data.
DLManagedTensor* export_dlpack(std::shared_ptr<Reservation> res);

}  // namespace vkv
