/* The meta protocol's mg, ms and mn in their plain forms (protocol/meta.py defines them). */
#include "protocol.h"

#include "store.h"

/* A meta flag letter as a bit (the letters the fast path answers are all ASCII letters). */
static inline unsigned long long flag_bit(unsigned char c) {
    if (c >= 'a' && c <= 'z')
        return 1ULL << (c - 'a');
    if (c >= 'A' && c <= 'Z')
        return 1ULL << (26 + c - 'A');
    return 0;
}
#define FLAG(c) flag_bit((unsigned char)(c))

/* The flags of a meta request as bits, when every one is a flag the fast path answers: each
 * letter of ``allowed`` at most once, alone (``v``, not ``v1``), but O with its token, T and
 * F with digits, and M only as MS (ms's set mode, which is also what ms does without M).
 * 0 otherwise (anything else, errors included, is the Python path's). */
static unsigned long long meta_flags_plain(const char *const *tok, const Py_ssize_t *tlen,
                                           int from, int ntok, unsigned long long allowed) {
    unsigned long long seen = 1ULL << 63; /* never a letter: "no flags" is not 0 */
    for (int i = from; i < ntok; i++) {
        unsigned char c = (unsigned char)tok[i][0];
        unsigned long long bit = flag_bit(c);
        if (!(bit & allowed) || (seen & bit))
            return 0;
        seen |= bit;
        if (c == 'O') {
            if (tlen[i] > META_MAX_OPAQUE)
                return 0;
        } else if (c == 'T' || c == 'F') {
            if (parse_small(tok[i] + 1, tlen[i] - 1) < 0)
                return 0;
        } else if (c == 'M') {
            if (tlen[i] != 2 || tok[i][1] != 'S')
                return 0;
        } else if (tlen[i] != 1) {
            return 0;
        }
    }
    return seen;
}

/* The O and k flags, echoed in the client's order (what a miss and a store answer). */
static int meta_echo(const char *const *tok, const Py_ssize_t *tlen, int from, int ntok,
                     const char *key, Py_ssize_t klen, OutBuf *out) {
    for (int i = from; i < ntok; i++) {
        if (tok[i][0] == 'O') {
            if (out_put(out, " ", 1) < 0 || out_put(out, tok[i], tlen[i]) < 0)
                return -1;
        } else if (tok[i][0] == 'k') {
            if (out_put(out, " k", 2) < 0 || out_put(out, key, klen) < 0)
                return -1;
        }
    }
    return 0;
}

/* mg with the flags v k s f t c h l O q u (Meta.mg). 1 answered, 0 for the Python path
 * (an item with meta marks: stale, recache token, base64 key), -1 error. */
