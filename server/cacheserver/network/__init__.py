"""Network layer: TCP connections and UDP framing. Bytes move here; meaning lives in protocol/."""


def format_address(protocol: str, address: tuple) -> str:
    """A socket address as memcached's ``stats conns`` writes it: ``tcp:1.2.3.4:11211``,
    ``tcp6:[::1]:11211``, ``udp:...``."""
    host, port = address[0], address[1]
    if ":" in host:
        return f"{protocol}6:[{host}]:{port}"
    return f"{protocol}:{host}:{port}"
