"""The images the nodes run (scripts/image.sh): the pod sandbox's pause program and its image,
and the project's image run the way the chart runs it (read-only root, uid 10001, host
network). The pause tests need only a C compiler; the project image needs a Docker engine, or
root for the private daemon the script starts."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from cacheoperator.naming import DEFAULT_IMAGE
from e2e import images
from testkit.net import free_port

CHART = images.REPO_ROOT / "charts" / "cache-operator"
# A cold build: a Debian base made with debootstrap, then the Dockerfile (minutes).
BUILD_TIMEOUT = 1800


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_archive(archive: Path) -> tuple[dict, dict, dict[str, tarfile.TarInfo], bytes]:
    """manifest entry, image config, layer members by name, and the first layer's bytes."""
    with tarfile.open(archive) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))
        config_bytes = tar.extractfile(entry["Config"]).read()
        layer = tar.extractfile(entry["Layers"][0]).read()
    with tarfile.open(fileobj=io.BytesIO(layer)) as inner:
        members = {m.name: m for m in inner.getmembers()}
    return entry, {"bytes": config_bytes, **json.loads(config_bytes)}, members, layer


# ---- pause -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pause_image() -> images.Image:
    if not shutil.which("gcc"):
        pytest.skip("the pause program needs gcc (and glibc's static library, libc6-dev)")
    return images.pause()


@pytest.fixture(scope="module")
def pause_binary(pause_image, tmp_path_factory) -> Path:
    *_, layer = read_archive(pause_image.archive)
    binary = tmp_path_factory.mktemp("pause") / "pause"
    with tarfile.open(fileobj=io.BytesIO(layer)) as inner:
        binary.write_bytes(inner.extractfile("pause").read())
    binary.chmod(0o755)
    return binary


