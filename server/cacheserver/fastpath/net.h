/* tcp.c and udp.c: the Engine methods that serve sockets (module.c lists them), and what
 * the Engine type's GC and dealloc do with their state. */
#ifndef CACHESERVER_FASTPATH_NET_H
#define CACHESERVER_FASTPATH_NET_H

#include "engine.h"

PyObject *Engine_serve_tcp(Engine *e, PyObject *Py_UNUSED(ignored));
PyObject *Engine_attach_tcp(Engine *e, PyObject *args);
int tcp_traverse(Engine *e, visitproc visit, void *arg);
void tcp_clear(Engine *e);
void tcp_free(Engine *e);

PyObject *Engine_serve_udp(Engine *e, PyObject *Py_UNUSED(ignored));
PyObject *Engine_attach_udp(Engine *e, PyObject *args);
void udp_free(Engine *e);

#endif
