/* The engine: one per worker, shared by the files of the compiled fast path (module.c has
 * the overview). Every file includes this header. */
#ifndef CACHESERVER_FASTPATH_ENGINE_H
#define CACHESERVER_FASTPATH_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "constants.h"
#include "core.h"
#include "outbuf.h"

/* The store core's type, from its module (boundary.c): the Store the engine serves is an
 * instance of it, and the engine calls core.c's functions (compiled in) on it. */
#pragma GCC visibility push(hidden)
extern PyTypeObject *core_type;
#pragma GCC visibility pop

#define MAX_SAMPLES 16 /* timed reads kept per wake-up (one in SAMPLE_MASK + 1 is timed) */

/* Counter deltas gathered during one wake-up (the names of metrics/counters.py's fields are
 * in boundary.c). */
enum {
    C_CMD_GET, C_CMD_SET, C_GET_HITS, C_GET_MISSES, C_BYTES_READ, C_BYTES_WRITTEN,
    C_UDP_RECEIVED, C_UDP_SENT, C_UDP_MALFORMED, C_UDP_MULTIDATAGRAM, C_UDP_SEND_ERRORS,
    C_COUNT
};

/* What the engine remembers of the connection on one file descriptor (tcp.c): 4 bytes, so
 * that the table by descriptor costs next to nothing next to a connection. */
typedef struct {
    unsigned int plain : 1; /* conn.plain was true, and only the fast path served it since */
    unsigned int tick : 31; /* the tick last written to conn.seen_tick (TICK_NONE: none) */
} ConnState;
#define TICK_NONE 0x7FFFFFFFu

typedef struct {
    PyObject_HEAD
    /* Kept from Engine(store, counters, latency, commands) (boundary.c, engine_bind). */
    CoreObject *core;      /* the Store: an instance of the store core's type */
    PyObject *counters;
    PyObject *observe;     /* latency.observe */
    PyObject *commands;    /* the protocol's Commands, or None: read for stats detail */
    /* TCP, kept from attach_tcp */
    int epfd;
    PyObject *tcp;         /* the TCPServer: its tick is read when a wake-up begins */
    PyObject *connections; /* tcp.connections: fd -> Connection */
    PyObject *serve_event, *finish_read, *send, *close_connection; /* its slow path */
    struct epoll_event *events;
    ConnState *conns;      /* by file descriptor */
    Py_ssize_t nconns;
    /* UDP, kept from attach_udp */
    int udp_fd;
    PyObject *answer;      /* the UDPServer's slow path */
    /* Read when a wake-up begins (sync_in). */
    long long now;         /* int(store.clock()) */
    int python_only;       /* stats detail is on: the Python path counts every key */
    long long deltas[C_COUNT];
    unsigned long reads;
    double samples[MAX_SAMPLES];
    int nsamples;
    OutBuf out;
    char *rbuf;
    struct RecvBatch *recv_batch;
    struct SendQueue *send_queue;
} Engine;

#endif
