/* The request loop: lines, tokens, and the text protocol's get, gets and set. */
#include "protocol.h"

#include "store.h"

static const char END[] = "END\r\n";
static const char STORED[] = "STORED\r\n";

/* Run the requests at the start of buf that the fast path knows, appending their replies to
 * out. Returns the offset of the first request left for the Python session (len when none
 * is), or -1 with a Python error set. */
Py_ssize_t run_requests(Engine *e, const char *buf, Py_ssize_t len, OutBuf *out) {
    Py_ssize_t pos = 0;
    const char *tok[MAX_TOKENS];
    Py_ssize_t tlen[MAX_TOKENS];
    if (e->python_only)
        return 0;
    while (pos < len) {
        const char *line = buf + pos;
        const char *eol = memchr(line, '\n', len - pos);
        if (eol == NULL)
            return pos; /* a partial line: the session keeps it */
        const char *end = (eol - line > 1 && eol[-1] == '\r') ? eol - 1 : eol;
        if (memchr(line, '\0', end - line) != NULL)
            return pos; /* memcached ends the line at a NUL: the Python path does too */
        int ntok = 0;
        const char *p = line;
        while (p < end) {
            if (*p == ' ') {
                p++;
                continue;
            }
            if (ntok == MAX_TOKENS)
                return pos;
            const char *start = p;
            while (p < end && *p != ' ')
                p++;
            tok[ntok] = start;
            tlen[ntok++] = p - start;
        }
        if (ntok == 0)
            return pos; /* a blank line (tok[0] would be the last line's word) */
        Py_ssize_t next = eol + 1 - buf;
        int gets = tlen[0] == 4 && memcmp(tok[0], "gets", 4) == 0;
        if (ntok >= 2 && (gets || (tlen[0] == 3 && memcmp(tok[0], "get", 3) == 0))) {
            if (ntok == 2 && !gets && tlen[1] == (Py_ssize_t)CLUSTER_KEY_LEN
                && memcmp(tok[1], CLUSTER_KEY, CLUSTER_KEY_LEN) == 0)
                return pos;
            for (int i = 1; i < ntok; i++)
                if (tlen[i] > KEY_MAX_LENGTH)
                    return pos; /* the Python path answers with memcached's error */
            for (int i = 1; i < ntok; i++) {
                int hit = get_one(e, tok[i], tlen[i], gets, out);
                if (hit < 0)
                    return -1;
                e->deltas[C_CMD_GET]++;
                e->deltas[hit ? C_GET_HITS : C_GET_MISSES]++;
            }
            if (out_put(out, END, 5) < 0)
                return -1;
            pos = next;
            if (out->len > REPLY_LIMIT)
                return pos; /* the Python session holds back what is left (its reply_limit) */
            continue;
        }
        int noreply = ntok == 6 && tlen[5] == 7 && memcmp(tok[5], "noreply", 7) == 0;
        if ((ntok == 5 || noreply) && tlen[0] == 3 && memcmp(tok[0], "set", 3) == 0) {
            long long flags = parse_small(tok[2], tlen[2]);
            long long exptime = parse_small(tok[3], tlen[3]);
            long long nbytes = parse_small(tok[4], tlen[4]);
            Py_ssize_t klen = tlen[1];
            Py_ssize_t data_end = next + nbytes;
            if (flags < 0 || exptime < 0 || nbytes < 0 || (unsigned long long)nbytes > I32_MAX
                || klen > KEY_MAX_LENGTH || data_end + 2 > len || buf[data_end] != '\r'
                || buf[data_end + 1] != '\n')
                return pos;
            int r = set_request(e, tok[1], klen, (unsigned long long)flags,
                                (unsigned long long)exptime, buf + next, nbytes);
            if (r <= 0)
                return r < 0 ? -1 : pos;
            if (!noreply && out_put(out, STORED, 8) < 0)
                return -1;
            pos = data_end + 2;
            continue;
        }
        if (tlen[0] == 2 && tok[0][0] == 'm') {
            int r = run_meta(e, tok, tlen, ntok, buf, len, next, out, &pos);
            if (r <= 0)
                return r < 0 ? -1 : pos;
            continue;
        }
        return pos;
    }
    return pos;
}
