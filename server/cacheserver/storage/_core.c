/* The store core's Python face: the Core type (storage/store.py's Store subclasses it and
 * adds the commands built on it: add, cas, append, incr and the rest), StoreStats, make_item
 * and the layout's numbers. Every rule is core.c's; this file parses arguments and checks
 * types. The compiled fast path compiles core.c in too and finds the Core type here.
 */
#include "core.h"

#include <structmember.h>

static PyTypeObject CoreType, StoreStatsType;

static int ready(CoreObject *c) {
    if (c->items != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "the store core was not initialised (Core.__init__)");
    return -1;
}

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
    PyObject *item = core_lookup(c, key, now);
    return or_none(item == NULL ? NULL : core_hit(c, key, item, now));
}

static PyObject *Core_peek(CoreObject *c, PyObject *key) {
    NEED_READY(c);
    long long now;
    if (need_bytes(key, "key") < 0 || core_now(c, &now) < 0)
        return NULL;
    return or_none(core_lookup(c, key, now));
}

static PyObject *Core_live(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    NEED_READY(c);
    long long now;
    if (n != 2 || need_bytes(args[0], "key") < 0 || (now = PyLong_AsLongLong(args[1])) == -1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "_live(key, now)");
        return NULL;
    }
    return or_none(core_lookup(c, args[0], now));
}

static PyObject *Core_hit(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    NEED_READY(c);
    long long now;
    if (n != 2)
        return PyErr_Format(PyExc_TypeError, "_hit(key, item)");
    if (need_bytes(args[0], "key") < 0 || need_bytes(args[1], "item") < 0 || core_now(c, &now) < 0)
        return NULL;
    return core_hit(c, args[0], Py_NewRef(args[1]), now);
}

static PyObject *Core_store(CoreObject *c, PyObject *const *args, Py_ssize_t n) {
    NEED_READY(c);
    if (n != 2)
        return PyErr_Format(PyExc_TypeError, "_store(key, item)");
    if (need_bytes(args[0], "key") < 0 || need_bytes(args[1], "item") < 0)
        return NULL;
    int rc = core_store(c, args[0], args[1]);
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
    long long diff = core_cost(key, item) - core_cost(key, old);
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
    if (need_bytes(key, "key") < 0)
        return NULL;
    PyObject *item = PyDict_GetItemWithError(c->items, key);
    if (item == NULL)
        return PyErr_Occurred() ? NULL : PyBool_FromLong(0);
    Py_INCREF(item);
    int rc = core_unlink(c, key, item);
    Py_DECREF(item);
    return rc < 0 ? NULL : PyBool_FromLong(1);
}

static PyObject *Core_make_room(CoreObject *c, PyObject *keep) {
    NEED_READY(c);
    if (need_bytes(keep, "keep") < 0 || core_evict_to(c, c->capacity - (c->capacity >> 6), 0, keep) < 0)
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
    long long released = core_evict_to(c, target, by_shrinker, keep == Py_None ? NULL : keep);
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
        core_flush(c);
    Py_RETURN_NONE;
}

static PyObject *Core_apply_pending_flush(CoreObject *c, PyObject *unused) {
    long long now;
    NEED_READY(c);
    if (core_now(c, &now) < 0)
        return NULL;
    core_apply_pending_flush(c, now);
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
    core_apply_pending_flush(c, now);
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
        if (core_expired(item, now)) {
            Py_INCREF(item);
            int rc = core_drop_expired(c, key, item);
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
    return PyBool_FromLong(core_too_large(c, PyBytes_GET_SIZE(key), flags, nbytes));
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
        item = core_item_new(cas, (unsigned int)exptime, (unsigned int)flags, data.buf, data.len,
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
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0
        || PyModule_AddObjectRef(m, "StoreStats", (PyObject *)&StoreStatsType) < 0)
        goto fail;
#define CONST(name) PyModule_AddIntConstant(m, #name, name) < 0 ||
    if (CONST(HEADER_SIZE) CONST(CAS_AT) CONST(EXPTIME_AT) CONST(FLAGS_AT) CONST(BUMPED_AT)
            CONST(META_AT) CONST(MARKS_AT) CONST(FETCHED) CONST(OFFSET_MASK)
                CONST(ITEM_OVERHEAD) CONST(BUMP_INTERVAL) CONST(MEMCACHED_ITEM_OVERHEAD)
                    CONST(CORE_VERSION) 0)
        goto fail;
#undef CONST
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
