/* The only file that names a Python attribute or calls Python code: the shared constants,
 * the objects the engine keeps, the state it reads when a wake-up begins and hands back
 * before any Python code runs, and the slow path. cacheserver/fastpath/boundary.py declares
 * all of it on the Python side. */
#include "boundary.h"

/* -- constants ------------------------------------------------------------------------------ */

#define DEFINE_SHARED(name) Py_ssize_t name;
SHARED_CONSTANTS(DEFINE_SHARED)
#undef DEFINE_SHARED
#define DEFINE_LIMIT(name) unsigned long long name;
SHARED_LIMITS(DEFINE_LIMIT)
#undef DEFINE_LIMIT
const char *CLUSTER_KEY;
Py_ssize_t CLUSTER_KEY_LEN;
static PyObject *cluster_key; /* the bytes CLUSTER_KEY points into */

static const struct {
    const char *name;
    Py_ssize_t *value;
} shared[] = {
#define SHARED_ENTRY(name) {#name, &name},
    SHARED_CONSTANTS(SHARED_ENTRY)
#undef SHARED_ENTRY
};
#define NSHARED ((Py_ssize_t)(sizeof shared / sizeof shared[0]))

static const struct {
    const char *name;
    unsigned long long *value;
} limits[] = {
#define LIMIT_ENTRY(name) {#name, &name},
    SHARED_LIMITS(LIMIT_ENTRY)
#undef LIMIT_ENTRY
};
#define NLIMITS ((Py_ssize_t)(sizeof limits / sizeof limits[0]))

/* What the code is written for: the item header's fields (8-byte CAS, then little-endian u32
 * exptime, flags and bumped, two bytes) and memcached's UDP frame header. */
static const char *const formats[][2] = {
    {"HEADER_FORMAT", "<QIIIBB"},
    {"UDP_HEADER_FORMAT", "!HHHH"},
};
#define NFORMATS ((Py_ssize_t)(sizeof formats / sizeof formats[0]))

static int refuse(const char *name, const char *why) {
    PyErr_Format(PyExc_ImportError,
                 "cacheserver.fastpath.boundary.CONSTANTS[%s]: %s (the compiled fast path "
                 "is not written for it: change fastpath/*.c with it)",
                 name, why);
    return -1;
}

static int load_constants(PyObject *table) {
    if (!PyDict_Check(table))
        return refuse("*", "not a dict");
    if (PyDict_Size(table) != NSHARED + NLIMITS + NFORMATS + 1)
        return refuse("*", "other names than the C code reads (constants.h)");
    for (Py_ssize_t i = 0; i < NSHARED; i++) {
        PyObject *v = PyDict_GetItemString(table, shared[i].name);
        if (v == NULL || !PyLong_Check(v))
            return refuse(shared[i].name, "missing, or not an int");
        *shared[i].value = PyLong_AsSsize_t(v);
        if (*shared[i].value < 0)
            return PyErr_Occurred() ? -1 : refuse(shared[i].name, "negative");
    }
    for (Py_ssize_t i = 0; i < NLIMITS; i++) {
        PyObject *v = PyDict_GetItemString(table, limits[i].name);
        if (v == NULL || !PyLong_Check(v))
            return refuse(limits[i].name, "missing, or not an int");
        *limits[i].value = PyLong_AsUnsignedLongLong(v);
        if (PyErr_Occurred())
            return -1;
    }
    for (Py_ssize_t i = 0; i < NFORMATS; i++) {
        PyObject *v = PyDict_GetItemString(table, formats[i][0]);
        const char *text = v != NULL && PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
        if (text == NULL || strcmp(text, formats[i][1]) != 0)
            return refuse(formats[i][0], "not the format the C code reads");
    }
    PyObject *key = PyDict_GetItemString(table, "CLUSTER_KEY");
    if (key == NULL || !PyBytes_Check(key))
        return refuse("CLUSTER_KEY", "missing, or not bytes");
    if (U32_MAX > 4294967295ULL || I32_MAX > U32_MAX || FETCHED > 0xFF || OFFSET_MASK > 0xFF
        || UDP_HEADER == 0 || READ_SIZE == 0 || TCP_BATCH == 0 || UDP_BATCH == 0)
        return refuse("*", "a limit out of the range of the C code's types");
    Py_INCREF(key);
    Py_XSETREF(cluster_key, key);
    CLUSTER_KEY = PyBytes_AS_STRING(key);
    CLUSTER_KEY_LEN = PyBytes_GET_SIZE(key);
    return 0;
}

