/* The store core: items, the LRU, accounting, expiry and eviction, defined once.
 *
 * One Core per worker (shard-per-core), so nothing here takes a lock. The items are a dict
 * of key -> item bytes (core.h has the layout) whose insertion order is the LRU order: a hit
 * re-inserts the key at the end, eviction takes keys from the front. As in memcached, a hit
 * moves an item at most once per BUMP_INTERVAL, and eviction goes to a little under capacity
 * (1/64 of it) so that the next stores do not each pay for a scan past the dict's deleted
 * front slots.
 *
 * Two users, the same functions: storage/store.py's Store subclasses the Core type (the
 * commands on top -- add, cas, append, incr and the rest -- are Python), and the compiled fast
 * path calls the CoreAPI table (core.h) it finds in this module's capsule.
 */
#include "core.h"

#include <structmember.h>

static PyTypeObject CoreType, StoreStatsType;

/* -- items ------------------------------------------------------------------------------------ */

static void put_u32(unsigned char *p, unsigned long long v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static char *put_dec(char *p, unsigned long long v) {
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

/* An item stored at now; data is the value without its trailing CRLF. */
static PyObject *item_new(unsigned long long cas, unsigned int exptime, unsigned int flags,
                          const char *data, Py_ssize_t nbytes, int fetched, long long now,
                          int marks) {
    char suffix[32]; /* " <flags> <bytes>\r\n": at most 1 + 10 + 1 + 19 + 2 bytes */
    char *s = suffix;
    *s++ = ' ';
    s = put_dec(s, flags);
    *s++ = ' ';
    s = put_dec(s, (unsigned long long)nbytes);
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

static long long cost_of(PyObject *key, PyObject *item) {
    return PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(item) + ITEM_OVERHEAD;
}

static int expired(PyObject *item, long long now) {
    unsigned int exptime = item_u32((const unsigned char *)PyBytes_AS_STRING(item), EXPTIME_AT);
    return exptime != 0 && (long long)exptime <= now;
}

static int fetched(PyObject *item) {
    return ((const unsigned char *)PyBytes_AS_STRING(item))[META_AT] & FETCHED;
}

/* -- the core's rules --------------------------------------------------------------------------- */

static int ready(CoreObject *c) {
    if (c->items != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "the store core was not initialised (Core.__init__)");
    return -1;
}

static int core_now(CoreObject *c, long long *now) {
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
static int unlink_item(CoreObject *c, PyObject *key, PyObject *item) {
    c->bytes_used -= cost_of(key, item);
    return PyDict_DelItem(c->items, key);
}

static int drop_expired(CoreObject *c, PyObject *key, PyObject *item) {
    int was_fetched = fetched(item);
    if (unlink_item(c, key, item) < 0)
        return -1;
    c->stats->reclaimed++;
    if (!was_fetched)
        c->stats->expired_unfetched++;
    return 0;
}

static int flush_now(CoreObject *c) {
    c->flush_at = 0;
    PyDict_Clear(c->items);
    c->bytes_used = 0;
    Py_CLEAR(c->crawl);
    return 0;
}

static void apply_pending_flush(CoreObject *c, long long now) {
    if (c->flush_at && now >= c->flush_at)
        flush_now(c);
}

static PyObject *lookup(CoreObject *c, PyObject *key, long long now) {
    apply_pending_flush(c, now);
    PyObject *item = PyDict_GetItemWithError(c->items, key);
    if (item == NULL)
        return NULL;
    if (expired(item, now)) {
        Py_INCREF(item);
        int rc = drop_expired(c, key, item);
        Py_DECREF(item);
        if (rc == 0)
            c->stats->get_expired++;
        return NULL;
    }
    return Py_NewRef(item);
}

static PyObject *hit(CoreObject *c, PyObject *key, PyObject *item, long long now) {
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    if ((raw[META_AT] & FETCHED) && now - (long long)item_u32(raw, BUMPED_AT) < BUMP_INTERVAL)
        return item;
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
static long long evict_to(CoreObject *c, long long target, int by_shrinker, PyObject *keep) {
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
        excess -= cost_of(key, item);
    }
    long long released = 0;
    StoreStatsObject *s = c->stats;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(victims); i++) {
        key = PyList_GET_ITEM(victims, i);
        item = PyDict_GetItemWithError(c->items, key);
        if (item == NULL)
            continue;
        Py_INCREF(item);
        long long cost = cost_of(key, item);
        int rc = unlink_item(c, key, item);
        int was_expired = expired(item, now), was_fetched = fetched(item);
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
static int store_item(CoreObject *c, PyObject *key, PyObject *item) {
    long long cost = cost_of(key, item);
    if (cost > c->capacity)
        return 1;
    PyObject *old = PyDict_GetItemWithError(c->items, key);
    if (old == NULL && PyErr_Occurred())
        return -1;
    if (old != NULL) {
        cost -= cost_of(key, old);
        if (PyDict_DelItem(c->items, key) < 0)
            return -1;
    }
    if (PyDict_SetItem(c->items, key, item) < 0)
        return -1;
    c->bytes_used += cost;
    c->stats->total_items++;
    if (c->bytes_used > c->capacity
        && evict_to(c, c->capacity - (c->capacity >> 6), 0, key) < 0)
        return -1;
    return 0;
}

static int too_large(CoreObject *c, Py_ssize_t klen, unsigned long long flags,
                     Py_ssize_t nbytes) {
    return MEMCACHED_ITEM_OVERHEAD + klen + (flags ? 4 : 0) + nbytes + 2 > c->max_item_size;
}

static int fits(CoreObject *c, Py_ssize_t klen, unsigned long long flags, Py_ssize_t nbytes) {
    /* 32: the longest suffix an item of these sizes has. */
    return !too_large(c, klen, flags, nbytes)
        && klen + HEADER_SIZE + 32 + nbytes + 2 + ITEM_OVERHEAD <= c->capacity;
}

static int set_one(CoreObject *c, const char *k, Py_ssize_t klen, unsigned int flags,
                   unsigned int exptime, const char *data, Py_ssize_t nbytes, long long now) {
    PyObject *key = PyBytes_FromStringAndSize(k, klen);
    if (key == NULL)
        return -1;
    PyObject *item = item_new(++c->last_cas, exptime, flags, data, nbytes, 0, now, 0);
    int rc = item == NULL ? -1 : store_item(c, key, item);
    Py_XDECREF(item);
    Py_DECREF(key);
    return rc < 0 ? -1 : 0;
}

static CoreAPI api = {CORE_VERSION, &CoreType, core_now, lookup, hit, fits, set_one};

/* -- the Python methods -------------------------------------------------------------------------- */

#define NEED_READY(c)                                                                          \
    if (ready(c) < 0)                                                                          \
        return NULL;

static int need_bytes(PyObject *v, const char *what) {
    if (PyBytes_Check(v))
        return 0;
    PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what, Py_TYPE(v)->tp_name);
    return -1;
}

static PyObject *or_none(PyObject *item) {
    if (item == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return item;
}

static PyObject *Core_now(CoreObject *c, PyObject *unused) {
    long long now;
    return core_now(c, &now) < 0 ? NULL : PyLong_FromLongLong(now);
}

static PyObject *Core_get(CoreObject *c, PyObject *key) {
    NEED_READY(c);
    long long now;
    if (need_bytes(key, "key") < 0 || core_now(c, &now) < 0)
        return NULL;
    PyObject *item = lookup(c, key, now);
    return or_none(item == NULL ? NULL : hit(c, key, item, now));
}

static PyObject *Core_peek(CoreObject *c, PyObject *key) {
    NEED_READY(c);
    long long now;
    if (need_bytes(key, "key") < 0 || core_now(c, &now) < 0)
        return NULL;
    return or_none(lookup(c, key, now));
}

static PyObject *Core_live(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    NEED_READY(c);
    long long now;
    if (n != 2 || need_bytes(args[0], "key") < 0 || (now = PyLong_AsLongLong(args[1])) == -1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "_live(key, now)");
        return NULL;
    }
    return or_none(lookup(c, args[0], now));
}

static PyObject *Core_hit(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    NEED_READY(c);
    long long now;
    if (n != 2)
        return PyErr_Format(PyExc_TypeError, "_hit(key, item)");
    if (need_bytes(args[0], "key") < 0 || need_bytes(args[1], "item") < 0 || core_now(c, &now) < 0)
        return NULL;
    return hit(c, args[0], Py_NewRef(args[1]), now);
}

static PyObject *Core_store(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    NEED_READY(c);
    if (n != 2)
        return PyErr_Format(PyExc_TypeError, "_store(key, item)");
    if (need_bytes(args[0], "key") < 0 || need_bytes(args[1], "item") < 0)
        return NULL;
    int rc = store_item(c, args[0], args[1]);
    return rc < 0 ? NULL : PyBool_FromLong(rc == 0);
}

/* Replace key's item with new (accounting the difference): moved to the recent end with
 * move, else in place. */
static PyObject *replace(CoreObject *c, PyObject *const *args, Py_ssize_t n, int move) {
    NEED_READY(c);
    if (n != 2)
        return PyErr_Format(PyExc_TypeError, "expected (key, item)");
    PyObject *key = args[0], *item = args[1];
    if (need_bytes(key, "key") < 0 || need_bytes(item, "item") < 0)
        return NULL;
    PyObject *old = PyDict_GetItemWithError(c->items, key);
    if (old == NULL)
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_KeyError, "no item to replace");
    long long diff = cost_of(key, item) - cost_of(key, old);
    if ((move && PyDict_DelItem(c->items, key) < 0) || PyDict_SetItem(c->items, key, item) < 0)
        return NULL;
    c->bytes_used += diff;
    Py_RETURN_NONE;
}

static PyObject *Core_replace(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    return replace(c, args, n, 1);
}

static PyObject *Core_rewrite(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    return replace(c, args, n, 0);
}

static PyObject *Core_unlink(CoreObject *c, PyObject *key) {
    NEED_READY(c);
    PyObject *item = PyDict_GetItemWithError(c->items, key);
    if (item == NULL)
        return PyErr_Occurred() ? NULL : PyBool_FromLong(0);
    Py_INCREF(item);
    int rc = unlink_item(c, key, item);
    Py_DECREF(item);
    return rc < 0 ? NULL : PyBool_FromLong(1);
}

static PyObject *Core_make_room(CoreObject *c, PyObject *keep) {
    NEED_READY(c);
    if (need_bytes(keep, "keep") < 0 || evict_to(c, c->capacity - (c->capacity >> 6), 0, keep) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Core_evict_to(CoreObject *c, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"target", "by_shrinker", "keep", NULL};
    long long target;
    int by_shrinker;
    PyObject *keep = Py_None;
    NEED_READY(c);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Lp|O", kwlist, &target, &by_shrinker, &keep))
        return NULL;
    if (keep != Py_None && need_bytes(keep, "keep") < 0)
        return NULL;
    long long released = evict_to(c, target, by_shrinker, keep == Py_None ? NULL : keep);
    return released < 0 ? NULL : PyLong_FromLongLong(released);
}

static PyObject *Core_flush(CoreObject *c, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"at", NULL};
    long long at = 0, now;
    NEED_READY(c);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|L", kwlist, &at) || core_now(c, &now) < 0)
        return NULL;
    if (at && at > now)
        c->flush_at = at;
    else
        flush_now(c);
    Py_RETURN_NONE;
}

static PyObject *Core_apply_pending_flush(CoreObject *c, PyObject *unused) {
    long long now;
    NEED_READY(c);
    if (core_now(c, &now) < 0)
        return NULL;
    apply_pending_flush(c, now);
    Py_RETURN_NONE;
}

static PyObject *Core_drain(CoreObject *c, PyObject *unused) {
    NEED_READY(c);
    PyObject *keys = PyDict_Keys(c->items);
    PyObject *values = keys ? PyDict_Values(c->items) : NULL;
    if (values == NULL) {
        Py_XDECREF(keys);
        return NULL;
    }
    PyDict_Clear(c->items);
    c->bytes_used = 0;
    Py_CLEAR(c->crawl);
    PyObject *r = PyTuple_Pack(2, keys, values);
    Py_DECREF(keys);
    Py_DECREF(values);
    return r;
}

static PyObject *Core_reclaim_expired(CoreObject *c, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"budget", NULL};
    Py_ssize_t budget = 10000;
    long long now;
    NEED_READY(c);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &budget) || core_now(c, &now) < 0)
        return NULL;
    apply_pending_flush(c, now);
    if (c->crawl == NULL || PyList_GET_SIZE(c->crawl) == 0) {
        if (PyDict_GET_SIZE(c->items) == 0)
            return PyLong_FromLong(0);
        Py_XSETREF(c->crawl, PyDict_Keys(c->items));
        if (c->crawl == NULL)
            return NULL;
    }
    /* A crawl walks a snapshot of the keys from its end, budget keys per step, so a large
     * cache never stalls the event loop; each key is looked up afresh. */
    Py_ssize_t size = PyList_GET_SIZE(c->crawl);
    Py_ssize_t from = budget < 0 ? size : (size > budget ? size - budget : 0);
    PyObject *step = PyList_GetSlice(c->crawl, from, size);
    if (step == NULL || PyList_SetSlice(c->crawl, from, size, NULL) < 0) {
        Py_XDECREF(step);
        return NULL;
    }
    long long reclaimed = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(step); i++) {
        PyObject *key = PyList_GET_ITEM(step, i);
        PyObject *item = PyDict_GetItemWithError(c->items, key);
        if (item == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        if (expired(item, now)) {
            Py_INCREF(item);
            int rc = drop_expired(c, key, item);
            Py_DECREF(item);
            if (rc < 0)
                goto fail;
            reclaimed++;
        }
    }
    c->stats->crawler_items_checked += PyList_GET_SIZE(step);
    Py_DECREF(step);
    return PyLong_FromLongLong(reclaimed);
fail:
    Py_DECREF(step);
    return NULL;
}

