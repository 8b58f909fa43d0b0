/* store.c: the Python Store's dict and items, read and written as storage/store.py does. */
#ifndef CACHESERVER_FASTPATH_STORE_H
#define CACHESERVER_FASTPATH_STORE_H

#include "engine.h"

int drop_expired(Engine *e, PyObject *key, PyObject *item);
int get_one(Engine *e, const char *k, Py_ssize_t klen, int with_cas, OutBuf *out);
int set_one(Engine *e, const char *k, Py_ssize_t klen, unsigned long long flags,
            unsigned int exptime, const char *data, Py_ssize_t nbytes);

#endif
