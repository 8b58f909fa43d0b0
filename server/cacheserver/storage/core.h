/* The store core: the one definition of the item layout, the LRU, the accounting, expiry
 * and eviction. core.c has the rules; _core.c makes them the Core type of the module
 * cacheserver.storage._core, which the Python Store (storage/store.py) subclasses; the
 * compiled fast path compiles core.c in as well and calls it on the Store it serves -- no
 * Python call, no copy of its state.
 *
 * This header is the contract with both users. The struct fields are public to C code that
 * holds a CoreObject, to read; they change only through the functions.
 */
#ifndef CACHESERVER_STORAGE_CORE_H
#define CACHESERVER_STORAGE_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* -- the item layout -------------------------------------------------------------------------
 * An item is one bytes object: a header (cas:u64, exptime:u32, flags:u32, bumped:u32, meta:u8,
 * marks:u8, little-endian), the reply suffix " <flags> <bytes>\r\n", the data, "\r\n". meta
 * holds the data's offset (low 7 bits) and the fetched bit; bumped is when the item was stored
 * or a hit last moved it to the LRU's recent end. storage/item.py documents it for Python and
 * takes every number below from the module. */
#define HEADER_SIZE 22
#define CAS_AT 0
#define EXPTIME_AT 8
#define FLAGS_AT 12
#define BUMPED_AT 16
#define META_AT 20
#define MARKS_AT 21
#define FETCHED 0x80
#define OFFSET_MASK 0x7F
/* Two bytes objects' headers (33 each), their average allocator rounding (8 each) and one
 * dict slot at the dict's usual fill: what a stored key costs besides its bytes. */
#define ITEM_OVERHEAD (33 * 2 + 8 * 2 + 48)
/* A hit moves an item to the LRU's recent end at most once per this many seconds
 * (memcached's ITEM_UPDATE_INTERVAL). */
#define BUMP_INTERVAL 60
/* memcached's item header (48) + CAS (8) + the key's NUL: -I applied the way it does. */
#define MEMCACHED_ITEM_OVERHEAD (48 + 8 + 1)
/* Bumped when anything in this header changes: a fast path built against another version
 * than the module's refuses to load. */
#define CORE_VERSION 1

static inline unsigned int item_u32(const unsigned char *raw, int at) {
    return (unsigned int)raw[at] | ((unsigned int)raw[at + 1] << 8)
        | ((unsigned int)raw[at + 2] << 16) | ((unsigned int)raw[at + 3] << 24);
}

