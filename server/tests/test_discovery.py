"""ElastiCache auto discovery: `config get cluster` and `get AmazonElastiCache:cluster`, byte
for byte, from a membership file swapped the way the kubelet updates a ConfigMap volume;
answered over TCP only; and a real auto-discovery client from PyPI finding every server."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from test_store import FakeClock

from cacheserver.discovery.membership import (
    CLUSTER_KEY,
    NOT_LOADED,
    Membership,
    MembershipError,
    Node,
    config_data,
    config_reply,
    parse_membership,
    value_reply,
)
from cacheserver.discovery.watch import ClusterConfig
from cacheserver.metrics.counters import Counters
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.session import UDP_REFUSED, UDP_SAFE_COMMANDS, TextSession
from cacheserver.storage import Store
from servers import (
    RunningServer,
    free_port,
    recv_until,
    request,
    scrape,
    start_cacheserver,
    start_memcached,
    wait_for_port,
)

THREE = [("cache-0.cache-headless.shop.svc", "10.0.0.1", 11211),
         ("cache-1.cache-headless.shop.svc", "10.0.0.2", 11211),
         ("cache-2.cache-headless.shop.svc", "10.0.0.3", 11211)]  # fmt: skip
# What an ElastiCache client reads for THREE at version 7: the data block, then its framing.
THREE_DATA = (
    b"7\n"
    b"cache-0.cache-headless.shop.svc|10.0.0.1|11211 "
    b"cache-1.cache-headless.shop.svc|10.0.0.2|11211 "
    b"cache-2.cache-headless.shop.svc|10.0.0.3|11211\n"
)


def membership_json(
    version: int, nodes: Sequence[tuple[str, str, int]], changed: str | None = None
) -> bytes:
    """A membership file as the operator writes it."""
    doc: dict = {
        "version": version,
        "nodes": [{"host": h, "ip": ip, "port": port} for h, ip, port in nodes],
    }
    if changed is not None:
        doc["changed"] = changed
    return json.dumps(doc).encode()


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume: the key is a symlink
    to ``..data/<key>``, ``..data`` a symlink to a timestamped directory, and an update
    writes a new directory and renames a new ``..data`` link over the old one."""

    def __init__(self, root: Path, key: str = "cluster.json") -> None:
        self.root = root
        self.key = key
        self.path = root / key
        self._generation = 0

    def publish(self, content: bytes) -> None:
        self._generation += 1
        target = self.root / f"..2030_01_01_00_00_{self._generation:02d}.000000001"
        target.mkdir()
        (target / self.key).write_bytes(content)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(target.name)
        tmp.rename(self.root / "..data")  # the atomic swap
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.key}")
        if old is not None:
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()


# ---- the reply format --------------------------------------------------------------------


def test_config_get_cluster_reply_is_elasticaches_byte_for_byte():
    membership = parse_membership(membership_json(7, THREE))
    data = config_data(membership)
    assert data == THREE_DATA
    assert config_reply(data) == b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(data), data)
    assert config_reply(data).startswith(b"CONFIG cluster 0 143\r\n7\ncache-0.")
    assert config_reply(data).endswith(b"|11211\n\r\nEND\r\n")
    # The same block as a stored value: how engines before 1.4.14 served it.
    assert value_reply(data) == b"VALUE AmazonElastiCache:cluster 0 143\r\n" + data + b"\r\nEND\r\n"


def test_the_byte_count_covers_the_block_exactly_for_any_size():
    for count in (0, 1, 2, 10, 500):
        nodes = [(f"c-{i}.h.ns.svc", f"10.1.0.{i % 250}", 11211 + i % 3) for i in range(count)]
        reply = config_reply(config_data(parse_membership(membership_json(12, nodes))))
        header, rest = reply.split(b"\r\n", 1)
        size = int(header.split(b" ")[3])
        assert rest[size:] == b"\r\nEND\r\n", count
        version, listed = rest[:size].decode().split("\n")[:2]
        assert version == "12"
        assert listed.split(" ") == ([f"{h}|{ip}|{p}" for h, ip, p in nodes] if nodes else [""])


def test_the_order_is_the_files():
    # The operator orders by partition, ordinal and worker; the server never reorders.
    shuffled = [THREE[2], THREE[0], THREE[1]]
    data = config_data(parse_membership(membership_json(1, shuffled)))
    assert [n.split("|")[0] for n in data.decode().split("\n")[1].split(" ")] == [
        h for h, _, _ in shuffled
    ]


