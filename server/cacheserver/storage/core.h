/* The store core (storage/_core.c): the one definition of the item layout, the LRU, the
 * accounting, expiry and eviction. The Python Store (storage/store.py) is a subclass of its
 * type; the compiled fast path reaches it through the table of functions below, which the
 * module publishes as a capsule (CORE_CAPSULE) -- no Python call, no copy of its state.
 *
 * Everything here is this header's contract with its two users; the struct fields are
 * public to C code that holds a CoreObject and read-only to it except through the functions.
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
/* Bumped when anything above, or CoreObject, or CoreAPI changes: a fast path built against
 * another version refuses to load. */
#define CORE_VERSION 1

static inline unsigned int item_u32(const unsigned char *raw, int at) {
    return (unsigned int)raw[at] | ((unsigned int)raw[at + 1] << 8)
        | ((unsigned int)raw[at + 2] << 16) | ((unsigned int)raw[at + 3] << 24);
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

/* What the fast path calls. Each returning int gives -1 with a Python error set on failure. */
typedef struct {
    int version;            /* CORE_VERSION */
    PyTypeObject *type;     /* the core's type: a Store is an instance of a subclass */
    /* int(clock()) */
    int (*now)(CoreObject *c, long long *now);
    /* The live item for key at now (a new reference), or NULL: a miss, or an error when
     * PyErr_Occurred(). An expired item is dropped and counted; a pending flush_all whose
     * time has come is done first. Not a hit: the LRU is not touched. */
    PyObject *(*lookup)(CoreObject *c, PyObject *key, long long now);
    /* Count a hit on key's live item: fetched, and moved to the LRU's recent end at most once
     * per BUMP_INTERVAL. Steals item; returns the item as stored now (a new reference). */
    PyObject *(*hit)(CoreObject *c, PyObject *key, PyObject *item, long long now);
    /* Whether an item of this size is stored at all: not too large for -I, and smaller than
     * the whole capacity. */
    int (*fits)(CoreObject *c, Py_ssize_t klen, unsigned long long flags, Py_ssize_t nbytes);
    /* set: a new item under the next CAS value, stored at the LRU's recent end, evicting from
     * the other end when over capacity. The caller checked fits(). */
    int (*set)(CoreObject *c, const char *key, Py_ssize_t klen, unsigned int flags,
               unsigned int exptime, const char *data, Py_ssize_t nbytes, long long now);
} CoreAPI;

#define CORE_CAPSULE "cacheserver.storage._core.API"

#endif
