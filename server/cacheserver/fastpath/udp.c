/* UDP: the reader callback for the UDP socket, recvmmsg in and sendmmsg out (network/udp.py). */
#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "boundary.h"
#include "protocol.h"

#define UDP_VLEN 32           /* datagrams per recvmmsg / sendmmsg */
#define UDP_READ_SIZE 65536   /* the largest datagram */

typedef struct SendQueue {
    struct mmsghdr msgs[UDP_VLEN];
    struct iovec iov[UDP_VLEN];
    struct sockaddr_storage addrs[UDP_VLEN];
    char *data; /* UDP_VLEN datagrams of UDP_HEADER + UDP_MAX_PAYLOAD bytes */
    int count;
} SendQueue;

static PyObject *address_tuple(const struct sockaddr_storage *addr) {
    char host[INET6_ADDRSTRLEN];
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(sHkk)", host, ntohs(a->sin6_port),
                             (unsigned long)ntohl(a->sin6_flowinfo),
                             (unsigned long)a->sin6_scope_id);
    }
    const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return Py_BuildValue("(sH)", host, ntohs(a->sin_port));
}

static void flush_sends(Engine *e, SendQueue *q) {
    int i = 0;
    while (i < q->count) {
        int sent = sendmmsg(e->udp_fd, q->msgs + i, q->count - i, 0);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            /* A full buffer or an unreachable client: this datagram is dropped, as UDP may. */
            e->deltas[C_UDP_SEND_ERRORS]++;
            i++;
            continue;
        }
        for (int j = i; j < i + sent; j++)
            e->deltas[C_BYTES_WRITTEN] += q->iov[j].iov_len;
        e->deltas[C_UDP_SENT] += sent;
        i += sent;
    }
    q->count = 0;
}

/* One datagram: network/udp.py's datagram_received, with the fast path in the middle. */
static int serve_datagram(Engine *e, SendQueue *q, const unsigned char *d, Py_ssize_t len,
                          const struct sockaddr_storage *addr, socklen_t addrlen) {
    e->deltas[C_UDP_RECEIVED]++;
    e->deltas[C_BYTES_READ] += len;
    if (len < UDP_HEADER) {
        e->deltas[C_UDP_MALFORMED]++;
        return 0;
    }
    unsigned int request_id = (d[0] << 8) | d[1], seq = (d[2] << 8) | d[3];
    unsigned int count = (d[4] << 8) | d[5];
    if (count == 0 || seq >= count) {
        e->deltas[C_UDP_MALFORMED]++;
        return 0;
    }
    if (count != 1) {
        e->deltas[C_UDP_MULTIDATAGRAM]++;
        return 0;
    }
    OutBuf *out = &e->out;
    out->len = 0;
    const char *payload = (const char *)d + UDP_HEADER;
    Py_ssize_t plen = len - UDP_HEADER;
    Py_ssize_t done = run_requests(e, payload, plen, out);
    if (done < 0)
        return -1;
    if (done == plen && out->len == 0)
        return 0;
    if (done == plen && out->len <= UDP_MAX_PAYLOAD) {
        if (q->count == UDP_VLEN)
            flush_sends(e, q);
        int i = q->count++;
        unsigned char *h = (unsigned char *)q->data + i * (UDP_HEADER + UDP_MAX_PAYLOAD);
        h[0] = (unsigned char)(request_id >> 8);
        h[1] = (unsigned char)request_id;
        memset(h + 2, 0, 6);
        h[5] = 1; /* datagram 0 of 1 */
        memcpy(h + UDP_HEADER, out->data, out->len);
        memcpy(&q->addrs[i], addr, addrlen);
        q->iov[i].iov_base = h;
        q->iov[i].iov_len = UDP_HEADER + out->len;
        memset(&q->msgs[i].msg_hdr, 0, sizeof q->msgs[i].msg_hdr);
        q->msgs[i].msg_hdr.msg_name = &q->addrs[i];
        q->msgs[i].msg_hdr.msg_namelen = addrlen;
        q->msgs[i].msg_hdr.msg_iov = &q->iov[i];
        q->msgs[i].msg_hdr.msg_iovlen = 1;
        return 0;
    }
    /* The rest of the datagram, or a reply that needs several datagrams: the Python server
     * (replies stay in order: what is queued goes first). */
    flush_sends(e, q);
    return udp_answer(e, request_id, out->data, out->len, payload + done, plen - done,
                      address_tuple(addr));
}

/* Receive-side buffers for recvmmsg, allocated when UDP is attached. */
typedef struct RecvBatch {
    struct mmsghdr msgs[UDP_VLEN];
    struct iovec iov[UDP_VLEN];
    struct sockaddr_storage addrs[UDP_VLEN];
    char space[UDP_VLEN][UDP_READ_SIZE]; /* only the pages datagrams touch become resident */
} RecvBatch;

PyObject *Engine_serve_udp(Engine *e, PyObject *Py_UNUSED(ignored)) {
    if (e->answer == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "attach_udp was not called");
        return NULL;
    }
    if (sync_in(e) < 0)
        return NULL;
    struct RecvBatch *r = e->recv_batch;
    struct SendQueue *q = e->send_queue;
    q->count = 0;
    int rc = 0, handled = 0;
    while (rc == 0 && handled < UDP_BATCH) {
        for (int i = 0; i < UDP_VLEN; i++) {
            r->iov[i].iov_base = r->space[i];
            r->iov[i].iov_len = UDP_READ_SIZE;
            memset(&r->msgs[i].msg_hdr, 0, sizeof r->msgs[i].msg_hdr);
            r->msgs[i].msg_hdr.msg_name = &r->addrs[i];
            r->msgs[i].msg_hdr.msg_namelen = sizeof r->addrs[i];
            r->msgs[i].msg_hdr.msg_iov = &r->iov[i];
            r->msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(e->udp_fd, r->msgs, UDP_VLEN, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            handled++; /* EINTR, or an ICMP error for an earlier reply: nothing to do */
            continue;
        }
        for (int i = 0; i < n && rc == 0; i++)
            rc = serve_datagram(e, q, (const unsigned char *)r->space[i], r->msgs[i].msg_len,
                                &r->addrs[i], r->msgs[i].msg_hdr.msg_namelen);
        flush_sends(e, q);
        handled += n;
        if (n < UDP_VLEN)
            break;
    }
    flush_sends(e, q);
    if (sync_out(e) < 0 || rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *Engine_attach_udp(Engine *e, PyObject *args) {
    int fd;
    PyObject *server;
    if (!PyArg_ParseTuple(args, "iO", &fd, &server))
        return NULL;
    if (e->recv_batch == NULL && (e->recv_batch = PyMem_Malloc(sizeof(RecvBatch))) == NULL)
        return PyErr_NoMemory();
    if (e->send_queue == NULL && (e->send_queue = PyMem_Calloc(1, sizeof(SendQueue))) == NULL)
        return PyErr_NoMemory();
    SendQueue *q = e->send_queue;
    if (q->data == NULL
        && (q->data = PyMem_Malloc(UDP_VLEN * (UDP_HEADER + UDP_MAX_PAYLOAD))) == NULL)
        return PyErr_NoMemory();
    if (engine_bind_udp(e, server) < 0)
        return NULL;
    e->udp_fd = fd;
    Py_RETURN_NONE;
}

void udp_free(Engine *e) {
    if (e->send_queue != NULL)
        PyMem_Free(e->send_queue->data);
    PyMem_Free(e->send_queue);
    PyMem_Free(e->recv_batch);
    e->send_queue = NULL;
    e->recv_batch = NULL;
}
