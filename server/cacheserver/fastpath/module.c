/* The compiled fast path: the socket loop for the requests that make up nearly all cache
 * traffic (get or gets of one or more keys, a set whose data block is already here, and the
 * meta protocol's mg, ms and mn in their plain forms), over the Python objects the rest of
 * the server uses.
 *
 * Why it exists: a Python request path costs 3-5 us of interpreter time per request on top
 * of the same syscalls memcached makes (docs/benchmarks.md), which caps a Python server at
 * about two thirds of memcached's rate on one core. The fast path does exactly what the
 * Python layers do for those requests -- same store, same counters, same replies -- and
 * hands everything else to them:
 *
 *   - the store is the store core (storage/core.h), which the Python Store subclasses: the
 *     fast path calls its functions (lookup, hit, fits, set) and applies no store rule of
 *     its own;
 *   - any request it does not know, and any unusual state (an item that does not fit, a
 *     number it would have to refuse, a partial request, a connection with unsent
 *     replies), goes to the Python layers from that request on, so the Python
 *     code stays the single definition of the protocol and this is only a shortcut through
 *     it;
 *   - the counters it bumps are kept in C during one wake-up and added to the Python objects
 *     before any Python code runs and when the wake-up ends.
 *
 * What it shares with the Python side, constants and public names, is declared in
 * cacheserver/fastpath/boundary.py, and boundary.c is the only file here that names a Python
 * attribute or calls Python code. The files, by layer (as the Python packages are split):
 *
 *   module.c       the Engine type and the module (this file)
 *   tcp.c, udp.c   network: the event loop's reader callbacks for the epoll set of the plain
 *                  connections and for the UDP socket (net.h)
 *   text.c         protocol: the request loop (lines, tokens) and get, gets, set
 *   meta.c         protocol: mg, ms, mn (protocol.h covers both)
 *   store.c        storage: get and set through the store core (store.h; storage/core.h)
 *   boundary.c     the Python objects: constants and the core's functions at import, what
 *                  the engine keeps, a wake-up's time and counters, the slow path
 *                  (boundary.h, constants.h)
 *   engine.h       the engine's state; outbuf.h: the reply buffer
 */
#include "engine.h"

#include "boundary.h"
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
    static char *kwlist[] = {"store", "counters", "latency", "commands", NULL};
    PyObject *store, *counters, *latency, *commands = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|O", kwlist, &store, &counters, &latency,
                                     &commands))
        return -1;
    e->epfd = e->udp_fd = -1;
    if (e->rbuf == NULL && (e->rbuf = PyMem_Malloc(READ_SIZE)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return engine_bind(e, store, counters, latency, commands);
}

static int Engine_traverse(Engine *e, visitproc visit, void *arg) {
    Py_VISIT(e->core);
    Py_VISIT(e->counters);
    Py_VISIT(e->observe);
    Py_VISIT(e->commands);
    Py_VISIT(e->tcp);
    Py_VISIT(e->connections);
    Py_VISIT(e->serve_event);
    Py_VISIT(e->finish_read);
    Py_VISIT(e->send);
    Py_VISIT(e->close_connection);
    Py_VISIT(e->answer);
    return 0;
}

static int Engine_clear(Engine *e) {
    Py_CLEAR(e->core);
    Py_CLEAR(e->counters);
    Py_CLEAR(e->observe);
    Py_CLEAR(e->commands);
    Py_CLEAR(e->tcp);
    Py_CLEAR(e->connections);
    Py_CLEAR(e->serve_event);
    Py_CLEAR(e->finish_read);
    Py_CLEAR(e->send);
    Py_CLEAR(e->close_connection);
    Py_CLEAR(e->answer);
    return 0;
}

static void Engine_dealloc(Engine *e) {
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    tcp_free(e);
    udp_free(e);
    PyMem_Free(e->out.data);
    PyMem_Free(e->rbuf);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyMethodDef Engine_methods[] = {
    {"attach_tcp", (PyCFunction)Engine_attach_tcp, METH_VARARGS,
     "attach_tcp(epoll_fd, tcp_server, connection_class): the TCP server the engine serves "
     "(fastpath/boundary.py: what it uses of the two)."},
    {"watch", (PyCFunction)Engine_watch, METH_O,
     "watch(fd): a connection entered the epoll set (the engine asks it whether it is plain "
     "before it serves it)."},
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
    .tp_doc = "Engine(store, counters, latency, commands=None): one worker's fast path "
              "(fastpath/boundary.py: what it uses of them).",
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

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (boundary_load() < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
