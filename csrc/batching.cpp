#include <pybind11/pybind11.h>
namespace py = pybind11;
PYBIND11_MODULE(_batching, m) { m.doc() = "placeholder while the build is wired"; }