static PyObject *Core_restored(CoreObject *c, PyObject *args) {
    long long count, nbytes;
    NEED_READY(c);
    if (!PyArg_ParseTuple(args, "LL", &count, &nbytes))
        return NULL;
    c->bytes_used += nbytes + count * ITEM_OVERHEAD;
    Py_RETURN_NONE;
}

static PyObject *Core_next_cas(CoreObject *c, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(++c->last_cas);
}

static PyObject *Core_too_large(CoreObject *c, PyObject *args) {
    PyObject *key;
    unsigned long long flags;
    Py_ssize_t nbytes;
    if (!PyArg_ParseTuple(args, "OKn", &key, &flags, &nbytes) || need_bytes(key, "key") < 0)
        return NULL;
    return PyBool_FromLong(too_large(c, PyBytes_GET_SIZE(key), flags, nbytes));
}

static PyObject *Core_get_table(CoreObject *c, void *unused) {
    NEED_READY(c);
    return Py_NewRef(c->items);
}

static PyObject *Core_get_curr_items(CoreObject *c, void *unused) {
    NEED_READY(c);
    return PyLong_FromSsize_t(PyDict_GET_SIZE(c->items));
}

/* -- the types ------------------------------------------------------------------------------------ */

static int Core_init(CoreObject *c, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"capacity", "max_item_size", "clock", NULL};
    long long capacity, max_item_size = 1024 * 1024;
    PyObject *clock = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L|LO", kwlist, &capacity, &max_item_size,
                                     &clock))
        return -1;
    if (clock == Py_None) {
        PyObject *time = PyImport_ImportModule("time");
        clock = time ? PyObject_GetAttrString(time, "time") : NULL;
        Py_XDECREF(time);
        if (clock == NULL)
            return -1;
    } else {
        Py_INCREF(clock);
    }
    PyObject *items = PyDict_New();
    PyObject *stats = items ? PyObject_CallNoArgs((PyObject *)&StoreStatsType) : NULL;
    if (stats == NULL) {
        Py_XDECREF(items);
        Py_DECREF(clock);
        return -1;
    }
    Py_XSETREF(c->items, items);
    Py_XSETREF(c->clock, clock);
    Py_XSETREF(c->stats, (StoreStatsObject *)stats);
    Py_CLEAR(c->crawl);
    c->capacity = capacity;
    c->max_item_size = max_item_size;
    c->bytes_used = 0;
    c->flush_at = 0;
    c->last_cas = 0;
    return 0;
}

