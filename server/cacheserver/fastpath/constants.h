/* The constants the C code shares with the Python layers. Only their names are here: the
 * values are read from cacheserver/fastpath/boundary.py's CONSTANTS when the extension is
 * imported (boundary.c), and boundary.py says which Python module defines each. The item
 * layout and the store's rules are not among them: they are the store core's (storage/core.h,
 * compiled in, its version checked at import). */
#ifndef CACHESERVER_FASTPATH_CONSTANTS_H
#define CACHESERVER_FASTPATH_CONSTANTS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define SHARED_CONSTANTS(X)                                                                   \
    /* protocol/ */                                                                           \
    X(KEY_MAX_LENGTH) X(MAX_RELATIVE_EXPTIME) X(REPLY_LIMIT) X(META_MAX_WORDS)                \
    X(META_MAX_OPAQUE)                                                                        \
    /* metrics/latency.py */                                                                  \
    X(SAMPLE_MASK)                                                                            \
    /* network/ */                                                                            \
    X(READ_SIZE) X(TCP_BATCH) X(UDP_HEADER) X(UDP_MAX_PAYLOAD) X(UDP_BATCH)

/* protocol/numbers.py: the ranges of flags, exptime and byte counts (compared unsigned). */
#define SHARED_LIMITS(X) X(U32_MAX) X(I32_MAX)

/* Hidden: the compiled code reads them directly, not through the global offset table. */
#pragma GCC visibility push(hidden)
#define DECLARE_SHARED(name) extern Py_ssize_t name;
SHARED_CONSTANTS(DECLARE_SHARED)
#undef DECLARE_SHARED
#define DECLARE_LIMIT(name) extern unsigned long long name;
SHARED_LIMITS(DECLARE_LIMIT)
#undef DECLARE_LIMIT

/* discovery/membership.py: a get of this key alone is ElastiCache's older auto-discovery
 * request, which the Python session answers (over TCP, with a membership). */
extern const char *CLUSTER_KEY;
extern Py_ssize_t CLUSTER_KEY_LEN;
#pragma GCC visibility pop

#endif
