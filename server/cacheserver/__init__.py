"""cacheserver: a memcached-compatible cache server (text protocol over TCP and UDP)."""

__version__ = "0.1.0"
