// Python bindings of the SIMT emulator (built by tests/simt/build.py with torch.utils.cpp_extension.load).
#include <torch/extension.h>

#include "device.h"
#include "ops.h"
#include "simt.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "configure",
      [](uint64_t seed, int poison, int placement, int arch, int64_t min_threads_in_flight) {
        simt::Config& c = simt::config();
        TORCH_CHECK(placement >= 0 && placement <= 2, "simt: placement must be 0, 1 or 2");
        c.seed = seed;
        c.poison = poison & 0xFF;
        c.placement = static_cast<simt::Placement>(placement);
        c.arch = arch;
        c.min_threads_in_flight = min_threads_in_flight;
      },
      py::arg("seed"), py::arg("poison"), py::arg("placement"), py::arg("arch"), py::arg("min_threads_in_flight"));
  m.def("ms_deform_attn", &simt::msda_forward, py::arg("value"), py::arg("spatial_shapes"),
        py::arg("level_start_index"), py::arg("sampling_locations"), py::arg("attention_weights"),
        py::arg("point_start") = py::none(), py::arg("discrete") = false);
  m.def("ms_deform_attn_backward", &simt::msda_backward, py::arg("grad_output"), py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("deterministic"), py::arg("point_start") = py::none(),
        py::arg("discrete") = false);
  m.def("batched_lsap", &simt::lsap, py::arg("cost"), py::arg("num_cols") = py::none());
  m.def("planted", &simt::planted);
  m.def("coverage", &simt::coverage);
  m.def("reset_coverage", &simt::reset_coverage);
}
