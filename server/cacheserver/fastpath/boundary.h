/* boundary.c: every way the C code reaches the Python objects (what it reads, writes and
 * calls of them is declared in cacheserver/fastpath/boundary.py). Each returns -1 with a
 * Python error set when that fails. */
#ifndef CACHESERVER_FASTPATH_BOUNDARY_H
#define CACHESERVER_FASTPATH_BOUNDARY_H

#include "engine.h"

/* At import: the shared constants (constants.h) and the attribute names. */
int boundary_load(void);

/* Engine(), attach_tcp(), attach_udp(): look up and keep what the engine uses. */
int engine_bind(Engine *e, PyObject *store, PyObject *counters, PyObject *latency,
                PyObject *commands);
int engine_bind_tcp(Engine *e, PyObject *server, PyObject *conn_class);
int engine_bind_udp(Engine *e, PyObject *server);

/* A wake-up: the time and stats detail read when it begins (and after the slow path), its
 * counters handed to the Python objects before any Python code runs. */
int sync_in(Engine *e);
int sync_out(Engine *e);

/* The TCP server and its connections. */
int tcp_tick(Engine *e, long long *tick);
int conn_plain(Engine *e, PyObject *conn);
int conn_seen(Engine *e, PyObject *conn, long long tick);
int tcp_serve_event(Engine *e, int fd, PyObject *conn, unsigned int events);
int tcp_finish_read(Engine *e, int fd, PyObject *conn, const char *head, Py_ssize_t nhead,
                    const char *rest, Py_ssize_t nrest);
int tcp_send(Engine *e, int fd, PyObject *conn, const char *out, Py_ssize_t n);
int tcp_close(Engine *e, int fd, PyObject *conn);

/* The UDP server. */
int udp_answer(Engine *e, unsigned int request_id, const char *head, Py_ssize_t nhead,
               const char *rest, Py_ssize_t nrest, PyObject *addr);

/* The latency histogram: the reads timed during a wake-up, once it ends. */
int flush_samples(Engine *e);

#endif