static int Core_traverse(CoreObject *c, visitproc visit, void *arg) {
    Py_VISIT(c->items);
    Py_VISIT(c->clock);
    Py_VISIT(c->stats);
    Py_VISIT(c->crawl);
    return 0;
}

static int Core_clear(CoreObject *c) {
    Py_CLEAR(c->items);
    Py_CLEAR(c->clock);
    Py_CLEAR(c->stats);
    Py_CLEAR(c->crawl);
    return 0;
}

static void Core_dealloc(CoreObject *c) {
    PyObject_GC_UnTrack(c);
    Core_clear(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

#define FAST (METH_FASTCALL)
static PyMethodDef Core_methods[] = {
    {"now", (PyCFunction)Core_now, METH_NOARGS, "int(clock()): whole seconds."},
    {"get", (PyCFunction)Core_get, METH_O,
     "get(key): the live item, or None. A hit marks it fetched and moves it to the LRU's "
     "recent end, unless a hit did that less than BUMP_INTERVAL ago."},
    {"peek", (PyCFunction)Core_peek, METH_O,
     "peek(key): the live item without counting a hit (memcached's DONT_UPDATE)."},
    {"_live", (PyCFunction)(void (*)(void))Core_live, FAST,
     "_live(key, now): peek at a given time."},
    {"_hit", (PyCFunction)(void (*)(void))Core_hit, FAST,
     "_hit(key, item): count a hit on key's live item, as get does; the item as stored."},
    {"_store", (PyCFunction)(void (*)(void))Core_store, FAST,
     "_store(key, item): store at the LRU's recent end, evicting when over capacity; False "
     "when the item is bigger than all the memory."},
    {"_replace", (PyCFunction)(void (*)(void))Core_replace, FAST,
     "_replace(key, item): a new item for a stored key, moved to the LRU's recent end."},
    {"_rewrite", (PyCFunction)(void (*)(void))Core_rewrite, FAST,
     "_rewrite(key, item): a new item for a stored key, in its LRU place."},
    {"_unlink", (PyCFunction)Core_unlink, METH_O, "_unlink(key): remove it; whether it was there."},
    {"make_room", (PyCFunction)Core_make_room, METH_O,
     "make_room(keep): evict from the LRU end to a little under capacity, never keep."},
    {"_evict_to", (PyCFunction)(void (*)(void))Core_evict_to, METH_VARARGS | METH_KEYWORDS,
     "_evict_to(target, by_shrinker, keep=None): evict from the LRU end down to target "
     "bytes; the bytes released."},
    {"flush", (PyCFunction)(void (*)(void))Core_flush, METH_VARARGS | METH_KEYWORDS,
     "flush(at=0): flush_all: drop every item now, or every item that exists at time at."},
    {"_apply_pending_flush", (PyCFunction)Core_apply_pending_flush, METH_NOARGS,
     "Do a delayed flush_all whose time has come."},
    {"drain", (PyCFunction)Core_drain, METH_NOARGS,
     "drain(): (keys, items), least recently used first; the store is left empty."},
    {"reclaim_expired", (PyCFunction)(void (*)(void))Core_reclaim_expired,
     METH_VARARGS | METH_KEYWORDS,
     "reclaim_expired(budget=10000): one step of the background crawler; items reclaimed."},
    {"_restored", (PyCFunction)Core_restored, METH_VARARGS,
     "_restored(count, nbytes): account items a restore put in the table."},
    {"next_cas", (PyCFunction)Core_next_cas, METH_NOARGS, "A new CAS value."},
    {"too_large", (PyCFunction)Core_too_large, METH_VARARGS,
     "too_large(key, flags, nbytes): whether memcached with the same -I refuses the item."},
    {NULL},
};

static PyMemberDef Core_members[] = {
    {"capacity", T_LONGLONG, offsetof(CoreObject, capacity), 0, "bytes_used stays under it"},
    {"max_item_size", T_LONGLONG, offsetof(CoreObject, max_item_size), 0, "-I"},
    {"bytes_used", T_LONGLONG, offsetof(CoreObject, bytes_used), READONLY,
     "keys and items as allocated, and ITEM_OVERHEAD each"},
    {"last_cas", T_ULONGLONG, offsetof(CoreObject, last_cas), 0, "the CAS handed out last"},
    {"flush_at", T_LONGLONG, offsetof(CoreObject, flush_at), 0,
     "when a delayed flush_all takes effect, 0 if none"},
    {"stats", T_OBJECT_EX, offsetof(CoreObject, stats), READONLY, "the store's counters"},
    {NULL},
};

static PyObject *Core_get_clock(CoreObject *c, void *unused) {
    NEED_READY(c);
    return Py_NewRef(c->clock);
}

static int Core_set_clock(CoreObject *c, PyObject *clock, void *unused) {
    if (clock == NULL || !PyCallable_Check(clock)) {
        PyErr_SetString(PyExc_TypeError, "clock must be a callable returning seconds");
        return -1;
    }
    Py_INCREF(clock);
    Py_XSETREF(c->clock, clock);
    return 0;
}

static PyGetSetDef Core_getset[] = {
    {"clock", (getter)Core_get_clock, (setter)Core_set_clock, "() -> seconds since the epoch", NULL},
    {"table", (getter)Core_get_table, NULL,
     "The items: key -> item bytes, least recently used first (the same dict for the "
     "store's whole life).",
     NULL},
    {"curr_items", (getter)Core_get_curr_items, NULL, "Items stored.", NULL},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cacheserver.storage._core.Core",
    .tp_doc = "Core(capacity, max_item_size=1 MiB, clock=time.time): the store core.",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
    .tp_getset = Core_getset,
};

static PyObject *StoreStats_repr(StoreStatsObject *s) {
    char text[1024];
    int n = snprintf(text, sizeof text, "StoreStats(");
#define COUNTER_REPR(name, doc) \
    n += snprintf(text + n, sizeof text - n, "%s" #name "=%lld", n > 11 ? ", " : "", s->name);
    STORE_COUNTERS(COUNTER_REPR)
#undef COUNTER_REPR
    snprintf(text + n, sizeof text - n, ")");
    return PyUnicode_FromString(text);
}

/* Equal when every counter is (as the dataclass it replaced). */
static PyObject *StoreStats_richcompare(PyObject *a, PyObject *b, int op) {
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(b, &StoreStatsType))
        Py_RETURN_NOTIMPLEMENTED;
    StoreStatsObject *x = (StoreStatsObject *)a, *y = (StoreStatsObject *)b;
    int equal = 1;
#define COUNTER_EQUAL(name, doc) equal = equal && x->name == y->name;
    STORE_COUNTERS(COUNTER_EQUAL)
#undef COUNTER_EQUAL
    return PyBool_FromLong(equal == (op == Py_EQ));
}

static PyMemberDef StoreStats_members[] = {
#define COUNTER_MEMBER(name, doc) {#name, T_LONGLONG, offsetof(StoreStatsObject, name), 0, doc},
    STORE_COUNTERS(COUNTER_MEMBER)
#undef COUNTER_MEMBER
    {NULL},
};

static PyTypeObject StoreStatsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cacheserver.storage._core.StoreStats",
    .tp_doc = "The store's counters: plain integers, read by stats and the metrics.",
    .tp_basicsize = sizeof(StoreStatsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_repr = (reprfunc)StoreStats_repr,
    .tp_richcompare = StoreStats_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_members = StoreStats_members,
};

static PyObject *make_item(PyObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cas", "exptime", "flags", "data", "fetched", "now", "marks", NULL};
    unsigned long long cas, exptime, flags;
    Py_buffer data;
    int is_fetched = 0, marks = 0;
    long long now = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKKy*|pLi", kwlist, &cas, &exptime, &flags,
                                     &data, &is_fetched, &now, &marks))
        return NULL;
    PyObject *item = NULL;
    if (exptime > 0xFFFFFFFFull || flags > 0xFFFFFFFFull || marks < 0 || marks > 0xFF)
        PyErr_SetString(PyExc_OverflowError, "exptime and flags are 32-bit, marks 8-bit");
    else
        item = item_new(cas, (unsigned int)exptime, (unsigned int)flags, data.buf, data.len,
                        is_fetched, now, marks);
    PyBuffer_Release(&data);
    return item;
}

