// Small helpers shared by the core's layers: message formatting and the
// TORCH_VKV_DEBUG switch. No state, no Python, no driver.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace vkv {

// "0x7f12a0000000"
inline std::string hex(uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%zx", static_cast<size_t>(v));
  return buf;
}

// "mmap(PROT_NONE, 4096 bytes) failed: Cannot allocate memory", from errno.
inline std::string sys_error(const char* call, const std::string& args) {
  return std::string(call) + "(" + args + ") failed: " + std::strerror(errno);
}

// Whether TORCH_VKV_DEBUG is set to anything but "" or "0" (read on each call).
inline bool debug_mode() {
  const char* v = std::getenv("TORCH_VKV_DEBUG");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

}  // namespace vkv
