/* TCP: the reader callback for the epoll set of the plain connections (network/tcp.py). */
#include "net.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include "protocol.h"

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* -- TCP ------------------------------------------------------------------------------------ */

/* A slot of a Connection, read in place (borrowed); the class is checked by the caller. */
#define SLOT(conn, offset) (*(PyObject **)((char *)(conn) + (offset)))

static int empty_bytes(PyObject *v) {
    return v != NULL && PyBytes_CheckExact(v) && PyBytes_GET_SIZE(v) == 0;
}

/* Whether a connection is in the plain state the fast path serves: nothing held back. */
static int conn_is_plain(Engine *e, PyObject *conn) {
    if (Py_TYPE(conn) != e->conn_type) {
        PyErr_SetString(PyExc_TypeError, "a connection of another class than attach_tcp's");
        return -1;
    }
    return empty_bytes(SLOT(conn, e->off_pending)) && empty_bytes(SLOT(conn, e->off_buffer))
        && SLOT(conn, e->off_request) == Py_None && SLOT(conn, e->off_closing) == Py_False;
}

/* A timed read's duration, kept until the wake-up ends: LatencyHistogram.observe is Python
 * code, which only runs once the engine's state is handed back. */
static void observe(Engine *e, double seconds) {
    if (e->nsamples < MAX_SAMPLES)
        e->samples[e->nsamples++] = seconds;
}

