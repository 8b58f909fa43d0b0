/* The engine: one per worker, shared by the files of the compiled fast path (module.c has
 * the overview). Every file includes this header. */
#ifndef CACHESERVER_FASTPATH_ENGINE_H
#define CACHESERVER_FASTPATH_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "outbuf.h"

#define READ_SIZE 65536
#define TCP_BATCH 512
#define SAMPLE_MASK 63        /* metrics/latency.py: one read in 64 is timed */
#define MAX_SAMPLES 16        /* TCP_BATCH / 64 reads, at most, are timed per wake-up */

/* -- the engine: one per worker ------------------------------------------------------------- */

/* Counter deltas gathered during one wake-up (names as in metrics/counters.py). */
enum {
    C_CMD_GET, C_CMD_SET, C_GET_HITS, C_GET_MISSES, C_BYTES_READ, C_BYTES_WRITTEN,
    C_UDP_RECEIVED, C_UDP_SENT, C_UDP_MALFORMED, C_UDP_MULTIDATAGRAM, C_UDP_SEND_ERRORS,
    C_COUNT
};
extern const char *const counter_names[C_COUNT];
extern PyObject *counter_attrs[C_COUNT];

/* Interned attribute names (boundary.c). */
extern PyObject *s_items, *s_cas, *s_bytes_used, *s_capacity, *s_flush_at, *s_max_item_size,
    *s_clock, *s_stats, *s_total_items, *s_evict_to, *s_observe, *s_pending, *s_buffer,
    *s_request, *s_closing, *s_seen_tick, *s_tick, *s_serve_event, *s_continue, *s_send,
    *s_close, *s_reclaimed, *s_expired_unfetched, *s_get_expired, *s_answer, *s_send_reply,
    *s_detail;

typedef struct {
    PyObject_HEAD
    PyObject *store;
    PyObject *items;       /* the store's dict: key -> item bytes, in LRU order */
    PyObject *counters;
    PyObject *latency;
    PyObject *commands;    /* the protocol's Commands, or None: read for stats detail */
    Py_ssize_t item_overhead;
    /* TCP */
    int epfd;
    PyObject *connections; /* fd -> Connection */
    PyObject *tcp;         /* the TCPServer, for the slow paths */
    /* Where the Connection class keeps its __slots__, to read them without a lookup. */
    PyTypeObject *conn_type;
    Py_ssize_t off_pending, off_buffer, off_request, off_closing, off_seen_tick;
    /* UDP */
    int udp_fd;
    PyObject *udp;         /* the UDPServer, for the slow paths */
    /* Shadow of the Python state, valid between sync_in and sync_out. */
    unsigned long long cas;
    long long bytes_used, capacity, max_item_size, total_items_delta;
    long long now;         /* int(store._clock()) when the wake-up began */
    int flush_pending, shadow_dirty;
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

/* boundary.c: the Python objects the engine works with. */
int add_to_attr(PyObject *obj, PyObject *name, long long delta);
int sync_in(Engine *e);
int sync_out(Engine *e);
int call_python(Engine *e, PyObject *obj, PyObject *name, PyObject *a, PyObject *b,
                PyObject *c, PyObject *d);

#endif
