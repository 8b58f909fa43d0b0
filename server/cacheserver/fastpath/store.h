/* store.c: the fast path's get and set, through the store core (storage/core.h). */
#ifndef CACHESERVER_FASTPATH_STORE_H
#define CACHESERVER_FASTPATH_STORE_H

#include "engine.h"

/* get or gets of one key: its VALUE block on a hit. 1 hit, 0 miss, -1 error. */
int get_one(Engine *e, const char *k, Py_ssize_t klen, int with_cas, OutBuf *out);

/* A set of nbytes of data under key (text set, meta ms in set mode), flags and exptime as
 * the request gave them. 1 stored; 0 when the Python path answers (an item too large for -I
 * or for all the memory); -1 error. */
int set_request(Engine *e, const char *k, Py_ssize_t klen, unsigned long long flags,
                unsigned long long exptime, const char *data, Py_ssize_t nbytes);

#endif