def elf_interpreter(binary: bytes) -> bool:
    """Whether an ELF64 executable names a dynamic loader (PT_INTERP): static ones don't."""
    assert binary[:5] == b"\x7fELF\x02", "not an ELF64 executable"
    (phoff,) = struct.unpack_from("<Q", binary, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", binary, 0x36)
    types = [struct.unpack_from("<I", binary, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 in types


def test_pause_archive_is_the_sandbox_image_containerd_expects(pause_image):
    entry, config, members, layer = read_archive(pause_image.archive)
    # containerd 2.3's default sandbox image first, 2.2's too.
    assert pause_image.ref == "registry.k8s.io/pause:3.10.2"
    assert entry["RepoTags"] == ["registry.k8s.io/pause:3.10.2", "registry.k8s.io/pause:3.10.1"]
    assert pause_image.id == sha256(config["bytes"])
    assert entry["Config"] == pause_image.id.removeprefix("sha256:") + ".json"
    assert config["rootfs"]["diff_ids"] == [sha256(layer)]
    assert config["config"]["Entrypoint"] == ["/pause"]
    assert config["config"]["User"] == "65535:65535"
    assert list(members) == ["pause"]
    assert members["pause"].mode & 0o111
    with tarfile.open(fileobj=io.BytesIO(layer)) as inner:
        assert not elf_interpreter(inner.extractfile("pause").read()), "pause is not static"


def test_pause_image_is_cached_and_reproducible(pause_image):
    before = pause_image.archive.stat().st_mtime_ns
    again = images.pause()
    assert again == pause_image
    assert again.archive.stat().st_mtime_ns == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pause_waits_until_told_to_stop_then_exits_0(pause_binary, sig):
    proc = subprocess.Popen([pause_binary], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        assert proc.poll() is None, "pause returned on its own"
        proc.send_signal(sig)
        assert proc.wait(timeout=5) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is pid."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append((int(stat.parent.name), fields[0]))
    return found


def zombies_left_under(init: list[str]) -> int:
    """Runs init as PID 1 of a new PID namespace, orphans a short-lived process in it and
    counts the zombies init has not reaped a second after that process ended."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", *init])
    try:
        deadline = time.monotonic() + 10
        while not (inside := children(proc.pid)):
            assert time.monotonic() < deadline, "the namespace's init did not start"
            time.sleep(0.05)
        init_pid = inside[0][0]
        subprocess.run(
            ["nsenter", f"--target={init_pid}", "--pid", "--", "sh", "-c", "sleep 0.2 & exit 0"],
            check=True,
            timeout=10,
        )
        time.sleep(1.2)
        return sum(state == "Z" for _, state in children(init_pid))
    finally:
        # unshare ignores SIGTERM while it waits; --kill-child takes init down with it.
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace (unshare --pid) needs root")
@pytest.mark.skipif(not shutil.which("unshare"), reason="needs util-linux's unshare and nsenter")
def test_pause_as_pid_1_reaps_orphans(pause_binary):
    # The check itself: an init that never waits (sleep) keeps the orphan as a zombie.
    assert zombies_left_under(["sleep", "60"]) == 1
    assert zombies_left_under([str(pause_binary)]) == 0


# ---- the project's image -----------------------------------------------------------------------


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """docker against the engine scripts/image.sh builds with (a private daemon for this one
    command where no engine runs)."""
    return subprocess.run(
        [str(images.SCRIPT), "--docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def appliance_image() -> images.Image:
    engine = shutil.which("docker") and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30
    )
    if os.geteuid() != 0 and not (engine and engine.returncode == 0):
        pytest.skip("building the image needs a Docker engine, or root to run a private one")
    image = images.appliance()
    # The engine may have lost the image (a pruned or deleted data root) while the archive,
    # still fresh, was kept: it gets it back from the archive.
    if docker("image", "inspect", image.ref).returncode != 0:
        loaded = docker("load", "-i", str(image.archive), timeout=600)
        assert loaded.returncode == 0, loaded.stderr
    return image


AS_THE_CHART_RUNS_IT = ["run", "--rm", "--network", "host", "--read-only", "--user", "10001"]


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_chart_and_the_operator_default_to_the_built_image(appliance_image):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == ""  # the chart's appVersion, then
    expected = f"{values['image']['repository']}:{chart['appVersion']}"
    assert appliance_image.ref == expected == DEFAULT_IMAGE
    with tarfile.open(appliance_image.archive) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))
        config_bytes = tar.extractfile(entry["Config"]).read()
    assert entry["RepoTags"] == [expected]
    assert sha256(config_bytes) == appliance_image.id
    labels = json.loads(config_bytes)["config"]["Labels"]
    assert labels["io.cache-appliance.inputs"] == appliance_image.key


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_image_runs_both_commands_read_only_as_10001_with_the_fast_path(appliance_image):
    script = (
        "id -u; cacheserver --version; cacheoperator --version;"
        " python -c 'import cacheserver.fastpath._fastpath as f; print(f.__name__)';"
        " if touch /probe 2>/dev/null; then echo root-writable; else echo root-read-only; fi"
    )
    result = docker(*AS_THE_CHART_RUNS_IT, appliance_image.ref, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    version = DEFAULT_IMAGE.partition(":")[2]
    assert result.stdout.split("\n") == [
        "10001",
        f"cacheserver {version}",
        f"cacheoperator {version}",
        "cacheserver.fastpath._fastpath",
        "root-read-only",
        "",
    ]


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_image_serves_on_the_host_network(appliance_image):
    port = free_port()
    serve = ["cacheserver", "-l", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        [str(images.SCRIPT), "--docker", *AS_THE_CHART_RUNS_IT, appliance_image.ref, *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not listen within 60 s"
                time.sleep(0.2)
        with conn:
            conn.sendall(b"version\r\n")
            reply = conn.recv(1024)
        version = DEFAULT_IMAGE.partition(":")[2]
        assert reply.startswith(b"VERSION ")
        assert reply.endswith(f"cacheserver-{version}\r\n".encode())
    finally:
        # The docker client passes SIGTERM to the server; the script then stops its daemon.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