static int mg_one(Engine *e, const char *const *tok, const Py_ssize_t *tlen, int ntok,
                  unsigned long long flagbits, OutBuf *out) {
    const char *k = tok[1];
    Py_ssize_t klen = tlen[1];
    PyObject *key = PyBytes_FromStringAndSize(k, klen);
    if (key == NULL)
        return -1;
    /* Meta.mg's peek: expiry is the core's; a hit is counted after the reply (below). */
    PyObject *item = core_lookup(e->core, key, e->now);
    if (item == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    int rc = -1;
    if (item != NULL && ((const unsigned char *)PyBytes_AS_STRING(item))[MARKS_AT]) {
        rc = 0;
        goto done;
    }
    int quiet = (flagbits & FLAG('q')) != 0;
    e->deltas[C_CMD_GET]++;
    if (item == NULL) {
        e->deltas[C_GET_MISSES]++;
        if (!quiet && (out_put(out, "EN", 2) < 0 || meta_echo(tok, tlen, 2, ntok, k, klen, out) < 0
                       || out_put(out, "\r\n", 2) < 0))
            goto done;
        rc = 1;
        goto done;
    }
    e->deltas[C_GET_HITS]++;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(item);
    Py_ssize_t size = PyBytes_GET_SIZE(item);
    Py_ssize_t data_at = item_data_at(raw);
    Py_ssize_t nbytes = size - data_at - 2;
    unsigned int exptime = item_u32(raw, EXPTIME_AT), flags = item_u32(raw, FLAGS_AT);
    unsigned int bumped = item_u32(raw, BUMPED_AT);
    unsigned long long cas = item_cas(raw);
    int value = (flagbits & FLAG('v')) != 0;
    if (out_reserve(out, 24) < 0)
        goto done;
    if (value) {
        memcpy(out->data + out->len, "VA ", 3);
        out->len = put_decimal(out->data + out->len + 3, (unsigned long long)nbytes) - out->data;
    } else {
        memcpy(out->data + out->len, "HD", 2);
        out->len += 2;
    }
    for (int i = 2; i < ntok; i++) {
        int r = 0;
        switch (tok[i][0]) {
        case 's':
            r = out_u64(out, 's', (unsigned long long)nbytes);
            break;
        case 't':
            r = exptime == 0 ? out_put(out, " t-1", 4)
                             : out_u64(out, 't', (unsigned int)((long long)exptime - e->now));
            break;
        case 'c':
            r = out_u64(out, 'c', cas);
            break;
        case 'f':
            r = out_u64(out, 'f', flags);
            break;
        case 'l':
            r = out_u64(out, 'l', (unsigned int)(e->now - (long long)bumped));
            break;
        case 'h':
            r = out_put(out, (raw[META_AT] & FETCHED) ? " h1" : " h0", 3);
            break;
        case 'O':
            r = out_put(out, " ", 1) < 0 ? -1 : out_put(out, tok[i], tlen[i]);
            break;
        case 'k':
            r = out_put(out, " k", 2) < 0 ? -1 : out_put(out, k, klen);
            break;
        }
        if (r < 0)
            goto done;
    }
    if (out_put(out, "\r\n", 2) < 0 || (value && out_put(out, (const char *)raw + data_at,
                                                          size - data_at) < 0))
        goto done;
    /* The hit, as Store.amend(hit=True): the core's rule. */
    if (!(flagbits & FLAG('u'))) {
        item = core_hit(e->core, key, item, e->now);
        if (item == NULL)
            goto done;
    }
    rc = 1;
done:
    Py_XDECREF(item);
    Py_DECREF(key);
    return rc;
}

/* The meta branch of run_requests (protocol.h). */
int run_meta(Engine *e, const char *const *tok, const Py_ssize_t *tlen, int ntok,
             const char *buf, Py_ssize_t len, Py_ssize_t next, OutBuf *out, Py_ssize_t *pos) {
    if (tok[0][1] == 'n') { /* mn: the end of a quiet batch */
        if (out_put(out, "MN\r\n", 4) < 0)
            return -1;
        *pos = next;
        return 1;
    }
    if (ntok >= META_MAX_WORDS || ntok < 2 || tlen[1] > KEY_MAX_LENGTH)
        return 0;
    if (tok[0][1] == 'g') {
        unsigned long long flagbits = meta_flags_plain(
            tok, tlen, 2, ntok,
            FLAG('v') | FLAG('k') | FLAG('c') | FLAG('f') | FLAG('s') | FLAG('t')
                | FLAG('q') | FLAG('O') | FLAG('h') | FLAG('l') | FLAG('u'));
        if (!flagbits)
            return 0;
        int r = mg_one(e, tok, tlen, ntok, flagbits, out);
        if (r <= 0)
            return r < 0 ? -1 : 0;
        *pos = next;
        return out->len > REPLY_LIMIT ? 0 : 1;
    }
    if (tok[0][1] == 's' && ntok >= 3) { /* ms in set mode: Meta.complete_set */
        long long nbytes = parse_small(tok[2], tlen[2]);
        long long flags = 0, exptime = 0;
        unsigned long long flagbits = meta_flags_plain(
            tok, tlen, 3, ntok,
            FLAG('T') | FLAG('F') | FLAG('q') | FLAG('O') | FLAG('k') | FLAG('c')
                | FLAG('M'));
        if (nbytes < 0 || (unsigned long long)nbytes > I32_MAX - 2 || !flagbits)
            return 0;
        for (int i = 3; i < ntok; i++) {
            if (tok[i][0] == 'T')
                exptime = parse_small(tok[i] + 1, tlen[i] - 1);
            else if (tok[i][0] == 'F')
                flags = parse_small(tok[i] + 1, tlen[i] - 1);
        }
        Py_ssize_t klen = tlen[1];
        Py_ssize_t data_end = next + nbytes;
        if (flags < 0 || exptime < 0 || data_end + 2 > len || buf[data_end] != '\r'
            || buf[data_end + 1] != '\n')
            return 0;
        int r = set_request(e, tok[1], klen, (unsigned long long)flags,
                            (unsigned long long)exptime, buf + next, nbytes);
        if (r <= 0)
            return r;
        if (!(flagbits & FLAG('q'))) {
            if (out_put(out, "HD", 2) < 0)
                return -1;
            for (int i = 3; i < ntok; i++) {
                char c = tok[i][0];
                if ((c == 'O' || c == 'k') && meta_echo(tok, tlen, i, i + 1, tok[1], klen,
                                                        out) < 0)
                    return -1;
                if (c == 'c' && out_u64(out, 'c', e->core->last_cas) < 0)
                    return -1;
            }
            if (out_put(out, "\r\n", 2) < 0)
                return -1;
        }
        *pos = data_end + 2;
        return 1;
    }
    return 0;
}