/* Decimal digits of v at p (an item's suffix; the fast path's replies too); returns the end. */
static inline char *put_decimal(char *p, unsigned long long v) {
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

static inline unsigned long long item_cas(const unsigned char *raw) {
    unsigned long long cas = 0;
    for (int i = 7; i >= 0; i--)
        cas = (cas << 8) | raw[CAS_AT + i];
    return cas;
}

static inline Py_ssize_t item_data_at(const unsigned char *raw) {
    return raw[META_AT] & OFFSET_MASK;
}

/* -- the objects ------------------------------------------------------------------------------ */

/* The store's counters (storage.StoreStats): plain integers that stats and the metrics read. */
#define STORE_COUNTERS(X)                                                                      \
    X(total_items, "items ever stored")                                                        \
    X(evictions, "valid items evicted to stay under capacity")                                 \
    X(evictions_shrinker, "valid items evicted because the memory shrinker asked")             \
    X(evicted_unfetched, "evicted items that were never fetched")                              \
    X(expired_unfetched, "expired items that were never fetched")                              \
    X(reclaimed, "expired items whose memory was taken back (lazily or by the crawler)")       \
    X(get_expired, "gets that found their item expired")                                       \
    X(get_flushed, "gets that found their item flushed")                                       \
    X(crawler_items_checked, "items the background crawler looked at")                         \
    X(bytes_released_shrinker, "bytes the shrinker's evictions released")

typedef struct {
    PyObject_HEAD
#define COUNTER_FIELD(name, doc) long long name;
    STORE_COUNTERS(COUNTER_FIELD)
#undef COUNTER_FIELD
} StoreStatsObject;

typedef struct {
    PyObject_HEAD
    PyObject *items;        /* dict: key -> item bytes, least recently used first */
    PyObject *clock;        /* () -> seconds since the epoch (time.time unless a test's) */
    StoreStatsObject *stats;
    PyObject *crawl;        /* the keys the expiry crawler has left to check (a list) */
    long long bytes_used;   /* keys and items as allocated, plus ITEM_OVERHEAD each */
    long long capacity;     /* bytes_used is kept at or under this */
    long long max_item_size; /* -I */
    long long flush_at;     /* when a delayed flush_all takes effect, 0 if none */
    unsigned long long last_cas; /* the CAS value handed out last */
} CoreObject;

/* -- the rules (core.c) ------------------------------------------------------------------------
 * Each returning int gives -1 with a Python error set on failure. */

/* int(clock()): exptimes are whole seconds, so t <= now iff t <= floor(now). */
int core_now(CoreObject *c, long long *now);
/* The live item for key at now (a new reference), or NULL: a miss, or an error when
 * PyErr_Occurred(). An expired item is dropped and counted; a pending flush_all whose time
 * has come is done first. Not a hit: the LRU is not touched. */
static inline PyObject *core_lookup(CoreObject *c, PyObject *key, long long now);
/* Count a hit on key's live item: fetched, and moved to the LRU's recent end at most once
 * per BUMP_INTERVAL. Steals item; returns the item as stored now (a new reference). */
static inline PyObject *core_hit(CoreObject *c, PyObject *key, PyObject *item, long long now);
/* Whether memcached with the same -I refuses an item of these sizes. */
int core_too_large(CoreObject *c, Py_ssize_t klen, unsigned long long flags, Py_ssize_t nbytes);
/* Whether an item of these sizes is stored at all: not too large, and smaller than the whole
 * capacity. */
int core_fits(CoreObject *c, Py_ssize_t klen, unsigned long long flags, Py_ssize_t nbytes);
/* A new item (core.h's layout) stored at now; data is the value without its CRLF. */
PyObject *core_item_new(unsigned long long cas, unsigned int exptime, unsigned int flags,
                        const char *data, Py_ssize_t nbytes, int fetched, long long now,
                        int marks);
/* Store item under key at the LRU's recent end, evicting from the other end when over
 * capacity: 0 stored, 1 bigger than all the memory (not stored). */
int core_store(CoreObject *c, PyObject *key, PyObject *item);
/* set: a new item under the next CAS value, stored. The caller checked core_fits. */
int core_set(CoreObject *c, const char *key, Py_ssize_t klen, unsigned int flags,
             unsigned int exptime, const char *data, Py_ssize_t nbytes, long long now);
/* Evict from the LRU end until bytes_used <= target, never keep (NULL: none); the bytes
 * released, or -1. */
long long core_evict_to(CoreObject *c, long long target, int by_shrinker, PyObject *keep);
/* An item's cost in bytes_used; whether it has expired at now. */
long long core_cost(PyObject *key, PyObject *item);
/* Take key's item out (its cost too); the same, counted as an expired item reclaimed. */
int core_unlink(CoreObject *c, PyObject *key, PyObject *item);
int core_drop_expired(CoreObject *c, PyObject *key, PyObject *item);
/* flush_all now; a delayed one whose time has come. */
void core_flush(CoreObject *c);

/* The small rules on every request's path are here, inline, for both users: expiry, a due
 * flush_all, the lookup, the hit (its rare branches are core.c's). */

/* Whether an item has expired at now (exptime 0: never). */
static inline int core_expired(PyObject *item, long long now) {
    unsigned int exptime = item_u32((const unsigned char *)PyBytes_AS_STRING(item), EXPTIME_AT);
    return exptime != 0 && (long long)exptime <= now;
}

/* A delayed flush_all whose time has come. */
static inline void core_apply_pending_flush(CoreObject *c, long long now) {
    if (c->flush_at && now >= c->flush_at)
        core_flush(c);
}

/* core_lookup's expired branch (core.c): the item dropped and counted. */
__attribute__((cold)) PyObject *core_lookup_expired(CoreObject *c, PyObject *key, PyObject *item);

/* core_hit's move (core.c): the item rewritten with the time and the fetched bit, at the
 * LRU's recent end. */
PyObject *core_hit_move(CoreObject *c, PyObject *key, PyObject *item, long long now);

static inline PyObject *core_hit(CoreObject *c, PyObject *key, PyObject *item, long long now) {
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    if ((raw[META_AT] & FETCHED) && now - (long long)item_u32(raw, BUMPED_AT) < BUMP_INTERVAL)
        return item;
    return core_hit_move(c, key, item, now);
}

static inline PyObject *core_lookup(CoreObject *c, PyObject *key, long long now) {
    core_apply_pending_flush(c, now);
    PyObject *item = PyDict_GetItemWithError(c->items, key);
    if (item == NULL)
        return NULL;
    if (core_expired(item, now))
        return core_lookup_expired(c, key, item);
    return Py_NewRef(item);
}


#endif
