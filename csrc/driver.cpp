#include "driver.h"

#include <dlfcn.h>

#include <mutex>

#include "errors.h"

namespace vkv::cu {
namespace {

struct Loaded {
  Api api{};
  std::string error;  // non-empty when loading failed
};

template <typename F>
void resolve(void* lib, const char* versioned, const char* plain, F*& out, std::string& error) {
  void* sym = dlsym(lib, versioned);
  if (!sym) sym = dlsym(lib, plain);
  if (!sym && error.empty()) error = std::string("libcuda.so.1 has no symbol ") + plain;
  out = reinterpret_cast<F*>(sym);
}

const Loaded& loaded() {
  static Loaded state;
  static std::once_flag once;
  std::call_once(once, [] {
    // Never closed: the driver stays loaded for the life of the process.
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      state.error = std::string("cannot open libcuda.so.1 (is an NVIDIA driver installed?): ") + (why ? why : "");
      return;
    }
    Api& a = state.api;
    std::string& e = state.error;
#define VKV_RESOLVE(name, versioned) resolve(lib, versioned, #name, a.name, e)
    VKV_RESOLVE(cuInit, "cuInit");
    VKV_RESOLVE(cuGetErrorName, "cuGetErrorName");
    VKV_RESOLVE(cuGetErrorString, "cuGetErrorString");
    VKV_RESOLVE(cuDeviceGet, "cuDeviceGet");
    VKV_RESOLVE(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    VKV_RESOLVE(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2");
    VKV_RESOLVE(cuCtxSetCurrent, "cuCtxSetCurrent");
    VKV_RESOLVE(cuCtxGetCurrent, "cuCtxGetCurrent");
    VKV_RESOLVE(cuCtxSynchronize, "cuCtxSynchronize");
    VKV_RESOLVE(cuMemGetInfo, "cuMemGetInfo_v2");
    VKV_RESOLVE(cuMemGetAllocationGranularity, "cuMemGetAllocationGranularity");
    VKV_RESOLVE(cuMemAddressReserve, "cuMemAddressReserve");
    VKV_RESOLVE(cuMemAddressFree, "cuMemAddressFree");
    VKV_RESOLVE(cuMemCreate, "cuMemCreate");
    VKV_RESOLVE(cuMemRelease, "cuMemRelease");
    VKV_RESOLVE(cuMemMap, "cuMemMap");
    VKV_RESOLVE(cuMemUnmap, "cuMemUnmap");
    VKV_RESOLVE(cuMemSetAccess, "cuMemSetAccess");
    VKV_RESOLVE(cuStreamCreate, "cuStreamCreate");
    VKV_RESOLVE(cuStreamDestroy, "cuStreamDestroy_v2");
    VKV_RESOLVE(cuStreamSynchronize, "cuStreamSynchronize");
    VKV_RESOLVE(cuMemsetD8Async, "cuMemsetD8Async");
    VKV_RESOLVE(cuEventCreate, "cuEventCreate");
    VKV_RESOLVE(cuEventRecord, "cuEventRecord");
    VKV_RESOLVE(cuEventQuery, "cuEventQuery");
    VKV_RESOLVE(cuEventSynchronize, "cuEventSynchronize");
    VKV_RESOLVE(cuEventDestroy, "cuEventDestroy_v2");
#undef VKV_RESOLVE
    if (e.empty()) {
      CUresult r = a.cuInit(0);
      if (r != CUDA_SUCCESS) e = "cuInit(0) failed: " + error_string(r);
    }
  });
  return state;
}

}  // namespace

const Api& api() {
  const Loaded& l = loaded();
  if (!l.error.empty()) throw DriverError(l.error);
  return l.api;
}

bool available() { return loaded().error.empty(); }

std::string error_string(CUresult r) {
  const Loaded& l = loaded();
  const char* name = nullptr;
  const char* text = nullptr;
  if (l.api.cuGetErrorName) l.api.cuGetErrorName(r, &name);
  if (l.api.cuGetErrorString) l.api.cuGetErrorString(r, &text);
  std::string out = name ? name : ("CUresult " + std::to_string(r));
  if (text) out += std::string(" (") + text + ")";
  return out;
}

void check(CUresult r, const char* call, const std::string& args) {
  if (r == CUDA_SUCCESS) return;
  std::string msg = std::string(call) + "(" + args + ") failed: " + error_string(r);
  if (r == CUDA_ERROR_OUT_OF_MEMORY) throw OutOfPages(msg, 1, 0);
  throw DriverError(msg);
}

}  // namespace vkv::cu
