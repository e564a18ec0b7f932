// Layer 3: registration only. Every call into the core releases the GIL, so
// the background committer never waits on Python and Python never waits on a
// driver call with the GIL held.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "allocator.h"
#include "backend.h"
#include "committer.h"
#include "dlpack.h"
#include "driver.h"
#include "errors.h"
#include "pool.h"

namespace py = pybind11;
using namespace vkv;
using release_gil = py::call_guard<py::gil_scoped_release>;

namespace {

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
  m.def("cuda_backend", &cuda_backend, py::arg("device"), release_gil(),
        "The CUDA driver backend of a device (shared per device).");
  m.def("cuda_driver_available", &cu::available, release_gil(),
        "Whether libcuda.so.1 loads and cuInit succeeds.");
  m.def("hold_fences", &host_hold_fences, py::arg("backend"), py::arg("hold"),
        "Host-backend test hook: keep new fences pending until released.");
  m.def(
      "device_memory_info",
      [](int device) {
        auto backend = cuda_backend(device);
        backend->bind_thread();
        size_t free_bytes = 0, total_bytes = 0;
        cu::check(cu::api().cuMemGetInfo(&free_bytes, &total_bytes), "cuMemGetInfo", "device=" + std::to_string(device));
        return std::make_pair(free_bytes, total_bytes);
      },
      py::arg("device"), release_gil(), "(free_bytes, total_bytes) as the driver reports them.");

  py::class_<PagePool, std::shared_ptr<PagePool>>(m, "PagePool")
      .def(py::init<std::shared_ptr<Backend>, size_t>(), py::arg("backend"), py::arg("max_pages"))
      .def_property_readonly("page_size", &PagePool::page_size)
      .def_property_readonly("backend", [](PagePool& p) { return p.backend().name(); })
      .def("prefill", &PagePool::prefill, py::arg("num_pages"), release_gil())
      .def("set_max_pages", &PagePool::set_max_pages, py::arg("max_pages"), release_gil())
      .def("trim", &PagePool::trim, py::arg("keep_free") = 0, release_gil())
      .def("reap", &PagePool::reap, release_gil())
      .def_property_readonly("forked", &PagePool::forked, "Whether the pool was inherited through fork().")
      .def("stats", [](PagePool& p) {
        PoolStats s;
        {
          py::gil_scoped_release nogil;
          s = p.stats();
        }
        return stats_dict(s);
      });

  py::class_<Reservation, std::shared_ptr<Reservation>>(m, "Reservation")
      .def_static("create", &Reservation::create, py::arg("pool"), py::arg("bytes"), release_gil())
      .def_static("adopt", &allocator_adopt, py::arg("pool"), py::arg("addr"), release_gil(),
                  "Takes over a range returned by allocator_reserve / vkv_alloc.")
      .def_property_readonly("base", &Reservation::base)
      .def_property_readonly("num_pages", &Reservation::num_pages)
      .def_property_readonly("bytes", &Reservation::bytes)
      .def_property_readonly("page_size", &Reservation::page_size)
      .def("commit", &Reservation::commit, py::arg("first"), py::arg("count"), release_gil())
      .def("decommit", &Reservation::decommit, py::arg("first"), py::arg("count"), py::arg("stream") = py::none(),
           release_gil())
      .def("alias", &Reservation::alias, py::arg("first"), py::arg("src"), py::arg("src_first"), py::arg("count"),
           release_gil())
      .def("release_all", &Reservation::release_all, release_gil())
      .def("close", &Reservation::close, release_gil(), "release_all, then refuse commits (the range stays reserved).")
      .def_property_readonly("closed", &Reservation::closed)
      .def_property_readonly("forked", &Reservation::forked, "Whether the reservation was inherited through fork().")
      .def(
          "dlpack",
          [](std::shared_ptr<Reservation> r) {
            // The capsule protocol: a consumer renames it "used_dltensor" and
            // calls the deleter later; an unconsumed capsule deletes its tensor.
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
      .def("is_committed", &Reservation::is_committed, py::arg("page"), release_gil())
      .def("num_committed", &Reservation::num_committed, release_gil())
      .def("committed_ranges", &Reservation::committed_ranges, release_gil());

  py::class_<Committer, std::shared_ptr<Committer>>(m, "Committer")
      .def(py::init<>())
      .def(
          "submit",
          [](Committer& c, const std::vector<std::tuple<std::shared_ptr<Reservation>, size_t, size_t>>& jobs) {
            std::vector<CommitJob> list;
            list.reserve(jobs.size());
            for (const auto& [res, first, count] : jobs) list.push_back({res, first, count});
            py::gil_scoped_release nogil;
            return c.submit(std::move(list));
          },
          py::arg("jobs"), "Queue [(reservation, first_page, num_pages), ...]; returns a ticket.")
      .def("wait", &Committer::wait, py::arg("ticket"), release_gil())
      .def("done", &Committer::done, py::arg("ticket"), release_gil())
      .def("pages_committed", &Committer::pages_committed, release_gil())
      .def_property_readonly("forked", &Committer::forked, "Whether the committer was inherited through fork().");

  m.def("allocator_reserve", &allocator_reserve, py::arg("backend"), py::arg("size"), release_gil(),
        "What vkv_alloc does, on any backend (vkv_alloc uses the CUDA one).");
  m.def("allocator_release", &allocator_release, py::arg("addr"), release_gil(), "What vkv_free does.");
  m.def("allocator_num_regions", &allocator_num_regions);
  m.def("allocator_last_error", &allocator_last_error);
}
