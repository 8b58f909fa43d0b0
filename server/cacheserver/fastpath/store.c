/* Get and set on the Python Store's own dict, as storage/store.py does them. */
#include "store.h"

#include "boundary.h"
#include "item.h"
#include "outbuf.h"
#include "protocol.h"

/* Store.get's expiry branch: drop the item, count it. */
int drop_expired(Engine *e, PyObject *key, PyObject *item) {
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    int fetched = raw[META_AT] & FETCHED;
    e->bytes_used -= PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(item) + ITEM_OVERHEAD;
    e->shadow_dirty = 1;
    if (PyDict_DelItem(e->items, key) < 0)
        return -1;
    return store_count_expired(e, fetched);
}

/* Store.get for one key, then the VALUE block of a hit. 1 hit, 0 miss, -1 error. */
int get_one(Engine *e, const char *k, Py_ssize_t klen, int with_cas, OutBuf *out) {
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
        double now;
        if (store_clock(e, &now) < 0)
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
        Py_ssize_t data_at = raw[META_AT] & OFFSET_MASK;
        unsigned long long cas = 0;
        for (int i = 7; i >= 0; i--)
            cas = (cas << 8) | raw[i];
        memcpy(out->data + out->len, raw + HEADER_SIZE, data_at - 2 - HEADER_SIZE);
        out->len += data_at - 2 - HEADER_SIZE;
        char *p = out->data + out->len;
        *p++ = ' ';
        p = put_u64(p, cas);
        *p++ = '\r';
        *p++ = '\n';
        out->len = p - out->data;
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
 * the store runs over capacity, is the Python Store's own make_room. */
int set_one(Engine *e, const char *k, Py_ssize_t klen, unsigned long long flags,
            unsigned int exptime, const char *data, Py_ssize_t nbytes) {
    char suffix[32]; /* " <flags> <bytes>\r\n": at most 1 + 10 + 1 + 10 + 2 bytes */
    char *s = suffix;
    *s++ = ' ';
    s = put_u64(s, flags);
    *s++ = ' ';
    s = put_u64(s, (unsigned long long)nbytes);
    *s++ = '\r';
    *s++ = '\n';
    int slen = (int)(s - suffix);
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
    long long cost = klen + size + ITEM_OVERHEAD;
    PyObject *old = PyDict_GetItemWithError(e->items, key);
    if (old == NULL && PyErr_Occurred())
        goto done;
    if (old != NULL) {
        cost -= klen + PyBytes_GET_SIZE(old) + ITEM_OVERHEAD;
        if (PyDict_DelItem(e->items, key) < 0) /* re-inserted below: most recently used */
            goto done;
    }
    if (PyDict_SetItem(e->items, key, item) < 0)
        goto done;
    e->bytes_used += cost;
    e->shadow_dirty = 1;
    e->total_items_delta++;
    rc = 0;
    if (e->bytes_used > e->capacity) /* as Store._store */
        rc = store_make_room(e, key);
done:
    Py_DECREF(item);
    Py_DECREF(key);
    return rc;
}
