/* Warm-restart snapshots: one block written or restored in a single C loop.
 *
 * The format is storage/snapshot.py's, unchanged (a block is payload length:u64 | items:u32 |
 * crc32:u32 | payload; the payload is the key lengths, one byte each, the item lengths, u32
 * each, the keys, then the items). snapshot.py defines it and reads and writes it in Python
 * too; this module only does the per-item work of a block without a Python step per item:
 *
 *   append_block(fd, keys, items, start, stop) -> bytes written
 *       Appends the block of keys[start:stop] and items[start:stop] at the file's position:
 *       the payload with pwritev, large items straight from their objects and small pieces
 *       gathered a megabyte at a time (no joined copy of the whole block), zlib's crc32
 *       taken over each piece just before the kernel copies it, then the header with that
 *       crc at the block's start, and the file position moved past the block.
 *
 *   fill(dict, payload, count, now, exptime_at, min_item) -> (stored, nbytes, expired)
 *       Adds the items of one block's payload (already checksummed by the caller) to dict,
 *       in order, leaving out those whose exptime (u32 at exptime_at in the item) is not 0
 *       and <= now. Every length is checked against the payload first, so nothing is added
 *       from a block that does not add up (ValueError).
 *
 * Little-endian on disk, whatever the machine.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zlib.h>

#ifdef IOV_MAX
#define BATCH IOV_MAX
#else
#define BATCH 1024
#endif
#define BLOCK_HEADER 16 /* payload length u64, items u32, crc32 u32 */
#define MAX_KEY 255     /* a key length is one byte */

static void put_le32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static void put_le64(unsigned char *p, uint64_t v) {
    put_le32(p, (uint32_t)v);
    put_le32(p + 4, (uint32_t)(v >> 32));
}

static uint32_t get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uLong crc_of(uLong crc, const unsigned char *p, size_t len) {
    while (len > 0) {
        uInt chunk = len > UINT_MAX ? UINT_MAX : (uInt)len;
        crc = crc32(crc, p, chunk);
        p += chunk;
        len -= chunk;
    }
    return crc;
}

/* Pieces of a block on their way to the file: checksummed, gathered and written in batches.
 * A piece of at least LARGE bytes is written from its object; smaller ones are copied into
 * a staging buffer first, so a batch of tiny keys and items is a few large iovecs. */
#define LARGE 4096
#define STAGE (1 << 20)
typedef struct {
    int fd;
    off_t at; /* where the next piece goes */
    uLong crc;
    struct iovec iov[BATCH];
    int n;
    size_t staged;       /* bytes used in stage */
    int last_is_staged;  /* iov[n - 1] ends at stage + staged: extend it */
    unsigned char stage[STAGE];
} Writer;

static int flush(Writer *w) {
    struct iovec *iov = w->iov;
    int left = w->n;
    while (left > 0) {
        ssize_t done = pwritev(w->fd, iov, left, w->at);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        w->at += done;
        while (left > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            left--;
        }
        if (left > 0) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    w->n = 0;
    w->staged = 0;
    w->last_is_staged = 0;
    return 0;
}

static int add(Writer *w, const void *p, size_t len) {
    if (len == 0)
        return 0;
    w->crc = crc_of(w->crc, p, len);
    if (len < LARGE) {
        if (w->staged + len > STAGE && flush(w) < 0)
            return -1;
        memcpy(w->stage + w->staged, p, len);
        if (w->last_is_staged) {
            w->iov[w->n - 1].iov_len += len;
            w->staged += len;
            return 0;
        }
        p = w->stage + w->staged;
        w->staged += len;
        w->last_is_staged = 1;
    } else {
        w->last_is_staged = 0;
    }
    w->iov[w->n].iov_base = (void *)p;
    w->iov[w->n].iov_len = len;
    return ++w->n == BATCH ? flush(w) : 0;
}

static int write_all_at(int fd, const unsigned char *p, size_t len, off_t at) {
    while (len > 0) {
        ssize_t done = pwrite(fd, p, len, at);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        p += done;
        len -= (size_t)done;
        at += done;
    }
    return 0;
}

static PyObject *append_block(PyObject *self, PyObject *args) {
    int fd;
    PyObject *keys, *items;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "iO!O!nn", &fd, &PyList_Type, &keys, &PyList_Type, &items, &start,
                          &stop))
        return NULL;
    if (start < 0 || stop <= start || stop > PyList_GET_SIZE(keys) ||
        stop > PyList_GET_SIZE(items)) {
        PyErr_SetString(PyExc_ValueError, "append_block: start and stop outside the lists");
        return NULL;
    }
    Py_ssize_t count = stop - start;
    if (count > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "append_block: too many items for one block");
        return NULL;
    }
    unsigned char *lengths = PyMem_Malloc((size_t)count * 5);
    Writer *w = PyMem_Malloc(sizeof(Writer));
    if (lengths == NULL || w == NULL) {
        PyMem_Free(lengths);
        PyMem_Free(w);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    uint64_t plen = (uint64_t)count * 5;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *k = PyList_GET_ITEM(keys, start + i), *v = PyList_GET_ITEM(items, start + i);
        if (!PyBytes_CheckExact(k) || !PyBytes_CheckExact(v)) {
            PyErr_SetString(PyExc_TypeError, "append_block: keys and items must be bytes");
            goto done;
        }
        Py_ssize_t klen = PyBytes_GET_SIZE(k), vlen = PyBytes_GET_SIZE(v);
        if (klen < 1 || klen > MAX_KEY || (uint64_t)vlen > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "append_block: a key or item of a size the "
                                              "format cannot hold");
            goto done;
        }
        lengths[i] = (unsigned char)klen;
        put_le32(lengths + count + 4 * i, (uint32_t)vlen);
        plen += (uint64_t)klen + (uint64_t)vlen;
    }
    off_t begin = lseek(fd, 0, SEEK_CUR);
    if (begin < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    unsigned char head[BLOCK_HEADER];
    put_le64(head, plen);
    put_le32(head + 8, (uint32_t)count);
    w->fd = fd;
    w->at = begin + BLOCK_HEADER;
    w->n = 0;
    w->staged = 0;
    w->last_is_staged = 0;
    w->crc = crc_of(crc32(0L, Z_NULL, 0), head, 12); /* the crc covers length and count */
    if (add(w, lengths, (size_t)count * 5) < 0)
        goto done;
    for (Py_ssize_t i = start; i < stop; i++) {
        PyObject *k = PyList_GET_ITEM(keys, i);
        if (add(w, PyBytes_AS_STRING(k), (size_t)PyBytes_GET_SIZE(k)) < 0)
            goto done;
    }
    for (Py_ssize_t i = start; i < stop; i++) {
        PyObject *v = PyList_GET_ITEM(items, i);
        if (add(w, PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v)) < 0)
            goto done;
    }
    if (flush(w) < 0)
        goto done;
    put_le32(head + 12, (uint32_t)w->crc);
    if (write_all_at(fd, head, BLOCK_HEADER, begin) < 0)
        goto done;
    if (lseek(fd, w->at, SEEK_SET) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = PyLong_FromUnsignedLongLong(BLOCK_HEADER + plen);
done:
    PyMem_Free(lengths);
    PyMem_Free(w);
    return result;
}

