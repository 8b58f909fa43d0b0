/* The compiled fast path: the socket loop for the two request shapes that make up nearly
 * all cache traffic (get or gets of one or more keys, and a set whose data block is already
 * here),
 * over the Python objects the rest of the server uses.
 *
 * Why it exists: a Python request path costs 3-5 us of interpreter time per request on top
 * of the same syscalls memcached makes (docs/benchmarks.md), which caps a Python server at
 * about two thirds of memcached's rate on one core. This file does exactly what the Python
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

/* The item layout of cacheserver/storage/item.py: a <QIIIBB header (cas, exptime, flags,
 * bumped, meta, marks), then the reply suffix. fastpath/__init__.py checks these against it. */
#define HEADER_SIZE 22
#define EXPTIME_AT 8
#define FLAGS_AT 12
#define BUMPED_AT 16
#define META_AT 20
#define MARKS_AT 21
#define FETCHED 0x80
#define BUMP_INTERVAL 60      /* storage/store.py: a hit moves an item at most this often */
#define MAX_RELATIVE_EXPTIME (60 * 60 * 24 * 30) /* protocol/commands.py */
#define REPLY_LIMIT (4 * 1024 * 1024) /* protocol/session.py: TCP_REPLY_LIMIT */
#define KEY_MAX_LENGTH 250
/* discovery/membership.py: CLUSTER_KEY. A get of this key alone is ElastiCache's older
 * auto-discovery request, which the Python session answers (over TCP, with a membership). */
#define CLUSTER_KEY "AmazonElastiCache:cluster"
#define CLUSTER_KEY_LEN (sizeof(CLUSTER_KEY) - 1)
#define MAX_TOKENS 32         /* longer multi-gets go to the Python path */
#define MEMCACHED_ITEM_OVERHEAD (48 + 8 + 1)
#define U32_MAX 4294967295ULL
#define I32_MAX 2147483647ULL

#define READ_SIZE 65536
#define TCP_BATCH 512
#define SAMPLE_MASK 63        /* metrics/latency.py: one read in 64 is timed */
#define MAX_SAMPLES 16        /* TCP_BATCH / 64 reads, at most, are timed per wake-up */

#define UDP_HEADER 8
#define UDP_MAX_PAYLOAD 1400  /* network/udp.py: MAX_PAYLOAD */
#define UDP_VLEN 32           /* datagrams per recvmmsg / sendmmsg */
#define UDP_BATCH 256         /* datagrams per wake-up, as network/udp.py */
#define UDP_READ_SIZE 65536

static const char END[] = "END\r\n";
static const char STORED[] = "STORED\r\n";

/* -- growing output buffer ------------------------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} OutBuf;

static int out_reserve(OutBuf *out, Py_ssize_t extra) {
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

static int out_put(OutBuf *out, const char *bytes, Py_ssize_t n) {
    if (out_reserve(out, n) < 0)
        return -1;
    memcpy(out->data + out->len, bytes, n);
    out->len += n;
    return 0;
}

/* -- the engine: one per worker ------------------------------------------------------------- */

/* Counter deltas gathered during one wake-up (names as in metrics/counters.py). */
enum {
    C_CMD_GET, C_CMD_SET, C_GET_HITS, C_GET_MISSES, C_BYTES_READ, C_BYTES_WRITTEN,
    C_UDP_RECEIVED, C_UDP_SENT, C_UDP_MALFORMED, C_UDP_MULTIDATAGRAM, C_UDP_SEND_ERRORS,
    C_COUNT
};
static const char *const counter_names[C_COUNT] = {
    "cmd_get", "cmd_set", "get_hits", "get_misses", "bytes_read", "bytes_written",
    "udp_datagrams_received", "udp_datagrams_sent", "udp_dropped_malformed",
    "udp_dropped_multidatagram", "udp_send_errors",
};
static PyObject *counter_attrs[C_COUNT];

