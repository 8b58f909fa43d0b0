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

/* What the code is written for: memcached's UDP frame header. */
static const char *const formats[][2] = {
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
    if (U32_MAX > 4294967295ULL || I32_MAX > U32_MAX || UDP_HEADER == 0 || READ_SIZE == 0 || TCP_BATCH == 0 || UDP_BATCH == 0)
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
static PyObject *s_detail, *s_tick, *s_plain, *s_seen_tick;

/* The store core's type (storage/core.h), from its module. */
PyTypeObject *core_type;

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return -1

int boundary_load(void) {
    INTERN(s_detail, "detail");
    INTERN(s_tick, "tick");
    INTERN(s_plain, "plain");
    INTERN(s_seen_tick, "seen_tick");
    for (int i = 0; i < C_COUNT; i++)
        INTERN(counter_attrs[i], counter_names[i]);
    PyObject *core = PyImport_ImportModule("cacheserver.storage._core");
    PyObject *type = core ? PyObject_GetAttrString(core, "Core") : NULL;
    PyObject *version = type ? PyObject_GetAttrString(core, "CORE_VERSION") : NULL;
    Py_XDECREF(core);
    if (version == NULL || !PyType_Check(type)) {
        Py_XDECREF(type);
        Py_XDECREF(version);
        return PyErr_Occurred() ? -1 : refuse("*", "cacheserver.storage._core.Core is not a type");
    }
    long v = PyLong_AsLong(version);
    Py_DECREF(version);
    if (v != CORE_VERSION) {
        Py_DECREF(type);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ImportError,
                         "cacheserver.storage._core is version %ld of the store core, the fast "
                         "path was built with version %d (storage/core.h): rebuild both",
                         v, CORE_VERSION);
        return -1;
    }
    core_type = (PyTypeObject *)type; /* kept for the life of the process */
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
    if (!PyObject_TypeCheck(store, core_type)) {
        PyErr_Format(PyExc_TypeError,
                     "the engine serves a cacheserver.storage.Store (the store core), not %R",
                     store);
        return -1;
    }
    Py_XSETREF(e->observe, keep(latency, "observe", 1));
    if (e->observe == NULL || check(counters, counter_attrs, C_COUNT) < 0)
        return -1;
    Py_INCREF(store);
    Py_XSETREF(e->core, (CoreObject *)store);
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

/* -- a wake-up --------------------------------------------------------------------------------- */

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

static int get_ll(PyObject *obj, PyObject *name, long long *value) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *value = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*value == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* When a wake-up begins (and after the slow path ran): the time, and whether stats detail
 * is on. */
int sync_in(Engine *e) {
    if (core_now(e->core, &e->now) < 0)
        return -1;
    e->python_only = 0;
    if (e->commands != NULL && e->commands != Py_None) {
        PyObject *detail = PyObject_GetAttr(e->commands, s_detail);
        if (detail == NULL)
            return -1;
        e->python_only = detail != Py_None;
        Py_DECREF(detail);
    }
    return 0;
}

/* The counters of the wake-up, added to metrics/counters.py's before any Python code runs. */
int sync_out(Engine *e) {
    PyObject *exc_type, *exc_value, *exc_tb;
    int rc = 0;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb); /* keep a pending error while syncing */
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
