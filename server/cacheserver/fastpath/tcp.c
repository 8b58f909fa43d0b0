/* TCP: the reader callback for the epoll set of the plain connections (network/tcp.py). */
#include "net.h"

#include <errno.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include "boundary.h"
#include "protocol.h"

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* -- TCP ------------------------------------------------------------------------------------ */

/* The record for fd, the table grown to it when needed (what it has not seen is not plain).
 * NULL on error. */
static ConnState *conn_record(Engine *e, int fd) {
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a negative file descriptor");
        return NULL;
    }
    if (fd >= e->nconns) {
        Py_ssize_t n = e->nconns ? e->nconns : 64;
        while (n <= fd)
            n *= 2;
        /* Zeroed, and only what is copied or used becomes resident. */
        ConnState *conns = PyMem_Calloc(n, sizeof(ConnState));
        if (conns == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        if (e->nconns)
            memcpy(conns, e->conns, e->nconns * sizeof(ConnState));
        PyMem_Free(e->conns);
        e->conns = conns;
        e->nconns = n;
    }
    return &e->conns[fd];
}

/* What the engine knows of the connection on fd: it asks conn.plain when the connection
 * enters the epoll set (Engine.watch) and after each slow-path call for it, and keeps the
 * answer while only the fast path serves it (nothing else changes a connection of this set).
 * NULL on error. */
static ConnState *conn_state(Engine *e, int fd, PyObject *conn) {
    ConnState *st = conn_record(e, fd);
    if (st != NULL && !st->plain) {
        int plain = conn_plain(e, conn);
        if (plain < 0)
            return NULL;
        st->plain = plain;
    }
    return st;
}

/* After a slow-path call for fd: ask conn.plain again before serving it. */
static void slow_path_done(Engine *e, int fd) {
    if (fd < e->nconns)
        e->conns[fd].plain = 0;
}

/* A timed read's duration, kept until the wake-up ends: LatencyHistogram.observe is Python
 * code, which only runs once the engine's state is handed back. */
static void observe(Engine *e, double seconds) {
    if (e->nsamples < MAX_SAMPLES)
        e->samples[e->nsamples++] = seconds;
}

/* One readable, plain connection: read, run, reply; *slow is set when the slow path ran. */
static int serve_conn(Engine *e, ConnState *st, int fd, PyObject *conn, long long tick,
                      int *slow) {
    ssize_t n = recv(fd, e->rbuf, READ_SIZE, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    if (n <= 0) { /* closed or reset by the client */
        *slow = 1;
        return tcp_close(e, fd, conn);
    }
    if (st->tick != (tick & TICK_NONE)) { /* conn.seen_tick = tick, for idle checks */
        if (conn_seen(e, conn, tick) < 0)
            return -1;
        st->tick = tick & TICK_NONE;
    }
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
        *slow = 1;
        int rc = tcp_finish_read(e, fd, conn, out->data, out->len, e->rbuf + done, n - done);
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
    *slow = 1;
    return tcp_send(e, fd, conn, out->data + sent, out->len - sent);
}

PyObject *Engine_serve_tcp(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->tcp == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "attach_tcp was not called");
        return NULL;
    }
    struct epoll_event *events = e->events;
    int ready = epoll_wait(e->epfd, events, (int)TCP_BATCH, 0);
    if (ready < 0) {
        if (errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (ready == 0)
        Py_RETURN_NONE;
    long long tick;
    if (tcp_tick(e, &tick) < 0 || sync_in(e) < 0)
        return NULL;
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
        ConnState *st = (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) ? NULL : conn_state(e, fd, conn);
        int slow = 0;
        if (st == NULL && PyErr_Occurred()) {
            rc = -1;
        } else if (st != NULL && st->plain) {
            rc = serve_conn(e, st, fd, conn, tick, &slow);
        } else {
            slow = 1;
            rc = tcp_serve_event(e, fd, conn, ev);
        }
        if (slow)
            slow_path_done(e, fd);
        Py_DECREF(conn);
        Py_DECREF(fd_obj);
    }
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

PyObject *Engine_attach_tcp(Engine *e, PyObject *args) {
    int epfd;
    PyObject *server, *conn_class;
    if (!PyArg_ParseTuple(args, "iOO!", &epfd, &server, &PyType_Type, &conn_class))
        return NULL;
    if (e->events == NULL
        && (e->events = PyMem_Malloc(TCP_BATCH * sizeof(struct epoll_event))) == NULL)
        return PyErr_NoMemory();
    if (engine_bind_tcp(e, server, conn_class) < 0)
        return NULL;
    e->epfd = epfd;
    Py_RETURN_NONE;
}

/* Engine.watch(fd): a connection entered the epoll set (its own, or one on a reused fd). */
PyObject *Engine_watch(Engine *e, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    ConnState *st = fd <= INT_MAX ? conn_record(e, (int)fd) : NULL;
    if (st == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
    if (st == NULL)
        return NULL;
    st->plain = 0;
    st->tick = TICK_NONE;
    Py_RETURN_NONE;
}

void tcp_free(Engine *e) {
    PyMem_Free(e->conns);
    PyMem_Free(e->events);
    e->conns = NULL;
    e->nconns = 0;
    e->events = NULL;
}