static PyMethodDef module_methods[] = {
    {"make_item", (PyCFunction)(void (*)(void))make_item, METH_VARARGS | METH_KEYWORDS,
     "make_item(cas, exptime, flags, data, fetched=False, now=0, marks=0): an item stored at "
     "now; data is the value without its trailing CRLF."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cacheserver.storage._core",
    .m_doc = "The store core: the item layout, the LRU, accounting, expiry and eviction "
             "(core.h).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&StoreStatsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *capsule = PyCapsule_New(&api, CORE_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObjectRef(m, "API", capsule) < 0
        || PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0
        || PyModule_AddObjectRef(m, "StoreStats", (PyObject *)&StoreStatsType) < 0)
        goto fail;
    Py_DECREF(capsule);
#define CONST(name) PyModule_AddIntConstant(m, #name, name) < 0 ||
    if (CONST(HEADER_SIZE) CONST(CAS_AT) CONST(EXPTIME_AT) CONST(FLAGS_AT) CONST(BUMPED_AT)
            CONST(META_AT) CONST(MARKS_AT) CONST(FETCHED) CONST(OFFSET_MASK)
                CONST(ITEM_OVERHEAD) CONST(BUMP_INTERVAL) CONST(MEMCACHED_ITEM_OVERHEAD)
                    CONST(CORE_VERSION) 0)
        goto fail_module;
#undef CONST
    return m;
fail:
    Py_XDECREF(capsule);
fail_module:
    Py_DECREF(m);
    return NULL;
}
