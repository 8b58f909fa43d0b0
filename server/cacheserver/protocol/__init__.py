"""Protocol layer: memcached's text protocol. Parses request bytes, runs commands against the
store, formats response bytes. No sockets here: the network layer feeds bytes in and writes
what comes out."""
