/* The compiled fast path: the socket loop for the two request shapes that make up nearly
 * all cache traffic (get or gets of one or more keys, and a set whose data block is already
 * here),
 * over the Python objects the rest of the server uses.
 *
 * Why it exists: a Python request path costs 3-5 us of interpreter time per request on top
 * of the same syscalls memcached makes (docs/benchmarks.md), which caps a Python server at
 * about two thirds of memcached's rate on one core. The fast path does exactly what the Python
 * layers do for those shapes -- same dict, same item bytes, same counters, same replies --
 * and hands everything else to them:
 *
 *   - the store is the Python Store's own dict (dict order is the LRU order) and its items
 *     are the bytes objects cacheserver.storage.item describes;
 *   - any request it does not know, and any unusual state (a pending flush_all, an item
 *     that does not fit, a number it would have to refuse, a partial request, a connection
 *     with unsent replies), goes to the Python session from that request on, so the Python code
 *     stays the single definition of the protocol and this is only a shortcut through it;
 *   - the counters it bumps are kept in C during one wake-up and added to the Python objects
 *     before any Python code runs and when the wake-up ends.
 *
 * The files, by layer (as the Python packages are split):
 *
 *   module.c     the Engine type and the module (this file)
 *   tcp.c, udp.c the network: the event loop's reader callbacks for the epoll set and the UDP
 *                socket (net.h)
 *   text.c       the request loop (lines, tokens) and the text protocol's get, gets, set
 *   meta.c       the meta protocol's mg, ms, mn (protocol.h covers both)
 *   store.c      get and set on the Python Store's dict and item bytes (store.h, item.h)
 *   boundary.c   the Python objects: their state in and out, calls into the Python server
 *   outbuf.h     the reply buffer
 */
#include "engine.h"

#include "item.h"
#include "net.h"
#include "protocol.h"

/* Run requests from bytes without a socket: what the TLS connections use (network/tcp.py
 * gives it the plaintext Python's ssl module decrypted), and the tests' way to compare this
 * path with the Python session on the same input. Returns (replies, offset of the first
 * request left). */
static PyObject *Engine_run(Engine *e, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    if (sync_in(e) == 0) {
        OutBuf *out = &e->out;
        out->len = 0;
        Py_ssize_t done = run_requests(e, view.buf, view.len, out);
        if (sync_out(e) == 0 && done >= 0)
            result = Py_BuildValue("(y#n)", out->data ? out->data : "", out->len, done);
    }
    PyBuffer_Release(&view);
    return result;
}

/* -- type and module ------------------------------------------------------------------------ */

