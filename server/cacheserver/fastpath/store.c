/* The fast path's get and set. Every rule of the store -- expiry, the LRU bump, accounting,
 * eviction, the item layout -- is the store core's (storage/core.h): this file only calls it
 * and formats the replies. */
#include "store.h"

#include "outbuf.h"
#include "protocol.h"

int get_one(Engine *e, const char *k, Py_ssize_t klen, int with_cas, OutBuf *out) {
    PyObject *key = PyBytes_FromStringAndSize(k, klen);
    if (key == NULL)
        return -1;
    PyObject *item = core_lookup(e->core, key, e->now);
    if (item != NULL)
        item = core_hit(e->core, key, item, e->now);
    Py_DECREF(key);
    if (item == NULL)
        return PyErr_Occurred() ? -1 : 0;
    int rc = -1;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    Py_ssize_t size = PyBytes_GET_SIZE(item);
    if (out_reserve(out, 6 + klen + size - HEADER_SIZE + 24) < 0)
        goto done;
    memcpy(out->data + out->len, "VALUE ", 6);
    memcpy(out->data + out->len + 6, k, klen);
    out->len += 6 + klen;
    if (with_cas) {
        /* gets: " <flags> <bytes>" from the suffix, then " <cas>\r\n", then the data. */
        Py_ssize_t data_at = item_data_at(raw);
        memcpy(out->data + out->len, raw + HEADER_SIZE, data_at - 2 - HEADER_SIZE);
        out->len += data_at - 2 - HEADER_SIZE;
        char *p = out->data + out->len;
        *p++ = ' ';
        p = put_decimal(p, item_cas(raw));
        *p++ = '\r';
        *p++ = '\n';
        out->len = p - out->data;
        memcpy(out->data + out->len, raw + data_at, size - data_at);
        out->len += size - data_at;
    } else {
        memcpy(out->data + out->len, raw + HEADER_SIZE, size - HEADER_SIZE);
        out->len += size - HEADER_SIZE;
    }
    rc = 1;
done:
    Py_DECREF(item);
    return rc;
}

int set_request(Engine *e, const char *k, Py_ssize_t klen, unsigned long long flags,
                unsigned long long exptime, const char *data, Py_ssize_t nbytes) {
    if (flags > U32_MAX || exptime > I32_MAX || !core_fits(e->core, klen, flags, nbytes))
        return 0;
    /* Commands.absolute_exptime: 0 never; up to 30 days relative; else a Unix time. */
    if (exptime && exptime <= (unsigned long long)MAX_RELATIVE_EXPTIME)
        exptime += e->now;
    e->deltas[C_CMD_SET]++;
    if (core_set(e->core, k, klen, (unsigned int)flags, (unsigned int)exptime, data, nbytes,
                      e->now) < 0)
        return -1;
    return 1;
}
