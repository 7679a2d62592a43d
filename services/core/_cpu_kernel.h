/*
 * What the CPU kernel extensions (_cpu_gemm.c, _cpu_attn.c) share: the CPU probe, the
 * supported() method, the argument parsing of their METH_FASTCALL entry points and module
 * creation.
 */
#ifndef MEGASCALE_CPU_KERNEL_H
#define MEGASCALE_CPU_KERNEL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

static int have_avx2_fma = 0; /* probed once, by probe_cpu() in the module's init */

static void probe_cpu(void)
{
    __builtin_cpu_init();
    have_avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static PyObject *supported(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(have_avx2_fma);
}

/* out[0:count] = the first count arguments as C longs; nargs must be exactly want. Sets a
 * Python error (TypeError naming fn, or the conversion's) and returns 0 on failure. */
static int parse_longs(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                       Py_ssize_t count, long *out, const char *fn)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", fn, want);
        return 0;
    }
    if (!have_avx2_fma) {
        PyErr_Format(PyExc_RuntimeError, "%s needs a CPU with AVX2 and FMA", fn);
        return 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        out[i] = PyLong_AsLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return 0;
    }
    return 1;
}

/* The module of def, with API_VERSION set and the CPU probed (what each PyInit_ returns). */
static PyObject *create_module(struct PyModuleDef *def, long api_version)
{
    probe_cpu();
    PyObject *m = PyModule_Create(def);
    if (m != NULL && PyModule_AddIntConstant(m, "API_VERSION", api_version) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#endif
