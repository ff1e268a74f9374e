// Python entry point of deformable_detr._C. Importing the module runs the static TORCH_LIBRARY registrations;
// the ops are reached through torch.ops.deformable_detr.*. The module itself exports one diagnostic:
// table_reads(), how many times the CPU ops have read a level or point table's values to check them (each table is
// checked once, then recognised by identity and version: tests/test_checks_once.py counts this).
#include <Python.h>

#include <cstdint>

namespace deformable_detr {
namespace msda {
int64_t table_reads();  // ms_deform_attn/cpu/ms_deform_attn_cpu.cpp
}  // namespace msda
}  // namespace deformable_detr

namespace {

PyObject* table_reads(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(deformable_detr::msda::table_reads()));
}

PyMethodDef methods[] = {
    {"table_reads", table_reads, METH_NOARGS, "Times the CPU ops have read a level or point table to check it."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