/* -- names ---------------------------------------------------------------------------------- */

/* metrics/counters.py's fields, in the order of the C_ counters (engine.h). */
static const char *const counter_names[C_COUNT] = {
    "cmd_get", "cmd_set", "get_hits", "get_misses", "bytes_read", "bytes_written",
    "udp_datagrams_received", "udp_datagrams_sent", "udp_dropped_malformed",
    "udp_dropped_multidatagram", "udp_send_errors",
};
static PyObject *counter_attrs[C_COUNT];

/* The attributes read or written per wake-up, interned once. */
static PyObject *s_last_cas, *s_bytes_used, *s_capacity, *s_max_item_size, *s_flush_at,
    *s_detail, *s_total_items, *s_reclaimed, *s_expired_unfetched, *s_get_expired, *s_tick,
    *s_plain, *s_seen_tick;

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return -1

int boundary_load(void) {
    INTERN(s_last_cas, "last_cas");
    INTERN(s_bytes_used, "bytes_used");
    INTERN(s_capacity, "capacity");
    INTERN(s_max_item_size, "max_item_size");
    INTERN(s_flush_at, "flush_at");
    INTERN(s_detail, "detail");
    INTERN(s_total_items, "total_items");
    INTERN(s_reclaimed, "reclaimed");
    INTERN(s_expired_unfetched, "expired_unfetched");
    INTERN(s_get_expired, "get_expired");
    INTERN(s_tick, "tick");
    INTERN(s_plain, "plain");
    INTERN(s_seen_tick, "seen_tick");
    for (int i = 0; i < C_COUNT; i++)
        INTERN(counter_attrs[i], counter_names[i]);
    PyObject *module = PyImport_ImportModule("cacheserver.fastpath.boundary");
    PyObject *table = module ? PyObject_GetAttrString(module, "CONSTANTS") : NULL;
    Py_XDECREF(module);
    if (table == NULL)
        return -1;
    int rc = load_constants(table);
    Py_DECREF(table);
    return rc;
}

/* -- binding: everything the engine uses is looked up here, once ---------------------------- */

/* obj.name, which must be there (and callable, when asked). */
static PyObject *keep(PyObject *obj, const char *name, int callable) {
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v != NULL && callable && !PyCallable_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%R.%s is not callable", obj, name);
        Py_CLEAR(v);
    }
    return v;
}

/* Whether obj has every attribute in names (the ones read per wake-up). */
static int check(PyObject *obj, PyObject *const *names, int n) {
    for (int i = 0; i < n; i++) {
        PyObject *v = PyObject_GetAttr(obj, names[i]);
        if (v == NULL)
            return -1;
        Py_DECREF(v);
    }
    return 0;
}

