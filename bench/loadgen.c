/*
 * loadgen: a small memtier-style load generator for memcached's text and meta protocols
 * (workloads W4, W6, W7, W8, W9).
 *
 * Each connection sends a batch of D pipelined requests in one write, waits for all the
 * replies, records the batch's round trip, and repeats until the time is up. MODE says what
 * a batch is:
 *   text   1:1 get/set on random keys, fixed-size values
 *   meta   90% "mg <key> v", 10% "ms <key> <size> T0"
 *   metaq  D-1 quiet gets ("mg <key> v q": a miss answers nothing) closed by "mn"; the
 *          D-1 gets count as operations
 * One thread, epoll, non-blocking sockets: cheap enough that the server, not the client, is
 * what gets measured.
 *
 * usage: loadgen [--tls] [--auth USER:PASSWORD] HOST PORT CONNECTIONS SECONDS [DEPTH=16]
 *                [VALUE_SIZE=100] [KEYS=10000] [MODE=text]
 * prints: ops=N seconds=S ops_per_sec=R median_us=M p99_us=P errors=E
 *
 * --tls speaks TLS (OpenSSL; built with -DWITH_TLS -lssl -lcrypto, as bench/compare.py does
 * when OpenSSL's headers are there), without checking the server's certificate: it measures,
 * it does not trust. --auth sends memcached's -Y authentication first. Connections, TLS
 * handshakes and authentication all happen before the clock starts.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifdef WITH_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define MAX_LAT_SAMPLES 2000000
#define RBUF 262144

struct conn {
    int fd;
#ifdef WITH_TLS
    SSL *ssl;
#endif
    char *wbuf;
    size_t wlen, woff;
    char rbuf[RBUF];
    size_t rlen;
    int pending;      /* replies still expected for the batch in flight */
    int batch_ops;    /* metaq: the gets the batch in flight counts for */
    double sent_at;
};

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static unsigned long long rng_state = 88172645463325252ULL;
static unsigned long long xorshift(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

enum { TEXT, META, METAQ };
static int depth = 16, value_size = 100, keys = 10000, mode = TEXT;
static char *value;
static double *lat;
static size_t nlat;
static unsigned long long ops, errors;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void build_batch(struct conn *c) {
    size_t cap = (size_t)depth * (64 + value_size);
    if (!c->wbuf) c->wbuf = malloc(cap);
    size_t n = 0;
    for (int i = 0; i < depth; i++) {
        unsigned long k = xorshift() % keys;
        if (mode == METAQ)
            n += i == depth - 1 ? sprintf(c->wbuf + n, "mn\r\n")
                                : sprintf(c->wbuf + n, "mg key:%08lu v q\r\n", k);
        else if (mode == META && xorshift() % 10 == 0)
            n += sprintf(c->wbuf + n, "ms key:%08lu %d T0\r\n%s\r\n", k, value_size, value);
        else if (mode == META)
            n += sprintf(c->wbuf + n, "mg key:%08lu v\r\n", k);
        else if (i % 2 == 0)
            n += sprintf(c->wbuf + n, "set key:%08lu 0 0 %d\r\n%s\r\n", k, value_size, value);
        else
            n += sprintf(c->wbuf + n, "get key:%08lu\r\n", k);
    }
    c->wlen = n;
    c->woff = 0;
    c->pending = mode == METAQ ? 1 : depth; /* metaq: the batch is done at MN */
    c->batch_ops = depth - 1;
    c->sent_at = now_us();
}

/* Consume complete replies from rbuf; returns how many completed. */
static int parse_replies(struct conn *c) {
    size_t pos = 0;
    int done = 0;
    for (;;) {
        char *eol = memmem(c->rbuf + pos, c->rlen - pos, "\r\n", 2);
        if (!eol) break;
        size_t linelen = eol - (c->rbuf + pos);
        if (linelen > 3 && memcmp(c->rbuf + pos, "VA ", 3) == 0) {
            /* VA bytes flags...: a meta hit, its data block follows */
            size_t need = linelen + 2 + (size_t)atol(c->rbuf + pos + 3) + 2;
            if (c->rlen - pos < need) break;
            pos += need;
            if (mode != METAQ) done++;
            continue;
        }
        if (linelen > 6 && memcmp(c->rbuf + pos, "VALUE ", 6) == 0) {
            /* VALUE key flags bytes: skip the data block and wait for END */
            char line[512];
            size_t l = linelen < sizeof line - 1 ? linelen : sizeof line - 1;
            memcpy(line, c->rbuf + pos, l);
            line[l] = 0;
            char *last = strrchr(line, ' ');
            long nbytes = last ? atol(last + 1) : 0;
            size_t need = linelen + 2 + nbytes + 2;
            if (c->rlen - pos < need) break;
            pos += need;
            continue;
        }
        if (!(linelen == 3 && memcmp(c->rbuf + pos, "END", 3) == 0) &&
            !(linelen == 6 && memcmp(c->rbuf + pos, "STORED", 6) == 0) &&
            !(linelen == 2 && (memcmp(c->rbuf + pos, "HD", 2) == 0 ||
                               memcmp(c->rbuf + pos, "EN", 2) == 0 ||
                               memcmp(c->rbuf + pos, "MN", 2) == 0))) {
            if (errors++ < 5) /* the first few, to say what the server answered */
                fprintf(stderr, "unexpected reply: %.*s\n", (int)(linelen > 200 ? 200 : linelen),
                        c->rbuf + pos);
        }
        pos += linelen + 2;
        done++;
    }
    memmove(c->rbuf, c->rbuf + pos, c->rlen - pos);
    c->rlen -= pos;
    return done;
}

/* Read or write what the socket (or TLS) takes now: >0 bytes, 0 would block, -1 gone. */
static ssize_t conn_read(struct conn *c, char *buf, size_t n) {
#ifdef WITH_TLS
    if (c->ssl) {
        int r = SSL_read(c->ssl, buf, (int)n);
        if (r > 0) return r;
        int err = SSL_get_error(c->ssl, r);
        return (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) ? 0 : -1;
    }
#endif
    ssize_t r = read(c->fd, buf, n);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    return r == 0 ? -1 : r;
}

static ssize_t conn_write(struct conn *c, const char *buf, size_t n) {
#ifdef WITH_TLS
    if (c->ssl) {
        int w = SSL_write(c->ssl, buf, (int)n);
        if (w > 0) return w;
        int err = SSL_get_error(c->ssl, w);
        return (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) ? 0 : -1;
    }
#endif
    ssize_t w = write(c->fd, buf, n);
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    return w;
}

/* Before the clock: memcached's -Y exchange, on a still blocking connection. */
static int authenticate(struct conn *c, const char *credentials) {
    char user_pass[512], request[640], reply[64];
    snprintf(user_pass, sizeof user_pass, "%s", credentials);
    char *colon = strchr(user_pass, ':');
    if (!colon) return -1;
    *colon = ' ';
    int n = snprintf(request, sizeof request, "set auth 0 0 %zu\r\n%s\r\n", strlen(user_pass),
                     user_pass);
    if (conn_write(c, request, n) != n) return -1;
    size_t got = 0;
    while (got < 8) {
        ssize_t r = conn_read(c, reply + got, sizeof reply - 1 - got);
        if (r <= 0) return -1;
        got += r;
    }
    return memcmp(reply, "STORED\r\n", 8) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
    int tls = 0;
    const char *credentials = NULL;
    while (argc > 1 && strncmp(argv[1], "--", 2) == 0) {
        if (strcmp(argv[1], "--tls") == 0) {
            tls = 1;
        } else if (strcmp(argv[1], "--auth") == 0 && argc > 2) {
            credentials = argv[2];
            argv++, argc--;
        } else {
            break;
        }
        argv++, argc--;
    }
    if (argc < 5) {
        fprintf(stderr, "usage: %s [--tls] [--auth USER:PASSWORD] HOST PORT CONNECTIONS SECONDS "
                "[DEPTH] [VALUE_SIZE] [KEYS] [MODE]\n", argv[0]);
        return 2;
    }
#ifdef WITH_TLS
    SSL_CTX *ctx = NULL;
    if (tls) {
        ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }
#else
    if (tls) {
        fprintf(stderr, "loadgen: built without TLS (OpenSSL's headers were not found)\n");
        return 2;
    }
#endif
    const char *host = argv[1];
    int port = atoi(argv[2]), nconns = atoi(argv[3]);
    double seconds = atof(argv[4]);
    if (argc > 5) depth = atoi(argv[5]);
    if (argc > 6) value_size = atoi(argv[6]);
    if (argc > 7) keys = atoi(argv[7]);
    if (argc > 8) {
        if (strcmp(argv[8], "meta") == 0) mode = META;
        else if (strcmp(argv[8], "metaq") == 0) mode = METAQ;
        else if (strcmp(argv[8], "text") != 0) {
            fprintf(stderr, "loadgen: MODE is text, meta or metaq\n");
            return 2;
        }
    }
    if (nconns < 1 || depth < (mode == METAQ ? 2 : 1) || value_size < 0 || keys < 1 || seconds <= 0) {
        fprintf(stderr, "loadgen: bad arguments\n");
        return 2;
    }
    value = malloc(value_size + 1);
    memset(value, 'v', value_size);
    value[value_size] = 0;
    lat = malloc(sizeof(double) * MAX_LAT_SAMPLES);

    int ep = epoll_create1(0);
    struct conn *conns = calloc(nconns, sizeof *conns);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad address %s\n", host);
        return 2;
    }
    for (int i = 0; i < nconns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            perror("loadgen: connect");
            return 1;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conns[i].fd = fd;
#ifdef WITH_TLS
        if (tls) {
            conns[i].ssl = SSL_new(ctx);
            SSL_set_fd(conns[i].ssl, fd);
            if (SSL_connect(conns[i].ssl) != 1) {
                fprintf(stderr, "loadgen: TLS handshake failed\n");
                ERR_print_errors_fp(stderr);
                return 1;
            }
        }
#endif
        if (credentials && authenticate(&conns[i], credentials) < 0) {
            fprintf(stderr, "loadgen: authentication refused\n");
            return 1;
        }
        fcntl(fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        build_batch(&conns[i]);
    }

    double start = now_us(), end = start + seconds * 1e6;
    struct epoll_event events[1024];
    while (now_us() < end) {
        int n = epoll_wait(ep, events, 1024, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if ((events[i].events & EPOLLOUT) && c->woff < c->wlen) {
                ssize_t w = conn_write(c, c->wbuf + c->woff, c->wlen - c->woff);
                if (w > 0) c->woff += w;
            }
            /* With TLS, OpenSSL may hold decrypted bytes the socket no longer signals. */
            int more = (events[i].events & EPOLLIN) != 0;
            while (more) {
                ssize_t r = conn_read(c, c->rbuf + c->rlen, RBUF - c->rlen);
                if (r < 0) {
                    fprintf(stderr, "loadgen: server closed a connection\n");
                    return 1;
                }
                more = 0;
#ifdef WITH_TLS
                more = r > 0 && c->ssl && SSL_pending(c->ssl) > 0;
#endif
                if (r > 0) {
                    c->rlen += r;
                    int done = parse_replies(c);
                    c->pending -= done;
                    ops += mode == METAQ ? 0 : done;
                    if (c->pending <= 0) {
                        ops += mode == METAQ ? c->batch_ops : 0;
                        if (nlat < MAX_LAT_SAMPLES) lat[nlat++] = now_us() - c->sent_at;
                        build_batch(c);
                        ssize_t w = conn_write(c, c->wbuf, c->wlen);
                        if (w > 0) c->woff = w;
                    }
                }
            }
        }
    }
    double elapsed = (now_us() - start) / 1e6;
    qsort(lat, nlat, sizeof(double), cmp_double);
    double median = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[(size_t)(nlat * 0.99)] : 0;
    printf("ops=%llu seconds=%.3f ops_per_sec=%.0f median_us=%.1f p99_us=%.1f errors=%llu\n",
           ops, elapsed, ops / elapsed, median, p99, errors);
    return errors ? 1 : 0;
}