def test_the_change_time_is_read_from_the_file():
    m = parse_membership(membership_json(3, THREE, changed="2030-01-01T00:00:00Z"))
    assert m == Membership(3, tuple(Node(*n) for n in THREE), changed=1893456000.0)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"nodes": []}', "version"),
        (b'{"version": -1, "nodes": []}', "version"),
        (b'{"version": true, "nodes": []}', "version"),
        (b'{"version": 1}', "nodes"),
        (b'{"version": 1, "nodes": [{"ip": "1.2.3.4", "port": 1}]}', "nodes[0].host"),
        (b'{"version": 1, "nodes": [{"host": "a b", "ip": "1", "port": 1}]}', "nodes[0].host"),
        (b'{"version": 1, "nodes": [{"host": "a|b", "ip": "1", "port": 1}]}', "nodes[0].host"),
        (b'{"version": 1, "nodes": [{"host": "a", "ip": "1", "port": 70000}]}', "nodes[0].port"),
        (b'{"version": 1, "nodes": [], "changed": "yesterday"}', "changed"),
        (b'{"version": 1, "nodes": [], "changed": "2030-01-01T00:00:00"}', "changed"),
    ],
)
def test_a_bad_file_is_refused_naming_the_field(content, named):
    with pytest.raises(MembershipError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_membership(content)


# ---- following the file ------------------------------------------------------------------


def test_a_configmap_swap_is_served_once_polled(tmp_path):
    volume = ConfigMapVolume(tmp_path)
    volume.publish(membership_json(1, THREE[:2], changed="2030-01-01T00:00:00Z"))
    clock = FakeClock(1893456000.0 + 4)
    served = ClusterConfig(str(volume.path), clock=clock)
    assert served.config_get() == NOT_LOADED and served.key_get() == b"END\r\n"
    assert served.poll() is True
    assert served.config_get().split(b"\r\n")[1] == THREE_DATA.replace(b"7", b"1", 1).replace(
        b" cache-2.cache-headless.shop.svc|10.0.0.3|11211", b""
    )
    assert served.poll() is False  # nothing moved: one stat(), no read

    volume.publish(membership_json(2, THREE, changed="2030-01-01T00:01:00Z"))
    clock.now = 1893456000.0 + 61
    assert served.poll() is True
    assert served.config_get() == config_reply(
        config_data(parse_membership(membership_json(2, THREE)))
    )
    fields = dict(served.stats_fields())
    assert fields["cluster_config_version"] == 2 and fields["cluster_config_nodes"] == 3
    assert fields["cluster_config_lag"] == 1  # changed at :01:00, served at :01:01
    clock.now += 30
    assert dict(served.stats_fields())["cluster_config_age"] == 31
    assert fields["cluster_config_requests"] == 4


def test_an_update_of_other_keys_is_no_change(tmp_path):
    # The kubelet rewrites the whole volume when any key changes (endpoints.json does on
    # every readiness change): same bytes for this key, nothing to do.
    volume = ConfigMapVolume(tmp_path)
    volume.publish(membership_json(4, THREE))
    served = ClusterConfig(str(volume.path))
    assert served.poll() is True
    volume.publish(membership_json(4, THREE))
    assert served.poll() is False
    assert served.membership is not None and served.membership.version == 4


def test_a_broken_or_missing_file_leaves_the_last_good_membership(tmp_path, caplog):
    volume = ConfigMapVolume(tmp_path)
    volume.publish(membership_json(5, THREE))
    served = ClusterConfig(str(volume.path))
    served.poll()
    good = served.config_get()
    volume.publish(b'{"version": 6, "nodes": [{"host": "x y"}]}')
    assert served.poll() is False
    assert served.config_get() == good and served.load_errors == 1
    assert "nodes[0].host" in caplog.text and "still serving version 5" in caplog.text

    volume.path.unlink()
    assert served.poll() is False and served.poll() is False
    assert served.config_get() == good
    assert served.load_errors == 2  # a missing file is counted (and logged) once

    volume.path.symlink_to("..data/cluster.json")
    volume.publish(membership_json(6, THREE[:1]))
    assert served.poll() is True
    assert served.config_get().split(b"\r\n")[1].startswith(b"6\n")


# ---- the protocol ------------------------------------------------------------------------


def _session(tmp_path: Path, discovery: bool = True, udp: bool = False) -> TextSession:
    volume = ConfigMapVolume(tmp_path)
    volume.publish(membership_json(7, THREE))
    served = ClusterConfig(str(volume.path))
    served.poll()
    commands = Commands(Store(1 << 20), Counters(), "test")
    return TextSession(
        commands,
        allowed=UDP_SAFE_COMMANDS if udp else None,
        discovery=served if discovery else None,
    )


def test_the_session_answers_both_forms_among_other_requests(tmp_path):
    session = _session(tmp_path)
    out = session.feed(
        b"set k 0 0 1\r\nv\r\nconfig get cluster\r\nget AmazonElastiCache:cluster\r\n"
        b"get k\r\nconfig get other\r\nconfig\r\n"
    )
    assert out == (
        b"STORED\r\n"
        + config_reply(THREE_DATA)
        + value_reply(THREE_DATA)
        + b"VALUE k 0 1\r\nv\r\nEND\r\n"
        + b"ERROR\r\nERROR\r\n"
    )


def test_without_a_membership_both_are_what_memcached_makes_of_them(tmp_path):
    session = _session(tmp_path, discovery=False)
    assert session.feed(b"config get cluster\r\n") == b"ERROR\r\n"
    # Just a key: a client may store under it, as in memcached.
    assert session.feed(b"get AmazonElastiCache:cluster\r\n") == b"END\r\n"
    assert session.feed(b"set AmazonElastiCache:cluster 0 0 1\r\nx\r\n") == b"STORED\r\n"
    assert session.feed(b"get AmazonElastiCache:cluster\r\n").startswith(b"VALUE ")


def test_the_udp_session_never_answers_discovery(tmp_path):
    session = _session(tmp_path, discovery=False, udp=True)
    assert session.feed(b"config get cluster\r\n") == UDP_REFUSED
    session.reset()
    assert session.feed(b"get " + CLUSTER_KEY + b"\r\n") == b"END\r\n"


# ---- over sockets ------------------------------------------------------------------------


@pytest.fixture
def volume(tmp_path) -> ConfigMapVolume:
    volume = ConfigMapVolume(tmp_path)
    volume.publish(membership_json(7, THREE, changed="2030-01-01T00:00:00Z"))
    return volume


@pytest.fixture
def discovering(volume) -> Iterator[RunningServer]:
    server = start_cacheserver("--cluster-config", str(volume.path))
    yield server
    server.stop()


def _until(check, what: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return result


def test_a_server_answers_over_tcp_and_follows_the_file(discovering, volume):
    assert request(discovering, b"config get cluster\r\n", b"END\r\n") == config_reply(THREE_DATA)
    assert request(discovering, b"get AmazonElastiCache:cluster\r\n", b"END\r\n") == (
        value_reply(THREE_DATA)
    )
    # The compiled fast path leaves the key to the session, also among other gets.
    with socket.create_connection(discovering.address, timeout=5) as sock:
        sock.sendall(b"set a 0 0 1\r\n1\r\nget a\r\nget AmazonElastiCache:cluster\r\nget a\r\n")
        reply = recv_until(sock, b"VALUE a 0 1\r\n1\r\nEND\r\n")
    assert reply == (
        b"STORED\r\nVALUE a 0 1\r\n1\r\nEND\r\n"
        + value_reply(THREE_DATA)
        + b"VALUE a 0 1\r\n1\r\nEND\r\n"
    )

    volume.publish(membership_json(8, THREE[:2], changed="2030-01-01T00:05:00Z"))
    expected = config_reply(config_data(parse_membership(membership_json(8, THREE[:2]))))
    # The worker polls the file once a second.
    _until(
        lambda: request(discovering, b"config get cluster\r\n", b"END\r\n") == expected,
        "version 8 served",
    )
    from test_udp import stat

    assert stat(discovering, "cluster_config_version") == 8
    assert stat(discovering, "cluster_config_nodes") == 2
    assert stat(discovering, "cluster_config_requests") >= 4
    settings = request(discovering, b"stats settings\r\n", b"END\r\n")
    assert b"STAT cluster_config %s\r\n" % str(volume.path).encode() in settings


def test_udp_answers_as_memcached_to_an_unknown_command(volume):
    """No discovery over UDP: a 20-byte request must not bring back a list of every server
    to a forged source address."""
    from test_udp import reassemble, udp_exchange

    guarded = start_cacheserver("--cluster-config", str(volume.path))
    open_udp = start_cacheserver("--cluster-config", str(volume.path), "--udp-allow-all")
    memcached = start_memcached()
    try:
        for payload in (b"config get cluster\r\n", b"get AmazonElastiCache:cluster\r\n"):
            theirs = reassemble(udp_exchange(memcached, payload))
            assert reassemble(udp_exchange(open_udp, payload)) == theirs
        assert theirs == b"END\r\n"
        assert reassemble(udp_exchange(open_udp, b"config get cluster\r\n")) == b"ERROR\r\n"
        # By default UDP refuses it as it refuses any command outside the get/set family.
        assert reassemble(udp_exchange(guarded, b"config get cluster\r\n")) == reassemble(
            udp_exchange(guarded, b"stats\r\n")
        )
        # ... while TCP answers.
        assert request(guarded, b"config get cluster\r\n", b"END\r\n") == config_reply(THREE_DATA)
    finally:
        for server in (guarded, open_udp, memcached):
            server.stop()


def test_every_worker_answers_and_the_metrics_show_the_version(volume):

    metrics_port = free_port()
    server = start_cacheserver(
        "-t", "2", "--cluster-config", str(volume.path), "--metrics-port", str(metrics_port)
    )
    try:
        wait_for_port(server.port + 1, server.proc)
        for port in (server.port, server.port + 1):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"config get cluster\r\n")
                assert recv_until(sock, b"END\r\n") == config_reply(THREE_DATA)
        samples = scrape(server, metrics_port)
    finally:
        server.stop()
    for worker in ("0", "1"):
        label = (("worker", worker),)
        assert samples[("cacheappliance_cluster_config_version", label)] == 7
        assert samples[("cacheappliance_cluster_config_nodes", label)] == 3
        assert samples[("cacheappliance_cluster_config_requests_total", label)] == 1
        assert samples[("cacheappliance_cluster_config_load_errors_total", label)] == 0
        # Changed on 2030-01-01: the clock here is earlier, so no age and no lag yet.
        assert samples[("cacheappliance_cluster_config_age_seconds", label)] == 0


def test_one_worker_exports_the_discovery_metrics(volume):

    volume.publish(membership_json(9, THREE, changed="2001-01-01T00:00:00Z"))
    metrics_port = free_port()
    server = start_cacheserver(
        "--cluster-config", str(volume.path), "--metrics-port", str(metrics_port)
    )
    try:
        samples = scrape(server, metrics_port)
    finally:
        server.stop()
    assert samples[("cacheappliance_cluster_config_version", ())] == 9
    assert samples[("cacheappliance_cluster_config_nodes", ())] == 3
    age = samples[("cacheappliance_cluster_config_age_seconds", ())]
    lag = samples[("cacheappliance_cluster_config_lag_seconds", ())]
    assert age > 25 * 365 * 86400 and lag == pytest.approx(age, abs=60)


# ---- a real auto-discovery client --------------------------------------------------------


def test_an_elasticache_client_from_pypi_discovers_every_server_and_spreads_keys(tmp_path):
    """django-elastipymemcache's AWSElastiCacheClient (pymemcache underneath) is given one
    address, asks it `config get cluster`, and hashes keys over every server listed; when
    the membership grows it picks up the new server on its next discovery."""
    from django_elastipymemcache.client import AWSElastiCacheClient

    volume = ConfigMapVolume(tmp_path)
    shards = [start_cacheserver(udp=False) for _ in range(4)]
    served: list[RunningServer] = []
    try:
        members = [(f"cache-{i}.h.t.svc", "127.0.0.1", s.port) for i, s in enumerate(shards)]
        volume.publish(membership_json(1, members[:3]))
        # Every shard serves the same file; the client knows only the first.
        served = [start_cacheserver("--cluster-config", str(volume.path), udp=False)]
        client = AWSElastiCacheClient(
            f"127.0.0.1:{served[0].port}", discovery_interval=0.2, connect_timeout=3, timeout=3
        )
        assert sorted(client.clients) == sorted(f"127.0.0.1:{s.port}" for s in shards[:3])
        for i in range(300):
            assert client.set(f"key-{i}", b"v%d" % i)
        from test_udp import stat

        items = [stat(s, "curr_items") for s in shards]
        assert sum(items) == 300 and all(n > 30 for n in items[:3]) and items[3] == 0, items
        assert client.get("key-7") == b"v7"

        volume.publish(membership_json(2, members))
        _until(lambda: stat(served[0], "cluster_config_version") == 2, "version 2 served")
        time.sleep(0.3)  # past the client's discovery interval
        client.get("key-0")
        assert len(client.clients) == 4
        for i in range(300, 600):
            client.set(f"key-{i}", b"v")
        assert stat(shards[3], "curr_items") > 0
        client.close()
    finally:
        for server in shards + served:
            server.stop()
