"""Golden files: the complete objects each case builds, as YAML a person can review.

A change to the builders shows up as a diff of operator/tests/golden/*.yaml. After an
intended change, regenerate them and read the diff before committing:

    UPDATE_GOLDEN=1 .venv/bin/pytest operator/tests/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cacheoperator import yamlfmt
from cacheoperator.children import desired_objects
from cacheoperator.models import CacheClusterManifest, DiscoveryNode, DiscoveryStatus, Endpoint
from cacheoperator.naming import ClusterRef
from operator_testkit import UID, load_example

GOLDEN = Path(__file__).parent / "golden"
IMAGE = "cache-appliance:golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def _manifest(name: str, spec: dict) -> dict:
    return {"metadata": {"name": name}, "spec": spec}


# case name -> (what it shows, manifest, endpoints for the ConfigMap)
CASES = {
    "example-cluster": ("examples/cachecluster-cluster.yaml", "cachecluster-cluster.yaml", []),
    "example-spread": ("examples/cachecluster-spread.yaml", "cachecluster-spread.yaml", []),
    "example-partition": (
        "examples/cachecluster-partition.yaml",
        "cachecluster-partition.yaml",
        [
            Endpoint(pod="cache-part-p1-0", node="n1", address="10.0.1.1", port=11211, worker=0,
                     partition=1, zone="zone-a", rack="rack-1"),
            Endpoint(pod="cache-part-p2-0", node="n2", address="10.0.2.1", port=11211, worker=0,
                     partition=2, zone="zone-a", rack="rack-2"),
        ],
    ),
    "example-secured": ("examples/cachecluster-secured.yaml", "cachecluster-secured.yaml", []),
    "plaintext-next-to-tls": (
        "TLS with a plaintext port next to it, two workers, on the pod network",
        _manifest("mixed", {"hostNetwork": False, "workers": 2, "resources": {"cpu": 2},
                            "tls": {"secretName": "mixed-tls", "plaintextPort": 11311}}),
        [],
    ),
    "plaintext-next-to-tls-host": (
        "TLS with a plaintext port next to it and UDP, on the node's network",
        _manifest("mixedhost", {"tls": {"secretName": "mixed-tls", "plaintextPort": 11311},
                                "udp": {"enabled": True}}),
        [],
    ),
    "spread-rack": (
        "spread across racks, at most 2 per zone",
        _manifest("racks", {"replicas": 4, "placement": {"strategy": "spread",
                                                          "spreadLevel": "rack", "maxPerZone": 2}}),
        [],
    ),
    "pod-network": (
        "no hostNetwork, no pinning, fractional CPU",
        _manifest("podnet", {"hostNetwork": False, "pinning": False,
                             "resources": {"cpu": "500m", "memory": "256Mi"}}),
        [],
    ),
    "fixed-memory": (
        "memory mode fixed with headroom",
        _manifest("fixed", {"replicas": 1, "resources": {"memory": "2Gi"},
                            "memory": {"mode": "fixed", "size": "1536Mi", "headroom": "128Mi"}}),
        [],
    ),
    "warm-restart-off": (
        "warm restart off: no node directory, no init container, the usual grace period",
        _manifest("cold", {"replicas": 1, "warmRestart": {"enabled": False}}),
        [],
    ),
    "options": (
        "image, pull policy, nodeSelector, tolerations, extraArgs, monitoring off, UDP, "
        "warm restart on another node directory",
        _manifest("opts", {
            "image": "mirror.example/cache-appliance:1.2",
            "imagePullPolicy": "IfNotPresent",
            "nodeSelector": {"pool": "cache"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "cache",
                             "effect": "NoSchedule"}],
            "extraArgs": ["-c", "4096", "--idle-timeout", "300"],
            "monitoring": {"enabled": False},
            "udp": {"enabled": True, "port": 11311},
            "placement": {"strategy": "cluster", "zoneKey": "example.com/zone"},
            "warmRestart": {"hostPath": "/run/cache-appliance"},
        }),
        [Endpoint(pod="opts-0", node="n1", address="10.0.0.7", port=11211, udp_port=11311,
                  worker=0, zone="z1")],
    ),
}  # fmt: skip


# case name -> the membership published for auto discovery (the others: none yet, version 0)
DISCOVERY = {
    "example-partition": DiscoveryStatus(
        endpoint="cache-part-discovery.cache.svc:11211",
        version=4,
        last_change_time="2030-01-01T00:00:00Z",
        nodes=[
            DiscoveryNode(pod=f"cache-part-p{p}-0", worker=0, address=f"10.0.{p}.1", port=11211,
                          host=f"cache-part-p{p}-0.cache-part-headless.cache.svc")
            for p in (1, 2)
        ],
    ),
    "options": DiscoveryStatus(
        endpoint="opts-discovery.cache.svc:11211",
        version=1,
        last_change_time="2030-01-01T00:00:00Z",
        nodes=[DiscoveryNode(pod="opts-0", worker=0, address="10.0.0.7", port=11211,
                             host="opts-0.opts-headless.cache.svc")],
    ),
}  # fmt: skip


def _render(case: str) -> str:
    about, source, endpoints = CASES[case]
    raw = load_example(source) if isinstance(source, str) else source
    manifest = CacheClusterManifest.model_validate(raw)
    ref = ClusterRef(name=manifest.metadata.name, namespace="cache", uid=UID)
    objects = desired_objects(ref, manifest.spec, IMAGE, endpoints, DISCOVERY.get(case))
    header = (
        f"# Golden file for case {case!r}: {about}.\n"
        "# Regenerate: UPDATE_GOLDEN=1 .venv/bin/pytest operator/tests/test_golden.py\n"
    )
    return header + yamlfmt.dump_all(objects)


@pytest.mark.parametrize("case", sorted(CASES))
def test_builders_match_the_golden_file(case):
    path = GOLDEN / f"{case}.yaml"
    rendered = _render(case)
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert path.exists(), f"no golden file {path.name}: run with UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), (
        f"{path.name} differs from what the builders make; if the change is intended, "
        "run with UPDATE_GOLDEN=1 and review the diff"
    )


def test_no_stray_golden_files():
    assert sorted(p.stem for p in GOLDEN.glob("*.yaml")) == sorted(CASES)
