/* The item bytes of storage/item.py, as store.c and meta.c read and write them. */
#ifndef CACHESERVER_FASTPATH_ITEM_H
#define CACHESERVER_FASTPATH_ITEM_H

/* The item layout of cacheserver/storage/item.py: a <QIIIBB header (cas, exptime, flags,
 * bumped, meta, marks), then the reply suffix. fastpath/__init__.py checks these against it. */
#define HEADER_SIZE 22
#define EXPTIME_AT 8
#define FLAGS_AT 12
#define BUMPED_AT 16
#define META_AT 20
#define MARKS_AT 21
#define FETCHED 0x80
#define BUMP_INTERVAL 60      /* storage/store.py: a hit moves an item at most this often */

static inline unsigned int le32(const unsigned char *p) {
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16)
        | ((unsigned int)p[3] << 24);
}

#endif