static int flush_samples(Engine *e) {
    int n = e->nsamples;
    e->nsamples = 0;
    for (int i = 0; i < n; i++) {
        PyObject *v = PyFloat_FromDouble(e->samples[i]);
        PyObject *r = v ? PyObject_CallMethodObjArgs(e->latency, s_observe, v, NULL) : NULL;
        Py_XDECREF(v);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* One readable, plain connection: read, run, reply. */
static int serve_conn(Engine *e, PyObject *fd_obj, int fd, PyObject *conn, PyObject *tick) {
    ssize_t n = recv(fd, e->rbuf, READ_SIZE, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    if (n <= 0) /* closed or reset by the client */
        return call_python(e, e->tcp, s_close, fd_obj, conn, NULL, NULL);
    PyObject *seen = SLOT(conn, e->off_seen_tick); /* conn.seen_tick = tick, for idle checks */
    Py_INCREF(tick);
    SLOT(conn, e->off_seen_tick) = tick;
    Py_XDECREF(seen);
    e->deltas[C_BYTES_READ] += n;
    int timed = (++e->reads & SAMPLE_MASK) == 0;
    double started = timed ? monotonic() : 0.0;
    OutBuf *out = &e->out;
    out->len = 0;
    Py_ssize_t done = run_requests(e, e->rbuf, n, out);
    if (done < 0)
        return -1;
    if (done < n) {
        /* The rest goes through the Python session, which also sends and closes. */
        PyObject *head = PyBytes_FromStringAndSize(out->data, out->len);
        PyObject *rest = head ? PyBytes_FromStringAndSize(e->rbuf + done, n - done) : NULL;
        int rc = rest ? call_python(e, e->tcp, s_continue, fd_obj, conn, head, rest) : -1;
        Py_XDECREF(head);
        Py_XDECREF(rest);
        if (rc == 0 && timed)
            observe(e, monotonic() - started);
        return rc;
    }
    if (timed)
        observe(e, monotonic() - started);
    if (out->len == 0)
        return 0;
    e->deltas[C_BYTES_WRITTEN] += out->len;
    ssize_t sent = send(fd, out->data, out->len, MSG_NOSIGNAL);
    if (sent == out->len)
        return 0;
    if (sent < 0)
        sent = 0;
    /* The kernel did not take it all (or the client is gone): the Python server keeps the
     * rest and stops reading this client until it is flushed, or closes it. */
    PyObject *rest = PyBytes_FromStringAndSize(out->data + sent, out->len - sent);
    if (rest == NULL)
        return -1;
    int rc = call_python(e, e->tcp, s_send, fd_obj, conn, rest, NULL);
    Py_DECREF(rest);
    return rc;
}

PyObject *Engine_serve_tcp(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->tcp == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "attach_tcp was not called");
        return NULL;
    }
    struct epoll_event events[TCP_BATCH];
    int ready = epoll_wait(e->epfd, events, TCP_BATCH, 0);
    if (ready < 0) {
        if (errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (ready == 0)
        Py_RETURN_NONE;
    PyObject *tick = PyObject_GetAttr(e->tcp, s_tick);
    if (tick == NULL || sync_in(e) < 0) {
        Py_XDECREF(tick);
        return NULL;
    }
    int rc = 0;
    for (int i = 0; i < ready && rc == 0; i++) {
        int fd = events[i].data.fd;
        PyObject *fd_obj = PyLong_FromLong(fd);
        if (fd_obj == NULL) {
            rc = -1;
            break;
        }
        PyObject *conn = PyDict_GetItemWithError(e->connections, fd_obj);
        if (conn == NULL) {
            rc = PyErr_Occurred() ? -1 : 0;
            Py_DECREF(fd_obj);
            continue;
        }
        Py_INCREF(conn); /* a Python path may drop it from the dict */
        uint32_t ev = events[i].events;
        int plain = (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) ? 0 : conn_is_plain(e, conn);
        if (plain < 0) {
            rc = -1;
        } else if (plain) {
            rc = serve_conn(e, fd_obj, fd, conn, tick);
        } else {
            PyObject *ev_obj = PyLong_FromUnsignedLong(ev);
            rc = ev_obj ? call_python(e, e->tcp, s_serve_event, fd_obj, conn, ev_obj, NULL) : -1;
            Py_XDECREF(ev_obj);
        }
        Py_DECREF(conn);
        Py_DECREF(fd_obj);
    }
    Py_DECREF(tick);
    if (sync_out(e) < 0 || rc < 0) {
        e->nsamples = 0;
        return NULL;
    }
    if (flush_samples(e) < 0)
        return NULL;
    if (e->out.cap > 4 * READ_SIZE) { /* do not keep a huge reply's buffer around */
        PyMem_Free(e->out.data);
        e->out.data = NULL;
        e->out.cap = e->out.len = 0;
    }
    Py_RETURN_NONE;
}

/* The offset of a __slots__ member holding an object, or -1 with an error set. */
static Py_ssize_t slot_offset(PyTypeObject *type, PyObject *name) {
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
    if (descr == NULL)
        return -1;
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX || member->type == T_OBJECT)
            offset = member->offset;
    }
    Py_DECREF(descr);
    if (offset < 0)
        PyErr_Format(PyExc_TypeError, "%U is not a __slots__ member of the connection class",
                     name);
    return offset;
}

PyObject *Engine_attach_tcp(Engine *e, PyObject *args) {
    int epfd;
    PyObject *connections, *tcp;
    PyTypeObject *conn_type;
    if (!PyArg_ParseTuple(args, "iO!OO!", &epfd, &PyDict_Type, &connections, &tcp,
                          &PyType_Type, &conn_type))
        return NULL;
    if ((e->off_pending = slot_offset(conn_type, s_pending)) < 0
        || (e->off_buffer = slot_offset(conn_type, s_buffer)) < 0
        || (e->off_request = slot_offset(conn_type, s_request)) < 0
        || (e->off_closing = slot_offset(conn_type, s_closing)) < 0
        || (e->off_seen_tick = slot_offset(conn_type, s_seen_tick)) < 0)
        return NULL;
    Py_INCREF(conn_type);
    Py_XSETREF(e->conn_type, conn_type);
    e->epfd = epfd;
    Py_INCREF(connections);
    Py_XSETREF(e->connections, connections);
    Py_INCREF(tcp);
    Py_XSETREF(e->tcp, tcp);
    Py_RETURN_NONE;
}