static PyObject *fill(PyObject *self, PyObject *args) {
    PyObject *dict;
    Py_buffer buf;
    Py_ssize_t count, exptime_at, min_item;
    long long now;
    if (!PyArg_ParseTuple(args, "O!y*nLnn", &PyDict_Type, &dict, &buf, &count, &now, &exptime_at,
                          &min_item))
        return NULL;
    PyObject *result = NULL;
    const unsigned char *p = buf.buf;
    size_t len = (size_t)buf.len;
    if (count <= 0 || (size_t)count > len / 5 || exptime_at < 0 || min_item < exptime_at + 4) {
        PyErr_SetString(PyExc_ValueError, "its count does not fit its length");
        goto done;
    }
    const unsigned char *klens = p, *ilens = p + count;
    size_t total = (size_t)count * 5;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t ilen = get_le32(ilens + 4 * i);
        if (klens[i] == 0 || ilen < (uint32_t)min_item) {
            PyErr_SetString(PyExc_ValueError, "a key or item length out of range");
            goto done;
        }
        total += klens[i] + (size_t)ilen;
        if (total > len)
            break;
    }
    if (total != len) {
        PyErr_SetString(PyExc_ValueError, "lengths do not add up");
        goto done;
    }
    const unsigned char *key = p + (size_t)count * 5, *item = key;
    for (Py_ssize_t i = 0; i < count; i++)
        item += klens[i];
    Py_ssize_t stored = 0, expired = 0;
    unsigned long long nbytes = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t klen = klens[i], ilen = get_le32(ilens + 4 * i);
        uint32_t exptime = get_le32(item + exptime_at);
        if (exptime != 0 && (long long)exptime <= now) {
            expired++;
        } else {
            PyObject *k = PyBytes_FromStringAndSize((const char *)key, (Py_ssize_t)klen);
            PyObject *v = k ? PyBytes_FromStringAndSize((const char *)item, (Py_ssize_t)ilen) : NULL;
            int failed = v == NULL || PyDict_SetItem(dict, k, v) < 0;
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (failed)
                goto done;
            stored++;
            nbytes += klen + ilen;
        }
        key += klen;
        item += ilen;
    }
    result = Py_BuildValue("nKn", stored, nbytes, expired);
done:
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"append_block", append_block, METH_VARARGS,
     "append_block(fd, keys, items, start, stop) -> bytes written: one block of the snapshot "
     "format, at the file's position."},
    {"fill", fill, METH_VARARGS,
     "fill(dict, payload, count, now, exptime_at, min_item) -> (stored, nbytes, expired): the "
     "live items of one checked block's payload added to dict in order."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_snapshotio",
    "Warm-restart snapshot blocks written and restored in C (see storage/snapshot.py).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__snapshotio(void) { return PyModule_Create(&module); }
