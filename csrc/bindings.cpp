// Layer 3: registration only. Every call into the core that can wait releases
// the GIL, so the background committer never waits on Python and Python never
// waits on a driver call with the GIL held (PagePool.available, a lock-free
// read, keeps it).
#include <cxxabi.h>
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstring>
#include <exception>
#include <optional>
#include <type_traits>
#include <vector>

#include "allocator.h"
#include "backend.h"
#include "committer.h"
#include "dlpack.h"
#include "driver.h"
#include "errors.h"
#include "pool.h"
#include "slots.h"

namespace py = pybind11;
using namespace vkv;

namespace {

// Runs `fn` without the GIL, then takes the GIL back in this ordinary frame, never in a destructor.
// A daemon thread still inside the core when the interpreter exits is ended by pthread_exit as it
// takes the GIL back; that exit unwinds the thread's stack, and an unwind that leaves a destructor
// (py::gil_scoped_release, py::call_guard) calls std::terminate: the process aborted at exit. Here
// the unwind passes. An error of `fn` is rethrown once the GIL is held again.
template <typename F>
auto without_gil(F&& fn) -> decltype(fn()) {
  using R = decltype(fn());
  std::exception_ptr error;
  std::optional<std::conditional_t<std::is_void_v<R>, bool, R>> result;
  PyThreadState* state = PyEval_SaveThread();
  try {
    if constexpr (std::is_void_v<R>) {
      fn();
    } else {
      result.emplace(fn());
    }
  } catch (abi::__forced_unwind&) {
    throw;  // thread cancellation must go on unwinding
  } catch (...) {
    error = std::current_exception();
  }
  PyEval_RestoreThread(state);
  if (error) std::rethrow_exception(error);
  if constexpr (!std::is_void_v<R>) return std::move(*result);
}

// A method or function bound so that it runs without the GIL (see without_gil).
template <typename R, typename C, typename... A>
auto nogil(R (C::*method)(A...)) {
  return [method](C& self, A... args) -> R {
    return without_gil([&]() -> R { return (self.*method)(std::forward<A>(args)...); });
  };
}
template <typename R, typename... A>
auto nogil(R (*fn)(A...)) {
  return [fn](A... args) -> R { return without_gil([&]() -> R { return fn(std::forward<A>(args)...); }); };
}

py::dict stats_dict(const PoolStats& s) {
  py::dict d;
  d["page_size"] = s.page_size;
  d["max_pages"] = s.max_pages;
  d["created_pages"] = s.created_pages;
  d["free_pages"] = s.free_pages;
  d["mapped_pages"] = s.mapped_pages;
  d["pending_pages"] = s.pending_pages;
  d["pages_created_total"] = s.pages_created_total;
  d["pages_destroyed_total"] = s.pages_destroyed_total;
  d["map_calls"] = s.map_calls;
  d["set_access_calls"] = s.set_access_calls;
  d["unmap_calls"] = s.unmap_calls;
  d["commit_seconds"] = s.commit_seconds;
  d["decommit_seconds"] = s.decommit_seconds;
  return d;
}

// A view of `count` entries of the table's memory; the array keeps the table alive.
template <typename T>
py::array table_view(const std::shared_ptr<SlotTable>& table, T* data, std::vector<py::ssize_t> shape) {
  return py::array(py::dtype::of<T>(), std::move(shape), data, py::cast(table));
}

// `seq_lens` copied as int64 into `out` when it exposes, through the buffer
// protocol, one dimension of native int32 or int64 (a NumPy array, any
// strides); false for anything else (lists, tensors, other dtypes), which the
// caller normalises. Reads the buffer directly: no NumPy API, no temporaries,
// this is the per-step hot path.
bool int64_lengths(py::handle seq_lens, std::vector<int64_t>& out) {
  PyObject* obj = seq_lens.ptr();
  if (!PyObject_CheckBuffer(obj)) return false;
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_RECORDS_RO) != 0) {
    PyErr_Clear();
    return false;
  }
  const char* f = view.format ? view.format : "B";
  // '@' and '=' are native; '<' is too on the little-endian hosts we build for.
  if (*f == '@' || *f == '=' || (*f == '<' && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)) ++f;
  bool is64 = view.itemsize == 8 && (*f == 'q' || *f == 'l') && f[1] == '\0';
  bool is32 = view.itemsize == 4 && (*f == 'i' || *f == 'l') && f[1] == '\0';
  bool ok = view.ndim == 1 && (is64 || is32);
  if (ok) {
    size_t n = static_cast<size_t>(view.shape[0]);
    out.resize(n);
    const char* p = static_cast<const char*>(view.buf);
    py::ssize_t stride = view.strides ? view.strides[0] : view.itemsize;
    if (is64 && stride == 8) {
      std::memcpy(out.data(), p, n * 8);
    } else if (is64) {
      for (size_t i = 0; i < n; ++i) std::memcpy(&out[i], p + i * stride, 8);
    } else {
      for (size_t i = 0; i < n; ++i) {
        int32_t v;
        std::memcpy(&v, p + i * stride, 4);
        out[i] = v;
      }
    }
  }
  PyBuffer_Release(&view);
  return ok;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_vkv C++ core: virtual reservations, a physical page pool, a background committer";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfPages& e) {
      py::object cls = py::module_::import("torch_vkv.errors").attr("OutOfPagesError");
      py::object err = cls(e.what());
      err.attr("requested_pages") = e.requested;
      err.attr("available_pages") = e.available;
      PyErr_SetObject(cls.ptr(), err.ptr());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const WrongType& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const Forked& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const DriverError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend")
      .def_property_readonly("name", &Backend::name)
      .def_property_readonly("device", &Backend::device)
      .def_property_readonly("page_size", &Backend::page_size);

  m.def("host_backend", &make_host_backend, py::arg("page_size") = size_t{2} << 20,
        "A memfd + mmap backend on the CPU with pages of page_size bytes.");
  m.def("cuda_backend", nogil(&cuda_backend), py::arg("device"),
        "The CUDA driver backend of a device (shared per device).");
  m.def("cuda_driver_available", nogil(&cu::available),
        "Whether libcuda.so.1 loads and cuInit succeeds.");
  m.def("hold_fences", &host_hold_fences, py::arg("backend"), py::arg("hold"),
        "Host-backend test hook: keep new fences pending until released.");
  m.def(
      "device_memory_info",
      [](int device) {
        return without_gil([&] {
          auto backend = cuda_backend(device);
          ThreadBinding bound(*backend);
          size_t free_bytes = 0, total_bytes = 0;
          cu::check(cu::api().cuMemGetInfo(&free_bytes, &total_bytes), "cuMemGetInfo",
                    "device=" + std::to_string(device));
          return std::make_pair(free_bytes, total_bytes);
        });
      },
      py::arg("device"), "(free_bytes, total_bytes) as the driver reports them.");

  py::class_<PagePool, std::shared_ptr<PagePool>>(m, "PagePool")
      .def(py::init<std::shared_ptr<Backend>, size_t>(), py::arg("backend"), py::arg("max_pages"))
      .def_property_readonly("page_size", &PagePool::page_size)
      .def_property_readonly("backend", [](PagePool& p) { return p.backend().name(); })
      .def("prefill", nogil(&PagePool::prefill), py::arg("num_pages"))
      .def("set_max_pages", nogil(&PagePool::set_max_pages), py::arg("max_pages"))
      .def("trim", nogil(&PagePool::trim), py::arg("keep_free") = 0)
      .def("reap", nogil(&PagePool::reap))
      .def_property_readonly("forked", &PagePool::forked, "Whether the pool was inherited through fork().")
      .def("stats", [](PagePool& p) { return stats_dict(without_gil([&] { return p.stats(); })); })
      // Keeps the GIL: one atomic load, cheaper than releasing and retaking it, and it never waits.
      .def("available", &PagePool::available,
           "Pages a commit can have now (free + creatable within the budget + pending a fence), read "
           "without the pool's mutex: a snapshot, possibly stale by a commit in flight.");

  py::class_<Reservation, std::shared_ptr<Reservation>>(m, "Reservation")
      .def_static("create", nogil(&Reservation::create), py::arg("pool"), py::arg("bytes"))
      .def_static("adopt", nogil(&allocator_adopt), py::arg("pool"), py::arg("addr"),
                  "Takes over a range returned by allocator_reserve / vkv_alloc.")
      .def_property_readonly("base", &Reservation::base)
      .def_property_readonly("num_pages", &Reservation::num_pages)
      .def_property_readonly("bytes", &Reservation::bytes)
      .def_property_readonly("page_size", &Reservation::page_size)
      .def("commit", nogil(&Reservation::commit), py::arg("first"), py::arg("count"))
      .def("decommit", nogil(&Reservation::decommit), py::arg("first"), py::arg("count"), py::arg("stream") = py::none())
      .def("alias", nogil(&Reservation::alias), py::arg("first"), py::arg("src"), py::arg("src_first"), py::arg("count"))
      .def("release_all", nogil(&Reservation::release_all))
      .def("close", nogil(&Reservation::close), "release_all, then refuse commits (the range stays reserved).")
      .def_property_readonly("closed", &Reservation::closed)
      .def_property_readonly("forked", &Reservation::forked, "Whether the reservation was inherited through fork().")
      .def(
          "dlpack",
          [](std::shared_ptr<Reservation> r) {
            // The capsule protocol: a consumer renames it "used_dltensor" and
            // calls the deleter later; an unconsumed capsule deletes its tensor.
            require(r, "Reservation.dlpack: self");
            DLManagedTensor* m = export_dlpack(std::move(r));
            PyObject* cap = PyCapsule_New(m, "dltensor", [](PyObject* c) {
              if (PyCapsule_IsValid(c, "dltensor")) {
                auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
                t->deleter(t);
              }
            });
            if (!cap) {
              m->deleter(m);
              throw py::error_already_set();
            }
            return py::reinterpret_steal<py::object>(cap);
          },
          "The whole range as a DLPack capsule (uint8) for torch.from_dlpack; every tensor over it keeps "
          "the reservation alive.")
      .def("is_committed", nogil(&Reservation::is_committed), py::arg("page"))
      .def("num_committed", nogil(&Reservation::num_committed))
      .def("committed_ranges", nogil(&Reservation::committed_ranges))
      .def("inherited_ranges", nogil(&Reservation::inherited_ranges),
           "Runs (first page, count) mapped in this process, pending decommits included; works in a forked "
           "child, where committed_ranges() raises.");

  py::class_<Committer, std::shared_ptr<Committer>>(m, "Committer")
      .def(py::init<>())
      .def(
          "submit",
          [](Committer& c, const std::vector<std::tuple<std::shared_ptr<Reservation>, size_t, size_t>>& jobs) {
            std::vector<CommitJob> list;
            list.reserve(jobs.size());
            for (const auto& [res, first, count] : jobs) list.push_back({res, first, count});
            return without_gil([&] { return c.submit(std::move(list)); });
          },
          py::arg("jobs"), "Queue [(reservation, first_page, num_pages), ...]; returns a ticket.")
      .def("wait", nogil(&Committer::wait), py::arg("ticket"))
      .def("done", nogil(&Committer::done), py::arg("ticket"))
      .def("pages_committed", nogil(&Committer::pages_committed))
      .def_property_readonly("forked", &Committer::forked, "Whether the committer was inherited through fork().");

  py::class_<SlotTable, std::shared_ptr<SlotTable>>(m, "SlotTable",
                                                    "Per-slot lengths and committed pages of a KVCache, and the "
                                                    "per-step commit / prefetch decision (csrc/slots.h).")
      .def(py::init([](std::vector<std::shared_ptr<Reservation>> buffers, std::vector<int64_t> buffer_windows,
                       std::shared_ptr<Committer> committer, size_t num_slots, int64_t max_seq_len,
                       int64_t padded_seq_len, size_t pages_per_slot, int64_t margin_tokens,
                       size_t bytes_per_token) {
             size_t page_size = buffers.empty() || !buffers[0] ? 0 : buffers[0]->page_size();
             SlotGeometry g{num_slots,      max_seq_len,   padded_seq_len, pages_per_slot,
                            margin_tokens, bytes_per_token, page_size};
             return std::make_shared<SlotTable>(g, std::move(buffers), std::move(buffer_windows),
                                                std::move(committer));
           }),
           py::arg("buffers"), py::arg("buffer_windows"), py::arg("committer"), py::arg("num_slots"),
           py::arg("max_seq_len"), py::arg("padded_seq_len"), py::arg("pages_per_slot"), py::arg("margin_tokens"),
           py::arg("bytes_per_token"))
      .def(
          "step",
          [](SlotTable& t, py::handle seq_lens, int64_t lookahead) {
            // The per-step fast path: anything but a 1-D int32/int64 array is
            // the caller's to normalise (STEP_INVALID, nothing changed). The
            // common step (no page crossed) keeps the GIL: releasing it would
            // cost more than the step; any driver work or wait runs without it.
            thread_local std::vector<int64_t> need;
            if (!int64_lengths(seq_lens, need)) return static_cast<int>(kStepInvalid);
            StepStatus quiet = t.step_quiet(need.data(), need.size(), lookahead);
            if (quiet != kStepBusy) return static_cast<int>(quiet);
            return static_cast<int>(without_gil([&] { return t.step(need.data(), need.size(), lookahead); }));
          },
          py::arg("seq_lens"), py::arg("lookahead"),
          "One iteration (lookahead < 0: no prefetch); returns a STEP_* status.")
      .def(
          "plan_pages",
          [](SlotTable& t, py::handle seq_lens) -> int64_t {
            thread_local std::vector<int64_t> need;
            if (!int64_lengths(seq_lens, need)) return -1;
            return without_gil([&] { return t.plan_pages(need.data(), need.size()); });
          },
          py::arg("seq_lens"), "Pages (all buffers) step(seq_lens) would take from the pool; -1: invalid input.")
      .def("short_pages", &SlotTable::short_pages, "(wanted, available) pages of the last STEP_SHORT.")
      .def("trim_windows", nogil(&SlotTable::trim_windows), py::arg("stream") = py::none())
      .def("join", nogil(&SlotTable::join))
      .def_property_readonly("pending", &SlotTable::pending)
      .def("commit_slots", nogil(&SlotTable::commit_slots), py::arg("plan"),
           "Commits [(slot, pages per buffer), ...] from each slot's committed end, all or nothing.")
      .def("set_committed", &SlotTable::set_committed, py::arg("slot"), py::arg("pages"))
      .def("pages_for", &SlotTable::pages_for, py::arg("num_tokens"))
      .def("tokens_for", &SlotTable::tokens_for, py::arg("num_pages"))
      .def_property_readonly("commit_calls", &SlotTable::commit_calls)
      .def("close", nogil(&SlotTable::close))
      .def_property_readonly("window_sizes", [](SlotTable& t) { return t.window_sizes(); })
      .def_property_readonly("buffer_groups", [](SlotTable& t) { return t.buffer_groups(); })
      .def_property_readonly(
          "arrays",
          [](std::shared_ptr<SlotTable> t) {
            // Views of the table's own memory (no copy), kept alive by the table.
            auto B = static_cast<py::ssize_t>(require(t, "SlotTable.arrays: self")->geometry().num_slots);
            auto G = static_cast<py::ssize_t>(t->num_groups());
            py::dict d;
            d["active"] = table_view(t, t->active_data(), {B});
            d["used"] = table_view(t, t->used_data(), {B});
            d["committed"] = table_view(t, t->committed_data(), {B});
            d["covered"] = table_view(t, t->covered_data(), {B});
            d["first_pages"] = table_view(t, t->first_pages_data(), {G, B});
            return d;
          },
          "NumPy views of the table: active, used, committed, covered [B] and first_pages [G, B].");
  m.attr("STEP_DONE") = static_cast<int>(kStepDone);
  m.attr("STEP_INVALID") = static_cast<int>(kStepInvalid);
  m.attr("STEP_SHORT") = static_cast<int>(kStepShort);
  m.attr("STEP_TRIM") = static_cast<int>(kStepTrim);

  m.def("allocator_reserve", nogil(&allocator_reserve), py::arg("backend"), py::arg("size"),
        "What vkv_alloc does, on any backend (vkv_alloc uses the CUDA one).");
  m.def("allocator_release", nogil(&allocator_release), py::arg("addr"), "What vkv_free does.");
  m.def("allocator_num_regions", &allocator_num_regions);
  m.def("allocator_last_error", &allocator_last_error);
}
