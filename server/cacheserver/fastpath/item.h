/* The item bytes of storage/item.py, as store.c and meta.c read and write them: a header
 * (cas:u64, exptime:u32, flags:u32, bumped:u32, meta:u8, marks:u8, little-endian, at the
 * offsets of constants.h), then the reply suffix " <flags> <bytes>\r\n", the data, "\r\n". */
#ifndef CACHESERVER_FASTPATH_ITEM_H
#define CACHESERVER_FASTPATH_ITEM_H

#include "constants.h"

static inline unsigned int le32(const unsigned char *p) {
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16)
        | ((unsigned int)p[3] << 24);
}

#endif
