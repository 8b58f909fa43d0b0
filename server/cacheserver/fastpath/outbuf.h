/* The reply buffer: one per engine, reused for every read (engine.h). */
#ifndef CACHESERVER_FASTPATH_OUTBUF_H
#define CACHESERVER_FASTPATH_OUTBUF_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "core.h" /* put_decimal */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} OutBuf;

static inline int out_reserve(OutBuf *out, Py_ssize_t extra) {
    if (out->len + extra <= out->cap)
        return 0;
    Py_ssize_t cap = out->cap ? out->cap : 4096;
    while (cap < out->len + extra)
        cap *= 2;
    char *data = PyMem_Realloc(out->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->cap = cap;
    return 0;
}

static inline int out_put(OutBuf *out, const char *bytes, Py_ssize_t n) {
    if (out_reserve(out, n) < 0)
        return -1;
    memcpy(out->data + out->len, bytes, n);
    out->len += n;
    return 0;
}

static inline int out_u64(OutBuf *out, char flag, unsigned long long v) {
    if (out_reserve(out, 24) < 0)
        return -1;
    char *p = out->data + out->len;
    *p++ = ' ';
    *p++ = flag;
    out->len = put_decimal(p, v) - out->data;
    return 0;
}

#endif
