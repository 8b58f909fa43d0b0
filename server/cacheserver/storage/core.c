/* The store core's rules: items, the LRU, accounting, expiry and eviction, defined once.
 *
 * One core per worker (shard-per-core), so nothing here takes a lock. The items are a dict
 * of key -> item bytes (core.h has the layout) whose insertion order is the LRU order: a hit
 * re-inserts the key at the end, eviction takes keys from the front. As in memcached, a hit
 * moves an item at most once per BUMP_INTERVAL, and eviction goes to a little under capacity
 * (1/64 of it) so that the next stores do not each pay for a scan past the dict's deleted
 * front slots.
 *
 * This file is compiled into both users (setup.py): the store core's module (_core.c, the
 * Core type that storage/store.py's Store subclasses) and the compiled fast path, which
 * calls these functions directly on the Store it serves -- one definition, no Python call in
 * between, inlined there by link-time optimisation.
 */
#include "core.h"

static void put_u32(unsigned char *p, unsigned long long v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* An item stored at now; data is the value without its trailing CRLF. */
PyObject *core_item_new(unsigned long long cas, unsigned int exptime, unsigned int flags,
                          const char *data, Py_ssize_t nbytes, int fetched, long long now,
                          int marks) {
    char suffix[32]; /* " <flags> <bytes>\r\n": at most 1 + 10 + 1 + 19 + 2 bytes */
    char *s = suffix;
    *s++ = ' ';
    s = put_decimal(s, flags);
    *s++ = ' ';
    s = put_decimal(s, (unsigned long long)nbytes);
    *s++ = '\r';
    *s++ = '\n';
    Py_ssize_t slen = s - suffix;
    PyObject *item = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + slen + nbytes + 2);
    if (item == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(item);
    for (int i = 0; i < 8; i++)
        p[CAS_AT + i] = (unsigned char)(cas >> (8 * i));
    put_u32(p + EXPTIME_AT, exptime);
    put_u32(p + FLAGS_AT, flags);
    put_u32(p + BUMPED_AT, (unsigned long long)now);
    p[META_AT] = (unsigned char)((HEADER_SIZE + slen) | (fetched ? FETCHED : 0));
    p[MARKS_AT] = (unsigned char)marks;
    memcpy(p + HEADER_SIZE, suffix, slen);
    memcpy(p + HEADER_SIZE + slen, data, nbytes);
    memcpy(p + HEADER_SIZE + slen + nbytes, "\r\n", 2);
    return item;
}

long long core_cost(PyObject *key, PyObject *item) {
    return PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(item) + ITEM_OVERHEAD;
}

static int fetched(PyObject *item) {
    return ((const unsigned char *)PyBytes_AS_STRING(item))[META_AT] & FETCHED;
}

int core_now(CoreObject *c, long long *now) {
    PyObject *v = PyObject_CallNoArgs(c->clock);
    if (v == NULL)
        return -1;
    double seconds = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (seconds == -1.0 && PyErr_Occurred())
        return -1;
    *now = (long long)seconds; /* exptimes are whole seconds: t <= now iff t <= floor(now) */
    return 0;
}

/* Take key's item out of the dict and its cost out of bytes_used. */
int core_unlink(CoreObject *c, PyObject *key, PyObject *item) {
    c->bytes_used -= core_cost(key, item);
    return PyDict_DelItem(c->items, key);
}

int core_drop_expired(CoreObject *c, PyObject *key, PyObject *item) {
    int was_fetched = fetched(item);
    if (core_unlink(c, key, item) < 0)
        return -1;
    c->stats->reclaimed++;
    if (!was_fetched)
        c->stats->expired_unfetched++;
    return 0;
}

void core_flush(CoreObject *c) {
    c->flush_at = 0;
    PyDict_Clear(c->items);
    c->bytes_used = 0;
    Py_CLEAR(c->crawl);
}

/* core_lookup's rare branches, out of line (core.h has the rest). */

PyObject *core_lookup_expired(CoreObject *c, PyObject *key, PyObject *item) {
    Py_INCREF(item);
    int rc = core_drop_expired(c, key, item);
    Py_DECREF(item);
    if (rc == 0)
        c->stats->get_expired++;
    return NULL;
}

PyObject *core_hit_move(CoreObject *c, PyObject *key, PyObject *item, long long now) {
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    PyObject *bumped = PyBytes_FromStringAndSize((const char *)raw, PyBytes_GET_SIZE(item));
    Py_DECREF(item);
    if (bumped == NULL)
        return NULL;
    unsigned char *b = (unsigned char *)PyBytes_AS_STRING(bumped);
    put_u32(b + BUMPED_AT, (unsigned long long)now);
    b[META_AT] |= FETCHED;
    if (PyDict_DelItem(c->items, key) < 0 || PyDict_SetItem(c->items, key, bumped) < 0) {
        Py_DECREF(bumped);
        return NULL;
    }
    return bumped;
}

/* Evict from the LRU end until bytes_used <= target, never keep; the bytes released. */
long long core_evict_to(CoreObject *c, long long target, int by_shrinker, PyObject *keep) {
    long long now;
    if (core_now(c, &now) < 0)
        return -1;
    long long excess = c->bytes_used - target;
    PyObject *victims = PyList_New(0);
    if (victims == NULL)
        return -1;
    Py_ssize_t pos = 0;
    PyObject *key, *item;
    while (excess > 0 && PyDict_Next(c->items, &pos, &key, &item)) {
        if (keep != NULL && PyBytes_GET_SIZE(key) == PyBytes_GET_SIZE(keep)
            && memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(keep), PyBytes_GET_SIZE(key)) == 0)
            continue;
        if (PyList_Append(victims, key) < 0) {
            Py_DECREF(victims);
            return -1;
        }
        excess -= core_cost(key, item);
    }
    long long released = 0;
    StoreStatsObject *s = c->stats;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(victims); i++) {
        key = PyList_GET_ITEM(victims, i);
        item = PyDict_GetItemWithError(c->items, key);
        if (item == NULL)
            continue;
        Py_INCREF(item);
        long long cost = core_cost(key, item);
        int rc = core_unlink(c, key, item);
        int was_expired = core_expired(item, now), was_fetched = fetched(item);
        Py_DECREF(item);
        if (rc < 0) {
            Py_DECREF(victims);
            return -1;
        }
        released += cost;
        if (was_expired) {
            s->reclaimed++;
            if (!was_fetched)
                s->expired_unfetched++;
            continue;
        }
        if (by_shrinker)
            s->evictions_shrinker++;
        else
            s->evictions++;
        if (!was_fetched)
            s->evicted_unfetched++;
    }
    Py_DECREF(victims);
    return released;
}

