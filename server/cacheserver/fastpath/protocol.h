/* The requests the fast path answers: text.c (get, gets, set) and meta.c (mg, ms, mn). */
#ifndef CACHESERVER_FASTPATH_PROTOCOL_H
#define CACHESERVER_FASTPATH_PROTOCOL_H

#include "engine.h"

#define MAX_TOKENS 32 /* longer multi-gets go to the Python path */

/* ASCII digits only, at most 10 of them (the limits checked are 32-bit); -1 otherwise. */
static inline long long parse_small(const char *p, Py_ssize_t n) {
    if (n < 1 || n > 10)
        return -1;
    long long v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

/* text.c */
Py_ssize_t run_requests(Engine *e, const char *buf, Py_ssize_t len, OutBuf *out);

/* meta.c: the meta request in tok[0..ntok) whose line ends at next (pos: where it starts).
 * 1: answered, *pos moved past it; 0: stop at *pos (left to the Python path, or the replies
 * reached REPLY_LIMIT); -1: a Python error. */
int run_meta(Engine *e, const char *const *tok, const Py_ssize_t *tlen, int ntok,
             const char *buf, Py_ssize_t len, Py_ssize_t next, OutBuf *out, Py_ssize_t *pos);

#endif