/* Interned attribute names. */
static PyObject *s_items, *s_cas, *s_bytes_used, *s_capacity, *s_flush_at, *s_max_item_size,
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
static int sync_in(Engine *e) {
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
static int sync_out(Engine *e) {
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

/* -- requests ------------------------------------------------------------------------------- */

static inline unsigned int le32(const unsigned char *p) {
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16)
        | ((unsigned int)p[3] << 24);
}

/* ASCII digits only, at most 10 of them (the limits checked are 32-bit); -1 otherwise. */
static long long parse_small(const char *p, Py_ssize_t n) {
    if (n < 1 || n > 10)
        return -1;
    long long v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

/* Store.get's expiry branch: drop the item, count it. */
static int drop_expired(Engine *e, PyObject *key, PyObject *item) {
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    int fetched = raw[META_AT] & FETCHED;
    e->bytes_used -= PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(item) + e->item_overhead;
    e->shadow_dirty = 1;
    if (PyDict_DelItem(e->items, key) < 0)
        return -1;
    PyObject *stats = PyObject_GetAttr(e->store, s_stats);
    if (stats == NULL)
        return -1;
    int rc = (add_to_attr(stats, s_reclaimed, 1) < 0
              || (!fetched && add_to_attr(stats, s_expired_unfetched, 1) < 0)
              || add_to_attr(stats, s_get_expired, 1) < 0) ? -1 : 0;
    Py_DECREF(stats);
    return rc;
}

/* Store.get for one key, then the VALUE block of a hit. 1 hit, 0 miss, -1 error. */
static int get_one(Engine *e, const char *k, Py_ssize_t klen, int with_cas, OutBuf *out) {
    PyObject *key = PyBytes_FromStringAndSize(k, klen);
    if (key == NULL)
        return -1;
    PyObject *item = PyDict_GetItemWithError(e->items, key);
    if (item == NULL) {
        Py_DECREF(key);
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(item);
    int rc = -1;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    unsigned int exptime = le32(raw + EXPTIME_AT);
    if (exptime) {
        PyObject *clock = PyObject_GetAttr(e->store, s_clock);
        PyObject *now_obj = clock ? PyObject_CallNoArgs(clock) : NULL;
        Py_XDECREF(clock);
        if (now_obj == NULL)
            goto done;
        double now = PyFloat_AsDouble(now_obj);
        Py_DECREF(now_obj);
        if (now == -1.0 && PyErr_Occurred())
            goto done;
        if (exptime <= now) {
            rc = drop_expired(e, key, item) < 0 ? -1 : 0;
            goto done;
        }
    }
    /* As Store.get: a hit marks the item fetched and moves it to the dict's end (most
     * recently used), unless a hit did that less than BUMP_INTERVAL ago. */
    if (!(raw[META_AT] & FETCHED) || e->now - (long long)le32(raw + BUMPED_AT) >= BUMP_INTERVAL) {
        PyObject *bumped = PyBytes_FromStringAndSize((const char *)raw, PyBytes_GET_SIZE(item));
        if (bumped == NULL)
            goto done;
        unsigned char *b = (unsigned char *)PyBytes_AS_STRING(bumped);
        for (int i = 0; i < 4; i++)
            b[BUMPED_AT + i] = (unsigned char)((unsigned long long)e->now >> (8 * i));
        b[META_AT] |= FETCHED;
        Py_SETREF(item, bumped);
        raw = b;
        if (PyDict_DelItem(e->items, key) < 0 || PyDict_SetItem(e->items, key, item) < 0)
            goto done;
    }
    Py_ssize_t tail = PyBytes_GET_SIZE(item) - HEADER_SIZE;
    if (out_reserve(out, 6 + klen + tail + 24) < 0)
        goto done;
    memcpy(out->data + out->len, "VALUE ", 6);
    memcpy(out->data + out->len + 6, k, klen);
    out->len += 6 + klen;
    if (with_cas) {
        /* gets: " <flags> <bytes>" from the suffix, then " <cas>\r\n", then the data. */
        Py_ssize_t data_at = raw[META_AT] & 0x7F;
        unsigned long long cas = 0;
        for (int i = 7; i >= 0; i--)
            cas = (cas << 8) | raw[i];
        memcpy(out->data + out->len, raw + HEADER_SIZE, data_at - 2 - HEADER_SIZE);
        out->len += data_at - 2 - HEADER_SIZE;
        out->len += snprintf(out->data + out->len, 24, " %llu\r\n", cas);
        memcpy(out->data + out->len, raw + data_at, PyBytes_GET_SIZE(item) - data_at);
        out->len += PyBytes_GET_SIZE(item) - data_at;
    } else {
        memcpy(out->data + out->len, raw + HEADER_SIZE, tail);
        out->len += tail;
    }
    rc = 1;
done:
    Py_DECREF(item);
    Py_DECREF(key);
    return rc;
}

/* Store.set + Store._store for a value that fits; 0 done, -1 error. Eviction, when
 * the store runs over capacity, is the Python Store's own _evict_to. */
static int set_one(Engine *e, const char *k, Py_ssize_t klen, unsigned long long flags,
                   unsigned int exptime, const char *data, Py_ssize_t nbytes) {
    char suffix[32];
    int slen = snprintf(suffix, sizeof suffix, " %llu %zd\r\n", flags, nbytes);
    Py_ssize_t size = HEADER_SIZE + slen + nbytes + 2;
    PyObject *key = PyBytes_FromStringAndSize(k, klen);
    PyObject *item = key ? PyBytes_FromStringAndSize(NULL, size) : NULL;
    if (item == NULL) {
        Py_XDECREF(key);
        return -1;
    }
    unsigned long long cas = ++e->cas;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(item);
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(cas >> (8 * i));
    for (int i = 0; i < 4; i++) {
        p[EXPTIME_AT + i] = (unsigned char)(exptime >> (8 * i));
        p[FLAGS_AT + i] = (unsigned char)(flags >> (8 * i));
    }
    for (int i = 0; i < 4; i++) /* stored now: memcached's last access time */
        p[BUMPED_AT + i] = (unsigned char)((unsigned long long)e->now >> (8 * i));
    p[META_AT] = (unsigned char)(HEADER_SIZE + slen);
    p[MARKS_AT] = 0;
    memcpy(p + HEADER_SIZE, suffix, slen);
    memcpy(p + HEADER_SIZE + slen, data, nbytes);
    memcpy(p + HEADER_SIZE + slen + nbytes, "\r\n", 2);

    int rc = -1;
    long long cost = klen + size + e->item_overhead;
    PyObject *old = PyDict_GetItemWithError(e->items, key);
    if (old == NULL && PyErr_Occurred())
        goto done;
    if (old != NULL) {
        cost -= klen + PyBytes_GET_SIZE(old) + e->item_overhead;
        if (PyDict_DelItem(e->items, key) < 0) /* re-inserted below: most recently used */
            goto done;
    }
    if (PyDict_SetItem(e->items, key, item) < 0)
        goto done;
    e->bytes_used += cost;
    e->shadow_dirty = 1;
    e->total_items_delta++;
    rc = 0;
    if (e->bytes_used > e->capacity) {
        /* As Store._store: evict a little below capacity, never the key just stored. */
        rc = -1;
        if (sync_out(e) < 0)
            goto done;
        PyObject *target = PyLong_FromLongLong(e->capacity - (e->capacity >> 6));
        PyObject *r = target ? PyObject_CallMethodObjArgs(e->store, s_evict_to, target,
                                                          Py_False, key, NULL) : NULL;
        Py_XDECREF(target);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
        rc = sync_in(e);
    }
done:
    Py_DECREF(item);
    Py_DECREF(key);
    return rc;
}

/* -- the meta protocol's mg, ms and mn (protocol/meta.py defines them) ---------------------- */

#define META_MAX_WORDS 20   /* meta.py: MAX_WORDS */
#define META_MAX_OPAQUE 32  /* meta.py: MAX_OPAQUE_LENGTH */

/* A meta flag letter as a bit (the letters the fast path answers are all ASCII letters). */
static inline unsigned long long flag_bit(unsigned char c) {
    if (c >= 'a' && c <= 'z')
        return 1ULL << (c - 'a');
    if (c >= 'A' && c <= 'Z')
        return 1ULL << (26 + c - 'A');
    return 0;
}
#define FLAG(c) flag_bit((unsigned char)(c))

/* The flags of a meta request as bits, when every one is a flag the fast path answers: each
 * letter of ``allowed`` at most once, alone (``v``, not ``v1``), but O with its token and T
 * and F with digits. 0 otherwise (anything else, errors included, is the Python path's). */
static unsigned long long meta_flags_plain(const char *const *tok, const Py_ssize_t *tlen,
                                           int from, int ntok, unsigned long long allowed) {
    unsigned long long seen = 1ULL << 63; /* never a letter: "no flags" is not 0 */
    for (int i = from; i < ntok; i++) {
        unsigned char c = (unsigned char)tok[i][0];
        unsigned long long bit = flag_bit(c);
        if (!(bit & allowed) || (seen & bit))
            return 0;
        seen |= bit;
        if (c == 'O') {
            if (tlen[i] > META_MAX_OPAQUE)
                return 0;
        } else if (c == 'T' || c == 'F') {
            if (parse_small(tok[i] + 1, tlen[i] - 1) < 0)
                return 0;
        } else if (tlen[i] != 1) {
            return 0;
        }
    }
    return seen;
}

/* Decimal digits of v at p; returns the end. */
static char *put_u64(char *p, unsigned long long v) {
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = digits[--n];
    return p;
}

static int out_u64(OutBuf *out, char flag, unsigned long long v) {
    if (out_reserve(out, 24) < 0)
        return -1;
    char *p = out->data + out->len;
    *p++ = ' ';
    *p++ = flag;
    out->len = put_u64(p, v) - out->data;
    return 0;
}

/* The O and k flags, echoed in the client's order (what a miss and a store answer). */
static int meta_echo(const char *const *tok, const Py_ssize_t *tlen, int from, int ntok,
                     const char *key, Py_ssize_t klen, OutBuf *out) {
    for (int i = from; i < ntok; i++) {
        if (tok[i][0] == 'O') {
            if (out_put(out, " ", 1) < 0 || out_put(out, tok[i], tlen[i]) < 0)
                return -1;
        } else if (tok[i][0] == 'k') {
            if (out_put(out, " k", 2) < 0 || out_put(out, key, klen) < 0)
                return -1;
        }
    }
    return 0;
}

/* mg with the flags v k s f t c h l O q u (Meta.mg). 1 answered, 0 for the Python path
 * (an item with meta marks: stale, recache token, base64 key), -1 error. */
static int mg_one(Engine *e, const char *const *tok, const Py_ssize_t *tlen, int ntok,
                  unsigned long long flagbits, OutBuf *out) {
    const char *k = tok[1];
    Py_ssize_t klen = tlen[1];
    PyObject *key = PyBytes_FromStringAndSize(k, klen);
    if (key == NULL)
        return -1;
    PyObject *item = PyDict_GetItemWithError(e->items, key);
    if (item == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    int rc = -1;
    Py_XINCREF(item);
    if (item != NULL) {
        const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
        if (raw[MARKS_AT]) {
            rc = 0;
            goto done;
        }
        unsigned int exptime = le32(raw + EXPTIME_AT);
        if (exptime && (long long)exptime <= e->now) { /* Store.peek's expiry */
            if (drop_expired(e, key, item) < 0)
                goto done;
            Py_CLEAR(item);
        }
    }
    int quiet = (flagbits & FLAG('q')) != 0;
    e->deltas[C_CMD_GET]++;
    if (item == NULL) {
        e->deltas[C_GET_MISSES]++;
        if (!quiet && (out_put(out, "EN", 2) < 0 || meta_echo(tok, tlen, 2, ntok, k, klen, out) < 0
                       || out_put(out, "\r\n", 2) < 0))
            goto done;
        rc = 1;
        goto done;
    }
    e->deltas[C_GET_HITS]++;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    Py_ssize_t size = PyBytes_GET_SIZE(item);
    Py_ssize_t data_at = raw[META_AT] & 0x7F;
    Py_ssize_t nbytes = size - data_at - 2;
    unsigned int exptime = le32(raw + EXPTIME_AT), flags = le32(raw + FLAGS_AT);
    unsigned int bumped = le32(raw + BUMPED_AT);
    unsigned long long cas = 0;
    for (int i = 7; i >= 0; i--)
        cas = (cas << 8) | raw[i];
    int value = (flagbits & FLAG('v')) != 0;
    if (out_reserve(out, 24) < 0)
        goto done;
    if (value) {
        memcpy(out->data + out->len, "VA ", 3);
        out->len = put_u64(out->data + out->len + 3, (unsigned long long)nbytes) - out->data;
    } else {
        memcpy(out->data + out->len, "HD", 2);
        out->len += 2;
    }
    for (int i = 2; i < ntok; i++) {
        int r = 0;
        switch (tok[i][0]) {
        case 's':
            r = out_u64(out, 's', (unsigned long long)nbytes);
            break;
        case 't':
            r = exptime == 0 ? out_put(out, " t-1", 4)
                             : out_u64(out, 't', (unsigned int)((long long)exptime - e->now));
            break;
        case 'c':
            r = out_u64(out, 'c', cas);
            break;
        case 'f':
            r = out_u64(out, 'f', flags);
            break;
        case 'l':
            r = out_u64(out, 'l', (unsigned int)(e->now - (long long)bumped));
            break;
        case 'h':
            r = out_put(out, (raw[META_AT] & FETCHED) ? " h1" : " h0", 3);
            break;
        case 'O':
            r = out_put(out, " ", 1) < 0 ? -1 : out_put(out, tok[i], tlen[i]);
            break;
        case 'k':
            r = out_put(out, " k", 2) < 0 ? -1 : out_put(out, k, klen);
            break;
        }
        if (r < 0)
            goto done;
    }
    if (out_put(out, "\r\n", 2) < 0 || (value && out_put(out, (const char *)raw + data_at,
                                                          size - data_at) < 0))
        goto done;
    /* The hit, as Store.amend(hit=True): fetched, and moved at most once per interval. */
    if (!(flagbits & FLAG('u'))
        && (!(raw[META_AT] & FETCHED) || e->now - (long long)bumped >= BUMP_INTERVAL)) {
        PyObject *moved = PyBytes_FromStringAndSize((const char *)raw, size);
        if (moved == NULL)
            goto done;
        unsigned char *b = (unsigned char *)PyBytes_AS_STRING(moved);
        for (int i = 0; i < 4; i++)
            b[BUMPED_AT + i] = (unsigned char)((unsigned long long)e->now >> (8 * i));
        b[META_AT] |= FETCHED;
        int failed = PyDict_DelItem(e->items, key) < 0 || PyDict_SetItem(e->items, key, moved) < 0;
        Py_DECREF(moved);
        if (failed)
            goto done;
    }
    rc = 1;
done:
    Py_XDECREF(item);
    Py_DECREF(key);
    return rc;
}

/* Run the requests at the start of buf that the fast path knows, appending their replies to
 * out. Returns the offset of the first request left for the Python session (len when none
 * is), or -1 with a Python error set. */
static Py_ssize_t run_requests(Engine *e, const char *buf, Py_ssize_t len, OutBuf *out) {
    Py_ssize_t pos = 0;
    const char *tok[MAX_TOKENS];
    Py_ssize_t tlen[MAX_TOKENS];
    if (e->python_only)
        return 0;
    while (pos < len) {
        const char *line = buf + pos;
        const char *eol = memchr(line, '\n', len - pos);
        if (eol == NULL)
            return pos; /* a partial line: the session keeps it */
        const char *end = (eol - line > 1 && eol[-1] == '\r') ? eol - 1 : eol;
        if (memchr(line, '\0', end - line) != NULL)
            return pos; /* memcached ends the line at a NUL: the Python path does too */
        int ntok = 0;
        const char *p = line;
        while (p < end) {
            if (*p == ' ') {
                p++;
                continue;
            }
            if (ntok == MAX_TOKENS)
                return pos;
            const char *start = p;
            while (p < end && *p != ' ')
                p++;
            tok[ntok] = start;
            tlen[ntok++] = p - start;
        }
        Py_ssize_t next = eol + 1 - buf;
        int gets = tlen[0] == 4 && memcmp(tok[0], "gets", 4) == 0;
        if (ntok >= 2 && (gets || (tlen[0] == 3 && memcmp(tok[0], "get", 3) == 0))) {
            if (e->flush_pending)
                return pos;
            if (ntok == 2 && !gets && tlen[1] == (Py_ssize_t)CLUSTER_KEY_LEN
                && memcmp(tok[1], CLUSTER_KEY, CLUSTER_KEY_LEN) == 0)
                return pos;
            for (int i = 1; i < ntok; i++)
                if (tlen[i] > KEY_MAX_LENGTH)
                    return pos; /* the Python path answers with memcached's error */
            for (int i = 1; i < ntok; i++) {
                int hit = get_one(e, tok[i], tlen[i], gets, out);
                if (hit < 0)
                    return -1;
                e->deltas[C_CMD_GET]++;
                e->deltas[hit ? C_GET_HITS : C_GET_MISSES]++;
            }
            if (out_put(out, END, 5) < 0)
                return -1;
            pos = next;
            if (out->len > REPLY_LIMIT)
                return pos; /* the Python session holds back what is left (its reply_limit) */
            continue;
        }
        int noreply = ntok == 6 && tlen[5] == 7 && memcmp(tok[5], "noreply", 7) == 0;
        if ((ntok == 5 || noreply) && tlen[0] == 3 && memcmp(tok[0], "set", 3) == 0) {
            long long flags = parse_small(tok[2], tlen[2]);
            long long exptime = parse_small(tok[3], tlen[3]);
            long long nbytes = parse_small(tok[4], tlen[4]);
            Py_ssize_t klen = tlen[1];
            Py_ssize_t data_end = next + nbytes;
            if (flags < 0 || (unsigned long long)flags > U32_MAX || exptime < 0
                || (unsigned long long)exptime > I32_MAX || nbytes < 0
                || (unsigned long long)nbytes > I32_MAX || klen > KEY_MAX_LENGTH
                || data_end + 2 > len || buf[data_end] != '\r' || buf[data_end + 1] != '\n')
                return pos;
            /* Store.too_large, and an item bigger than all the memory: the Python path. */
            if (MEMCACHED_ITEM_OVERHEAD + klen + (flags ? 4 : 0) + nbytes + 2 > e->max_item_size
                || klen + HEADER_SIZE + 32 + nbytes + e->item_overhead > e->capacity)
                return pos;
            /* Commands.absolute_exptime: 0 never; up to 30 days relative; else a Unix time. */
            if (exptime && exptime <= MAX_RELATIVE_EXPTIME)
                exptime += e->now;
            e->deltas[C_CMD_SET]++;
            if (set_one(e, tok[1], klen, (unsigned long long)flags, (unsigned int)exptime,
                        buf + next, nbytes) < 0)
                return -1;
            if (!noreply && out_put(out, STORED, 8) < 0)
                return -1;
            pos = data_end + 2;
            continue;
        }
        if (tlen[0] == 2 && tok[0][0] == 'm') {
            if (tok[0][1] == 'n') { /* mn: the end of a quiet batch */
                if (out_put(out, "MN\r\n", 4) < 0)
                    return -1;
                pos = next;
                continue;
            }
            if (ntok >= META_MAX_WORDS || ntok < 2 || tlen[1] > KEY_MAX_LENGTH || e->flush_pending)
                return pos;
            if (tok[0][1] == 'g') {
                unsigned long long flagbits = meta_flags_plain(
                    tok, tlen, 2, ntok,
                    FLAG('v') | FLAG('k') | FLAG('c') | FLAG('f') | FLAG('s') | FLAG('t')
                        | FLAG('q') | FLAG('O') | FLAG('h') | FLAG('l') | FLAG('u'));
                if (!flagbits)
                    return pos;
                int r = mg_one(e, tok, tlen, ntok, flagbits, out);
                if (r <= 0)
                    return r < 0 ? -1 : pos;
                pos = next;
                if (out->len > REPLY_LIMIT)
                    return pos;
                continue;
            }
            if (tok[0][1] == 's' && ntok >= 3) { /* ms in set mode: Meta.complete_set */
                long long nbytes = parse_small(tok[2], tlen[2]);
                long long flags = 0, exptime = 0;
                unsigned long long flagbits = meta_flags_plain(
                    tok, tlen, 3, ntok,
                    FLAG('T') | FLAG('F') | FLAG('q') | FLAG('O') | FLAG('k') | FLAG('c'));
                if (nbytes < 0 || (unsigned long long)nbytes > I32_MAX - 2 || !flagbits)
                    return pos;
                for (int i = 3; i < ntok; i++) {
                    if (tok[i][0] == 'T')
                        exptime = parse_small(tok[i] + 1, tlen[i] - 1);
                    else if (tok[i][0] == 'F')
                        flags = parse_small(tok[i] + 1, tlen[i] - 1);
                }
                Py_ssize_t klen = tlen[1];
                Py_ssize_t data_end = next + nbytes;
                if ((unsigned long long)flags > U32_MAX || (unsigned long long)exptime > I32_MAX
                    || data_end + 2 > len || buf[data_end] != '\r' || buf[data_end + 1] != '\n'
                    || MEMCACHED_ITEM_OVERHEAD + klen + (flags ? 4 : 0) + nbytes + 2
                           > e->max_item_size
                    || klen + HEADER_SIZE + 32 + nbytes + e->item_overhead > e->capacity)
                    return pos;
                if (exptime && exptime <= MAX_RELATIVE_EXPTIME)
                    exptime += e->now;
                e->deltas[C_CMD_SET]++;
                if (set_one(e, tok[1], klen, (unsigned long long)flags, (unsigned int)exptime,
                            buf + next, nbytes) < 0)
                    return -1;
                if (!(flagbits & FLAG('q'))) {
                    if (out_put(out, "HD", 2) < 0)
                        return -1;
                    for (int i = 3; i < ntok; i++) {
                        char c = tok[i][0];
                        if ((c == 'O' || c == 'k') && meta_echo(tok, tlen, i, i + 1, tok[1], klen,
                                                                out) < 0)
                            return -1;
                        if (c == 'c' && out_u64(out, 'c', e->cas) < 0)
                            return -1;
                    }
                    if (out_put(out, "\r\n", 2) < 0)
                        return -1;
                }
                pos = data_end + 2;
                continue;
            }
        }
        return pos;
    }
    return pos;
}

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

/* Call one of the Python server's methods with the engine's state handed over first. The
 * arguments end at the first NULL (methods here take two to four). */
static int call_python(Engine *e, PyObject *obj, PyObject *name, PyObject *a, PyObject *b,
                       PyObject *c, PyObject *d) {
    if (sync_out(e) < 0)
        return -1;
    PyObject *r = PyObject_CallMethodObjArgs(obj, name, a, b, c, d, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return sync_in(e);
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

static PyObject *Engine_serve_tcp(Engine *e, PyObject *Py_UNUSED(ignored)) {
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

static PyObject *Engine_attach_tcp(Engine *e, PyObject *args) {
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

/* -- UDP ------------------------------------------------------------------------------------ */

typedef struct SendQueue {
    struct mmsghdr msgs[UDP_VLEN];
    struct iovec iov[UDP_VLEN];
    struct sockaddr_storage addrs[UDP_VLEN];
    char data[UDP_VLEN][UDP_HEADER + UDP_MAX_PAYLOAD];
    int count;
} SendQueue;

static PyObject *address_tuple(const struct sockaddr_storage *addr) {
    char host[INET6_ADDRSTRLEN];
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(sHkk)", host, ntohs(a->sin6_port),
                             (unsigned long)ntohl(a->sin6_flowinfo),
                             (unsigned long)a->sin6_scope_id);
    }
    const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return Py_BuildValue("(sH)", host, ntohs(a->sin_port));
}

static void flush_sends(Engine *e, SendQueue *q) {
    int i = 0;
    while (i < q->count) {
        int sent = sendmmsg(e->udp_fd, q->msgs + i, q->count - i, 0);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            /* A full buffer or an unreachable client: this datagram is dropped, as UDP may. */
            e->deltas[C_UDP_SEND_ERRORS]++;
            i++;
            continue;
        }
        for (int j = i; j < i + sent; j++)
            e->deltas[C_BYTES_WRITTEN] += q->iov[j].iov_len;
        e->deltas[C_UDP_SENT] += sent;
        i += sent;
    }
    q->count = 0;
}

/* One datagram: network/udp.py's datagram_received, with the fast path in the middle. */
static int serve_datagram(Engine *e, SendQueue *q, const unsigned char *d, Py_ssize_t len,
                          const struct sockaddr_storage *addr, socklen_t addrlen) {
    e->deltas[C_UDP_RECEIVED]++;
    e->deltas[C_BYTES_READ] += len;
    if (len < UDP_HEADER) {
        e->deltas[C_UDP_MALFORMED]++;
        return 0;
    }
    unsigned int request_id = (d[0] << 8) | d[1], seq = (d[2] << 8) | d[3];
    unsigned int count = (d[4] << 8) | d[5];
    if (count == 0 || seq >= count) {
        e->deltas[C_UDP_MALFORMED]++;
        return 0;
    }
    if (count != 1) {
        e->deltas[C_UDP_MULTIDATAGRAM]++;
        return 0;
    }
    OutBuf *out = &e->out;
    out->len = 0;
    const char *payload = (const char *)d + UDP_HEADER;
    Py_ssize_t plen = len - UDP_HEADER;
    Py_ssize_t done = run_requests(e, payload, plen, out);
    if (done < 0)
        return -1;
    if (done == plen && out->len == 0)
        return 0;
    if (done == plen && out->len <= UDP_MAX_PAYLOAD) {
        if (q->count == UDP_VLEN)
            flush_sends(e, q);
        int i = q->count++;
        unsigned char *h = (unsigned char *)q->data[i];
        h[0] = (unsigned char)(request_id >> 8);
        h[1] = (unsigned char)request_id;
        memset(h + 2, 0, 6);
        h[5] = 1; /* datagram 0 of 1 */
        memcpy(h + UDP_HEADER, out->data, out->len);
        memcpy(&q->addrs[i], addr, addrlen);
        q->iov[i].iov_base = h;
        q->iov[i].iov_len = UDP_HEADER + out->len;
        memset(&q->msgs[i].msg_hdr, 0, sizeof q->msgs[i].msg_hdr);
        q->msgs[i].msg_hdr.msg_name = &q->addrs[i];
        q->msgs[i].msg_hdr.msg_namelen = addrlen;
        q->msgs[i].msg_hdr.msg_iov = &q->iov[i];
        q->msgs[i].msg_hdr.msg_iovlen = 1;
        return 0;
    }
    /* The rest of the datagram, or a reply that needs several datagrams: the Python server
     * (replies stay in order: what is queued goes first). */
    flush_sends(e, q);
    PyObject *rid = PyLong_FromUnsignedLong(request_id);
    PyObject *head = rid ? PyBytes_FromStringAndSize(out->data, out->len) : NULL;
    PyObject *rest = head ? PyBytes_FromStringAndSize(payload + done, plen - done) : NULL;
    PyObject *who = rest ? address_tuple(addr) : NULL;
    int rc = who ? call_python(e, e->udp, s_answer, rid, head, rest, who) : -1;
    Py_XDECREF(rid);
    Py_XDECREF(head);
    Py_XDECREF(rest);
    Py_XDECREF(who);
    return rc;
}

/* Receive-side buffers for recvmmsg, allocated when UDP is attached. */
typedef struct RecvBatch {
    struct mmsghdr msgs[UDP_VLEN];
    struct iovec iov[UDP_VLEN];
    struct sockaddr_storage addrs[UDP_VLEN];
    char space[UDP_VLEN][UDP_READ_SIZE]; /* only the pages datagrams touch become resident */
} RecvBatch;

static PyObject *Engine_serve_udp(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->udp == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "attach_udp was not called");
        return NULL;
    }
    if (sync_in(e) < 0)
        return NULL;
    struct RecvBatch *r = e->recv_batch;
    struct SendQueue *q = e->send_queue;
    q->count = 0;
    int rc = 0, handled = 0;
    while (rc == 0 && handled < UDP_BATCH) {
        for (int i = 0; i < UDP_VLEN; i++) {
            r->iov[i].iov_base = r->space[i];
            r->iov[i].iov_len = UDP_READ_SIZE;
            memset(&r->msgs[i].msg_hdr, 0, sizeof r->msgs[i].msg_hdr);
            r->msgs[i].msg_hdr.msg_name = &r->addrs[i];
            r->msgs[i].msg_hdr.msg_namelen = sizeof r->addrs[i];
            r->msgs[i].msg_hdr.msg_iov = &r->iov[i];
            r->msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(e->udp_fd, r->msgs, UDP_VLEN, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            handled++; /* EINTR, or an ICMP error for an earlier reply: nothing to do */
            continue;
        }
        for (int i = 0; i < n && rc == 0; i++)
            rc = serve_datagram(e, q, (const unsigned char *)r->space[i], r->msgs[i].msg_len,
                                &r->addrs[i], r->msgs[i].msg_hdr.msg_namelen);
        flush_sends(e, q);
        handled += n;
        if (n < UDP_VLEN)
            break;
    }
    flush_sends(e, q);
    if (sync_out(e) < 0 || rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_attach_udp(Engine *e, PyObject *args) {
    int fd;
    PyObject *udp;
    if (!PyArg_ParseTuple(args, "iO", &fd, &udp))
        return NULL;
    if (e->recv_batch == NULL) {
        e->recv_batch = PyMem_Malloc(sizeof(RecvBatch));
        e->send_queue = PyMem_Malloc(sizeof(SendQueue));
        if (e->recv_batch == NULL || e->send_queue == NULL)
            return PyErr_NoMemory();
    }
    e->udp_fd = fd;
    Py_INCREF(udp);
    Py_XSETREF(e->udp, udp);
    Py_RETURN_NONE;
}

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
    PyModuleDef_HEAD_INIT, "_fastpath", "The compiled fast path (see _fastpath.c).", -1, NULL,
    NULL, NULL, NULL, NULL,
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