/* Store item under key at the LRU's recent end: 0 stored, 1 bigger than all the memory. */
int core_store(CoreObject *c, PyObject *key, PyObject *item) {
    long long cost = core_cost(key, item);
    if (cost > c->capacity)
        return 1;
    PyObject *old = PyDict_GetItemWithError(c->items, key);
    if (old == NULL && PyErr_Occurred())
        return -1;
    if (old != NULL) {
        cost -= core_cost(key, old);
        if (PyDict_DelItem(c->items, key) < 0)
            return -1;
    }
    if (PyDict_SetItem(c->items, key, item) < 0)
        return -1;
    c->bytes_used += cost;
    c->stats->total_items++;
    if (c->bytes_used > c->capacity
        && core_evict_to(c, c->capacity - (c->capacity >> 6), 0, key) < 0)
        return -1;
    return 0;
}

int core_too_large(CoreObject *c, Py_ssize_t klen, unsigned long long flags,
                     Py_ssize_t nbytes) {
    return MEMCACHED_ITEM_OVERHEAD + klen + (flags ? 4 : 0) + nbytes + 2 > c->max_item_size;
}

int core_fits(CoreObject *c, Py_ssize_t klen, unsigned long long flags, Py_ssize_t nbytes) {
    /* 32: the longest suffix an item of these sizes has. */
    return !core_too_large(c, klen, flags, nbytes)
        && klen + HEADER_SIZE + 32 + nbytes + 2 + ITEM_OVERHEAD <= c->capacity;
}

int core_set(CoreObject *c, const char *k, Py_ssize_t klen, unsigned int flags,
                   unsigned int exptime, const char *data, Py_ssize_t nbytes, long long now) {
    PyObject *key = PyBytes_FromStringAndSize(k, klen);
    if (key == NULL)
        return -1;
    PyObject *item = core_item_new(++c->last_cas, exptime, flags, data, nbytes, 0, now, 0);
    int rc = item == NULL ? -1 : core_store(c, key, item);
    Py_XDECREF(item);
    Py_DECREF(key);
    return rc < 0 ? -1 : 0;
}