int engine_bind(Engine *e, PyObject *store, PyObject *counters, PyObject *latency,
                PyObject *commands) {
    PyObject *items = keep(store, "table", 0);
    if (items == NULL)
        return -1;
    if (!PyDict_CheckExact(items)) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_TypeError, "the store's table must be a dict");
        return -1;
    }
    Py_XSETREF(e->items, items);
    Py_XSETREF(e->clock, keep(store, "clock", 1));
    Py_XSETREF(e->stats, keep(store, "stats", 0));
    Py_XSETREF(e->make_room, keep(store, "make_room", 1));
    Py_XSETREF(e->observe, keep(latency, "observe", 1));
    if (e->clock == NULL || e->stats == NULL || e->make_room == NULL || e->observe == NULL)
        return -1;
    PyObject *stats_names[] = {s_total_items, s_reclaimed, s_expired_unfetched, s_get_expired};
    if (check(e->stats, stats_names, 4) < 0 || check(counters, counter_attrs, C_COUNT) < 0)
        return -1;
    Py_INCREF(store);
    Py_XSETREF(e->store, store);
    Py_INCREF(counters);
    Py_XSETREF(e->counters, counters);
    Py_INCREF(commands);
    Py_XSETREF(e->commands, commands);
    return sync_in(e); /* reads the rest once: a missing attribute fails here */
}

int engine_bind_tcp(Engine *e, PyObject *server, PyObject *conn_class) {
    PyObject *connections = keep(server, "connections", 0);
    if (connections == NULL)
        return -1;
    if (!PyDict_CheckExact(connections)) {
        Py_DECREF(connections);
        PyErr_SetString(PyExc_TypeError, "the TCP server's connections must be a dict");
        return -1;
    }
    Py_XSETREF(e->connections, connections);
    Py_XSETREF(e->serve_event, keep(server, "serve_event", 1));
    Py_XSETREF(e->finish_read, keep(server, "finish_read", 1));
    Py_XSETREF(e->send, keep(server, "send", 1));
    Py_XSETREF(e->close_connection, keep(server, "close_connection", 1));
    if (e->serve_event == NULL || e->finish_read == NULL || e->send == NULL
        || e->close_connection == NULL)
        return -1;
    PyObject *conn_names[] = {s_plain, s_seen_tick};
    if (check(server, &s_tick, 1) < 0 || check(conn_class, conn_names, 2) < 0)
        return -1;
    Py_INCREF(server);
    Py_XSETREF(e->tcp, server);
    return 0;
}

int engine_bind_udp(Engine *e, PyObject *server) {
    Py_XSETREF(e->answer, keep(server, "answer", 1));
    return e->answer == NULL ? -1 : 0;
}

/* -- the shadow state ----------------------------------------------------------------------- */

