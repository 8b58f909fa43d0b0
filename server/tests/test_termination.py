"""A server that cannot run says why in the file Kubernetes reads as the container's
termination message (the kubelet creates it; here an empty file stands in for it)."""

from __future__ import annotations

import socket

from cacheserver.termination import MAX_BYTES, record_fatal
from servers import free_port, run_to_exit

MIB = 1 << 20


def test_a_limit_too_small_leaves_its_numbers_as_the_termination_message(tmp_path):
    log = tmp_path / "termination-log"
    log.touch()
    limit = {"CACHESERVER_CONTAINER_MEMORY_LIMIT": str(40 * MIB)}
    proc = run_to_exit(log, "-p", str(free_port()), env=limit)
    assert proc.returncode == 2
    message = log.read_text()
    assert message.startswith("cannot size memory: the memory limit 40.0 MiB (env) leaves")
    assert "raise the limit or lower --memory-headroom" in message


def test_a_port_in_use_is_the_termination_message(tmp_path):
    log = tmp_path / "termination-log"
    log.touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_to_exit(log, "-p", str(port), "-m", "8")
    assert proc.returncode == 1
    assert log.read_text().startswith("cannot start: ")
    assert "address already in use" in log.read_text().lower()


def test_a_worker_names_itself_and_its_supervisor_does_not_overwrite_it(tmp_path):
    log = tmp_path / "termination-log"
    log.touch()
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        proc = run_to_exit(log, "-p", str(port), "-t", "2", "-m", "8")
    assert proc.returncode == 1
    message = log.read_text()
    assert message.startswith("worker 1 cannot start: "), message
    assert "address already in use" in message.lower()


def test_nothing_is_created_outside_kubernetes(tmp_path):
    missing = tmp_path / "termination-log"
    limit = {"CACHESERVER_CONTAINER_MEMORY_LIMIT": str(40 * MIB)}
    proc = run_to_exit(missing, "-p", str(free_port()), env=limit)
    assert proc.returncode == 2
    assert not missing.exists()
    assert b"cannot size memory" in proc.stderr  # the log still says it


def test_the_first_reason_wins_and_the_size_is_capped(tmp_path):
    log = tmp_path / "termination-log"
    log.touch()
    assert record_fatal(str(log), "x" * (MAX_BYTES + 100))
    assert not record_fatal(str(log), "later")
    assert log.read_text() == "x" * MAX_BYTES
