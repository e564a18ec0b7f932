// Exceptions of the C++ core. The binding layer translates them into Python:
// OutOfPages -> torch_vkv.OutOfPagesError, DriverError -> RuntimeError,
// InvalidArgument -> ValueError, WrongType -> TypeError, Forked -> RuntimeError. Nothing in the core
// ever exits or aborts.
#pragma once

#include <stdexcept>
#include <string>

namespace vkv {

struct DriverError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// An argument of the wrong kind, such as None where an object is needed (-> TypeError).
struct WrongType : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Throws WrongType when `p` is null: None passed from Python for a core object.
template <typename T>
const T& require(const T& p, const char* what) {
  if (!p) throw WrongType(std::string(what) + ": expected an object, got None");
  return p;
}

// An object inherited through fork() was used in the child (fork.h).
struct Forked : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// No physical page could be had: the pool's budget is spent, or the driver
// itself is out of memory. Whatever raised it changed nothing.
struct OutOfPages : std::runtime_error {
  OutOfPages(const std::string& what, size_t requested_pages, size_t available_pages)
      : std::runtime_error(what), requested(requested_pages), available(available_pages) {}
  size_t requested;
  size_t available;
};

}  // namespace vkv