static int get_ll(PyObject *obj, PyObject *name, long long *value) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *value = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*value == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int add_to_attr(PyObject *obj, PyObject *name, long long delta) {
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
    if (get_ll(e->store, s_last_cas, &cas) < 0
        || get_ll(e->store, s_bytes_used, &e->bytes_used) < 0
        || get_ll(e->store, s_capacity, &e->capacity) < 0
        || get_ll(e->store, s_max_item_size, &e->max_item_size) < 0
        || get_ll(e->store, s_flush_at, &flush_at) < 0)
        return -1;
    double seconds;
    if (store_clock(e, &seconds) < 0)
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
        if (cas == NULL || used == NULL || PyObject_SetAttr(e->store, s_last_cas, cas) < 0
            || PyObject_SetAttr(e->store, s_bytes_used, used) < 0)
            rc = -1;
        Py_XDECREF(cas);
        Py_XDECREF(used);
        e->shadow_dirty = 0;
    }
    if (e->total_items_delta) {
        if (add_to_attr(e->stats, s_total_items, e->total_items_delta) < 0)
            rc = -1;
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

/* -- the store ------------------------------------------------------------------------------ */

int store_clock(Engine *e, double *now) {
    PyObject *v = PyObject_CallNoArgs(e->clock);
    if (v == NULL)
        return -1;
    *now = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*now == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* Store.get's count of an expired item it dropped. */
int store_count_expired(Engine *e, int fetched) {
    return (add_to_attr(e->stats, s_reclaimed, 1) < 0
            || (!fetched && add_to_attr(e->stats, s_expired_unfetched, 1) < 0)
            || add_to_attr(e->stats, s_get_expired, 1) < 0) ? -1 : 0;
}

/* Store.make_room(key), with the shadow state handed over and read back. */
int store_make_room(Engine *e, PyObject *key) {
    if (sync_out(e) < 0)
        return -1;
    PyObject *r = PyObject_CallOneArg(e->make_room, key);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return sync_in(e);
}

/* -- the slow path -------------------------------------------------------------------------- */

/* Call one of the Python server's methods with the engine's state handed over first. The
 * arguments are stolen (each may be NULL when making it failed). */
static int slow_path(Engine *e, PyObject *method, PyObject **args, int n) {
    int rc = -1;
    for (int i = 0; i < n; i++)
        if (args[i] == NULL)
            goto done;
    if (sync_out(e) < 0)
        goto done;
    PyObject *r = PyObject_Vectorcall(method, args, n, NULL);
    if (r == NULL)
        goto done;
    Py_DECREF(r);
    rc = sync_in(e);
done:
    for (int i = 0; i < n; i++)
        Py_XDECREF(args[i]);
    return rc;
}

int tcp_tick(Engine *e, long long *tick) {
    return get_ll(e->tcp, s_tick, tick);
}

/* conn.plain: 1 or 0. */
int conn_plain(Engine *e, PyObject *conn) {
    PyObject *v = PyObject_GetAttr(conn, s_plain);
    if (v == NULL)
        return -1;
    int plain = PyObject_IsTrue(v);
    Py_DECREF(v);
    return plain;
}

/* conn.seen_tick = tick (for the idle sweep and stats conns). */
int conn_seen(Engine *e, PyObject *conn, long long tick) {
    PyObject *v = PyLong_FromLongLong(tick);
    int rc = v ? PyObject_SetAttr(conn, s_seen_tick, v) : -1;
    Py_XDECREF(v);
    return rc;
}

int tcp_serve_event(Engine *e, int fd, PyObject *conn, unsigned int events) {
    PyObject *args[] = {PyLong_FromLong(fd), Py_NewRef(conn), PyLong_FromUnsignedLong(events)};
    return slow_path(e, e->serve_event, args, 3);
}

int tcp_finish_read(Engine *e, int fd, PyObject *conn, const char *head, Py_ssize_t nhead,
                    const char *rest, Py_ssize_t nrest) {
    PyObject *args[] = {PyLong_FromLong(fd), Py_NewRef(conn),
                        PyBytes_FromStringAndSize(head, nhead),
                        PyBytes_FromStringAndSize(rest, nrest)};
    return slow_path(e, e->finish_read, args, 4);
}

int tcp_send(Engine *e, int fd, PyObject *conn, const char *out, Py_ssize_t n) {
    PyObject *args[] = {PyLong_FromLong(fd), Py_NewRef(conn), PyBytes_FromStringAndSize(out, n)};
    return slow_path(e, e->send, args, 3);
}

int tcp_close(Engine *e, int fd, PyObject *conn) {
    PyObject *args[] = {PyLong_FromLong(fd), Py_NewRef(conn)};
    return slow_path(e, e->close_connection, args, 2);
}

int udp_answer(Engine *e, unsigned int request_id, const char *head, Py_ssize_t nhead,
               const char *rest, Py_ssize_t nrest, PyObject *addr) {
    PyObject *args[] = {PyLong_FromUnsignedLong(request_id),
                        PyBytes_FromStringAndSize(head, nhead),
                        PyBytes_FromStringAndSize(rest, nrest), addr};
    return slow_path(e, e->answer, args, 4);
}

/* -- latency -------------------------------------------------------------------------------- */

int flush_samples(Engine *e) {
    int n = e->nsamples;
    e->nsamples = 0;
    for (int i = 0; i < n; i++) {
        PyObject *v = PyFloat_FromDouble(e->samples[i]);
        PyObject *r = v ? PyObject_CallOneArg(e->observe, v) : NULL;
        Py_XDECREF(v);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}
