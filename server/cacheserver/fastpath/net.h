/* tcp.c and udp.c: the Engine methods that serve sockets (module.c lists them), and what
 * the Engine type's dealloc does with their state. */
#ifndef CACHESERVER_FASTPATH_NET_H
#define CACHESERVER_FASTPATH_NET_H

#include "engine.h"

PyObject *Engine_serve_tcp(Engine *e, PyObject *Py_UNUSED(ignored));
PyObject *Engine_attach_tcp(Engine *e, PyObject *args);
PyObject *Engine_watch(Engine *e, PyObject *arg);
void tcp_free(Engine *e);

PyObject *Engine_serve_udp(Engine *e, PyObject *Py_UNUSED(ignored));
PyObject *Engine_attach_udp(Engine *e, PyObject *args);
void udp_free(Engine *e);

#endif