static int Engine_init(Engine *e, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"store", "counters", "latency", "item_overhead", "commands", NULL};
    PyObject *store, *counters, *latency, *commands = Py_None;
    Py_ssize_t overhead;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOn|O", kwlist, &store, &counters, &latency,
                                     &overhead, &commands))
        return -1;
    PyObject *items = PyObject_GetAttr(store, s_items);
    if (items == NULL)
        return -1;
    if (!PyDict_CheckExact(items)) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_TypeError, "the store's _items must be a dict");
        return -1;
    }
    Py_XSETREF(e->items, items);
    Py_INCREF(store);
    Py_XSETREF(e->store, store);
    Py_INCREF(counters);
    Py_XSETREF(e->counters, counters);
    Py_INCREF(latency);
    Py_XSETREF(e->latency, latency);
    Py_INCREF(commands);
    Py_XSETREF(e->commands, commands);
    e->item_overhead = overhead;
    e->epfd = e->udp_fd = -1;
    if (e->rbuf == NULL && (e->rbuf = PyMem_Malloc(READ_SIZE)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int Engine_traverse(Engine *e, visitproc visit, void *arg) {
    Py_VISIT(e->store);
    Py_VISIT(e->items);
    Py_VISIT(e->counters);
    Py_VISIT(e->latency);
    Py_VISIT(e->commands);
    Py_VISIT(e->connections);
    Py_VISIT(e->tcp);
    Py_VISIT(e->udp);
    Py_VISIT(e->conn_type);
    return 0;
}

static int Engine_clear(Engine *e) {
    Py_CLEAR(e->store);
    Py_CLEAR(e->items);
    Py_CLEAR(e->counters);
    Py_CLEAR(e->latency);
    Py_CLEAR(e->commands);
    Py_CLEAR(e->connections);
    Py_CLEAR(e->tcp);
    Py_CLEAR(e->udp);
    Py_CLEAR(e->conn_type);
    return 0;
}

static void Engine_dealloc(Engine *e) {
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    PyMem_Free(e->out.data);
    PyMem_Free(e->rbuf);
    PyMem_Free(e->recv_batch);
    PyMem_Free(e->send_queue);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMethodDef Engine_methods[] = {
    {"attach_tcp", (PyCFunction)Engine_attach_tcp, METH_VARARGS,
     "attach_tcp(epoll_fd, connections, tcp_server, connection_class): the TCP server the "
     "engine serves."},
    {"serve_tcp", (PyCFunction)Engine_serve_tcp, METH_NOARGS,
     "Serve every ready client of the epoll set (the event loop's reader callback)."},
    {"attach_udp", (PyCFunction)Engine_attach_udp, METH_VARARGS,
     "attach_udp(socket_fd, udp_server): the UDP server the engine serves."},
    {"serve_udp", (PyCFunction)Engine_serve_udp, METH_NOARGS,
     "Drain waiting datagrams (the event loop's reader callback)."},
    {"run", (PyCFunction)Engine_run, METH_O,
     "run(data) -> (replies, consumed): the fast path on bytes (TLS connections, tests)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cacheserver.fastpath._fastpath.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Engine(store, counters, latency, item_overhead, commands=None): one worker's "
              "fast path.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "The compiled fast path (see cacheserver/fastpath/module.c).", -1, NULL, NULL, NULL, NULL,
    NULL,
};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__fastpath(void) {
    INTERN(s_items, "_items");
    INTERN(s_cas, "_cas");
    INTERN(s_bytes_used, "bytes_used");
    INTERN(s_capacity, "capacity");
    INTERN(s_flush_at, "_flush_at");
    INTERN(s_max_item_size, "max_item_size");
    INTERN(s_clock, "_clock");
    INTERN(s_stats, "stats");
    INTERN(s_total_items, "total_items");
    INTERN(s_evict_to, "_evict_to");
    INTERN(s_observe, "observe");
    INTERN(s_pending, "pending");
    INTERN(s_buffer, "_buffer");
    INTERN(s_request, "_request");
    INTERN(s_closing, "closing");
    INTERN(s_seen_tick, "seen_tick");
    INTERN(s_tick, "tick");
    INTERN(s_serve_event, "_serve_event");
    INTERN(s_continue, "_continue");
    INTERN(s_send, "_send");
    INTERN(s_close, "_close");
    INTERN(s_reclaimed, "reclaimed");
    INTERN(s_expired_unfetched, "expired_unfetched");
    INTERN(s_get_expired, "get_expired");
    INTERN(s_answer, "_answer");
    INTERN(s_send_reply, "_send_reply");
    INTERN(s_detail, "detail");
    for (int i = 0; i < C_COUNT; i++)
        INTERN(counter_attrs[i], counter_names[i]);
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0
        || PyModule_AddIntConstant(m, "BUMPED_AT", BUMPED_AT) < 0
        || PyModule_AddIntConstant(m, "META_AT", META_AT) < 0
        || PyModule_AddIntConstant(m, "MARKS_AT", MARKS_AT) < 0
        || PyModule_AddIntConstant(m, "FETCHED", FETCHED) < 0
        || PyModule_AddIntConstant(m, "BUMP_INTERVAL", BUMP_INTERVAL) < 0
        || PyModule_AddIntConstant(m, "MAX_RELATIVE_EXPTIME", MAX_RELATIVE_EXPTIME) < 0
        || PyModule_AddIntConstant(m, "REPLY_LIMIT", REPLY_LIMIT) < 0
        || PyModule_AddStringConstant(m, "CLUSTER_KEY", CLUSTER_KEY) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
