/* The Python objects the engine works with: reading their state when a wake-up begins,
 * handing back what changed, and calling the Python server for what the fast path leaves. */
#include "engine.h"

const char *const counter_names[C_COUNT] = {
    "cmd_get", "cmd_set", "get_hits", "get_misses", "bytes_read", "bytes_written",
    "udp_datagrams_received", "udp_datagrams_sent", "udp_dropped_malformed",
    "udp_dropped_multidatagram", "udp_send_errors",
};
PyObject *counter_attrs[C_COUNT];

/* Interned attribute names. */
PyObject *s_items, *s_cas, *s_bytes_used, *s_capacity, *s_flush_at, *s_max_item_size,
    *s_clock, *s_stats, *s_total_items, *s_evict_to, *s_observe, *s_pending, *s_buffer,
    *s_request, *s_closing, *s_seen_tick, *s_tick, *s_serve_event, *s_continue, *s_send,
    *s_close, *s_reclaimed, *s_expired_unfetched, *s_get_expired, *s_answer, *s_send_reply,
    *s_detail;

static int get_ll(PyObject *obj, PyObject *name, long long *value) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *value = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*value == -1 && PyErr_Occurred()) ? -1 : 0;
}

int add_to_attr(PyObject *obj, PyObject *name, long long delta) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromLongLong(delta);
    PyObject *sum = d ? PyNumber_Add(v, d) : NULL;
    Py_DECREF(v);
    Py_XDECREF(d);
    if (sum == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* Read the Python state the fast path works with. */
int sync_in(Engine *e) {
    long long cas, flush_at;
    if (get_ll(e->store, s_cas, &cas) < 0 || get_ll(e->store, s_bytes_used, &e->bytes_used) < 0
        || get_ll(e->store, s_capacity, &e->capacity) < 0
        || get_ll(e->store, s_max_item_size, &e->max_item_size) < 0
        || get_ll(e->store, s_flush_at, &flush_at) < 0)
        return -1;
    PyObject *clock = PyObject_GetAttr(e->store, s_clock);
    PyObject *now = clock ? PyObject_CallNoArgs(clock) : NULL;
    Py_XDECREF(clock);
    if (now == NULL)
        return -1;
    double seconds = PyFloat_AsDouble(now);
    Py_DECREF(now);
    if (seconds == -1.0 && PyErr_Occurred())
        return -1;
    e->now = (long long)seconds;
    e->cas = (unsigned long long)cas;
    e->flush_pending = flush_at != 0;
    e->python_only = 0;
    if (e->commands != NULL && e->commands != Py_None) {
        PyObject *detail = PyObject_GetAttr(e->commands, s_detail);
        if (detail == NULL)
            return -1;
        e->python_only = detail != Py_None;
        Py_DECREF(detail);
    }
    e->shadow_dirty = 0;
    return 0;
}

/* Give the Python objects what the fast path changed; done before any Python code runs. */
int sync_out(Engine *e) {
    PyObject *exc_type, *exc_value, *exc_tb;
    int rc = 0;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb); /* keep a pending error while syncing */
    if (e->shadow_dirty) {
        PyObject *cas = PyLong_FromUnsignedLongLong(e->cas);
        PyObject *used = PyLong_FromLongLong(e->bytes_used);
        if (cas == NULL || used == NULL || PyObject_SetAttr(e->store, s_cas, cas) < 0
            || PyObject_SetAttr(e->store, s_bytes_used, used) < 0)
            rc = -1;
        Py_XDECREF(cas);
        Py_XDECREF(used);
        e->shadow_dirty = 0;
    }
    if (e->total_items_delta) {
        PyObject *stats = PyObject_GetAttr(e->store, s_stats);
        if (stats == NULL || add_to_attr(stats, s_total_items, e->total_items_delta) < 0)
            rc = -1;
        Py_XDECREF(stats);
        e->total_items_delta = 0;
    }
    for (int i = 0; i < C_COUNT; i++) {
        if (e->deltas[i]) {
            if (add_to_attr(e->counters, counter_attrs[i], e->deltas[i]) < 0)
                rc = -1;
            e->deltas[i] = 0;
        }
    }
    if (exc_type != NULL)
        PyErr_Restore(exc_type, exc_value, exc_tb);
    return rc;
}

/* Call one of the Python server's methods with the engine's state handed over first. The
 * arguments end at the first NULL (methods here take two to four). */
int call_python(Engine *e, PyObject *obj, PyObject *name, PyObject *a, PyObject *b,
                PyObject *c, PyObject *d) {
    if (sync_out(e) < 0)
        return -1;
    PyObject *r = PyObject_CallMethodObjArgs(obj, name, a, b, c, d, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return sync_in(e);
}

