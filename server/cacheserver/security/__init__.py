"""Who may talk to the server: memcached's text-protocol authentication (``-Y``, the
credentials file) and TLS (``-Z``, certificates). Both read files that the kubelet swaps in
place when a Secret changes, and both take a changed file without a restart."""
