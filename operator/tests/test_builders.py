"""What the builders make of a spec: the properties that matter, per strategy and option.
(The whole objects are pinned in golden files by test_golden.py.)"""

from __future__ import annotations

import pytest

from cacheoperator.children import configmap, desired_objects
from cacheoperator.models import Endpoint
from cacheoperator.placement import HOSTNAME_KEY, MIN_DOMAINS_FOR_CAP
from cacheoperator.quantity import to_decimal
from operator_testkit import REF, UID, env_of, of_kind, server_container, spec_of

IMAGE = "registry.example/cache-appliance:1.0"


def build(**fields):
    return desired_objects(REF, spec_of(**fields), IMAGE)


def pod_spec(sts):
    return sts["spec"]["template"]["spec"]


def only_statefulset(objects):
    (sts,) = of_kind(objects, "StatefulSet")
    return sts


@pytest.mark.parametrize(
    "placement, names",
    [
        ({"strategy": "cluster"}, ["demo"]),
        ({"strategy": "spread"}, ["demo"]),
        ({"strategy": "partition", "partitions": 3}, ["demo-p1", "demo-p2", "demo-p3"]),
    ],
)
def test_one_statefulset_per_partition_and_the_shared_objects(placement, names):
    objects = build(placement=placement)
    assert [o["metadata"]["name"] for o in of_kind(objects, "StatefulSet")] == names
    assert [(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "StatefulSet"] == [
        ("ConfigMap", "demo-config"),
        ("Service", "demo-headless"),
        ("Service", "demo"),
        ("Service", "demo-discovery"),
        ("PodDisruptionBudget", "demo"),
    ]


def test_every_object_is_owned_by_the_cluster_for_garbage_collection():
    for obj in build(placement={"strategy": "partition", "partitions": 2}):
        assert obj["metadata"]["namespace"] == "cache"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "cache.appliance.io/v1alpha1",
                "kind": "CacheCluster",
                "name": "demo",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cacheoperator"


def test_replicas_are_divided_among_partitions():
    objects = build(replicas=7, placement={"strategy": "partition", "partitions": 3})
    assert [s["spec"]["replicas"] for s in of_kind(objects, "StatefulSet")] == [3, 2, 2]


@pytest.mark.parametrize(
    "resources, pinning",
    [({"cpu": 2, "memory": "2Gi"}, True), ({"cpu": "500m", "memory": "256Mi"}, False)],
)
def test_pods_are_guaranteed_qos(resources, pinning):
    container = server_container(only_statefulset(build(resources=resources, pinning=pinning)))
    limits = container["resources"]["limits"]
    # Guaranteed: requests equal limits for both CPU and memory.
    assert container["resources"]["requests"] == limits == resources
    if pinning:
        cpu = to_decimal(limits["cpu"])
        assert cpu == cpu.to_integral_value() and cpu >= 1  # static CPU manager: exclusive
        assert "--pin" in container["args"]
    else:
        assert "--pin" not in container["args"]


def test_host_network_uses_cluster_dns_host_ports_and_the_node_address():
    sts = only_statefulset(build(udp={"enabled": True}))
    pod = pod_spec(sts)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    container = server_container(sts)
    assert all(p["hostPort"] == p["containerPort"] for p in container["ports"])
    env = env_of(container)
    assert env["CACHESERVER_LISTEN"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert container["readinessProbe"]["exec"]["command"] == ["cacheserver-probe"]


def test_pod_network_listens_everywhere_and_probes_loopback():
    sts = only_statefulset(build(hostNetwork=False))
    pod = pod_spec(sts)
    assert pod["hostNetwork"] is False
    assert pod["dnsPolicy"] == "ClusterFirst"
    container = server_container(sts)
    assert all("hostPort" not in p for p in container["ports"])
    assert "CACHESERVER_LISTEN" not in env_of(container)
    assert container["livenessProbe"]["exec"]["command"] == [
        "cacheserver-probe",
        "-l",
        "127.0.0.1",
    ]


def test_downward_api_environment():
    env = env_of(server_container(only_statefulset(build())))
    assert env["CACHESERVER_CONTAINER_MEMORY_LIMIT"] == {
        "resourceFieldRef": {
            "containerName": "cacheserver",
            "resource": "limits.memory",
            "divisor": "1",
        }
    }
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert "CACHESERVER_PARTITION" not in env  # only partition pods have one


def test_partition_pods_learn_their_partition_from_their_label():
    for number, sts in enumerate(
        of_kind(build(placement={"strategy": "partition", "partitions": 2}), "StatefulSet"),
        start=1,
    ):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert labels["cache.appliance.io/partition"] == str(number)
        env = env_of(server_container(sts))
        assert env["CACHESERVER_PARTITION"] == {
            "fieldRef": {"fieldPath": "metadata.labels['cache.appliance.io/partition']"}
        }


def test_memory_auto_never_guesses_a_size():
    container = server_container(only_statefulset(build()))
    assert env_of(container)["CACHESERVER_MEMORY_LIMIT"] == "auto"
    assert "-m" not in container["args"] and "--memory-limit" not in container["args"]
    assert "CACHESERVER_MEMORY_HEADROOM" not in env_of(container)


def test_memory_fixed_and_headroom_are_passed_in_mib():
    env = env_of(
        server_container(
            only_statefulset(
                build(
                    resources={"memory": "2Gi"},
                    memory={"mode": "fixed", "size": "1.5Gi", "headroom": 134217728},
                )
            )
        )
    )
    assert env["CACHESERVER_MEMORY_LIMIT"] == "1536"
    assert env["CACHESERVER_MEMORY_HEADROOM"] == "128"


def test_workers_publish_one_port_each_and_all_are_probed():
    spec = {"workers": 3, "resources": {"cpu": 3}, "udp": {"enabled": True, "port": 12000}}
    objects = build(**spec)
    container = server_container(only_statefulset(objects))
    ports = {(p["name"], p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports == {
        ("tcp-0", 11211, "TCP"),
        ("tcp-1", 11212, "TCP"),
        ("tcp-2", 11213, "TCP"),
        ("udp-0", 12000, "UDP"),
        ("udp-1", 12001, "UDP"),
        ("udp-2", 12002, "UDP"),
        ("metrics", 21211, "TCP"),  # port + 10000
    }
    env = env_of(container)
    assert (env["CACHESERVER_WORKERS"], env["CACHESERVER_UDP_PORT"]) == ("3", "12000")
    assert container["readinessProbe"]["exec"]["command"] == [
        "sh",
        "-c",
        "cacheserver-probe -p 11211 && cacheserver-probe -p 11212 && cacheserver-probe -p 11213",
    ]
    client, headless = (
        next(o for o in of_kind(objects, "Service") if o["metadata"]["name"] == n)
        for n in ("demo", "demo-headless")
    )
    assert [p["name"] for p in client["spec"]["ports"]] == [
        "tcp-0",
        "tcp-1",
        "tcp-2",
        "udp-0",
        "udp-1",
        "udp-2",
    ]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][-1]["name"] == "metrics"


def test_udp_off_means_port_zero_and_no_udp_ports():
    container = server_container(only_statefulset(build()))
    assert env_of(container)["CACHESERVER_UDP_PORT"] == "0"
    assert all(p["protocol"] == "TCP" for p in container["ports"])


def test_monitoring_off_drops_the_metrics_port_and_scrape_annotations():
    sts = only_statefulset(build(monitoring={"enabled": False}))
    container = server_container(sts)
    assert env_of(container)["CACHESERVER_METRICS_PORT"] == "0"
    assert all(p["name"] != "metrics" for p in container["ports"])
    assert "annotations" not in sts["spec"]["template"]["metadata"]


def test_monitoring_on_annotates_pods_for_prometheus():
    annotations = only_statefulset(build())["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "21211",
        "prometheus.io/path": "/metrics",
    }


def test_pods_are_locked_down():
    sts = only_statefulset(build())
    pod = pod_spec(sts)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] > 0
    security = server_container(sts)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_cluster_strategy_packs_into_one_zone_and_prefers_one_rack():
    affinity = pod_spec(only_statefulset(build(placement={"strategy": "cluster"})))["affinity"]
    (required,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required == {
        "labelSelector": {"matchLabels": {"cache.appliance.io/cluster": "demo"}},
        "topologyKey": "topology.kubernetes.io/zone",
    }
    (preferred,) = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "topology.cache.appliance.io/rack"
    assert "podAntiAffinity" not in affinity


@pytest.mark.parametrize(
    "level, key",
    [(None, HOSTNAME_KEY), ("host", HOSTNAME_KEY), ("rack", "topology.cache.appliance.io/rack")],
)
def test_spread_strategy_keeps_pods_apart(level, key):
    placement = {"strategy": "spread", "maxPerZone": 3}
    if level:
        placement["spreadLevel"] = level
    pod = pod_spec(only_statefulset(build(placement=placement)))
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == key
    assert term["labelSelector"] == {"matchLabels": {"cache.appliance.io/cluster": "demo"}}
    hard, soft = pod["topologySpreadConstraints"]
    # maxPerZone is a hard cap: minDomains above any possible replica count makes the
    # scheduler compare each zone with 0, so maxSkew is the most pods one zone can hold.
    assert (hard["maxSkew"], hard["whenUnsatisfiable"]) == (3, "DoNotSchedule")
    assert hard["minDomains"] == MIN_DOMAINS_FOR_CAP > 1000
    assert hard["topologyKey"] == soft["topologyKey"] == "topology.kubernetes.io/zone"
    assert (soft["maxSkew"], soft["whenUnsatisfiable"]) == (1, "ScheduleAnyway")


def test_spread_defaults_to_seven_per_zone():
    pod = pod_spec(only_statefulset(build(placement={"strategy": "spread"})))
    assert pod["topologySpreadConstraints"][0]["maxSkew"] == 7


def test_partition_strategy_keeps_partitions_off_each_others_racks():
    objects = build(placement={"strategy": "partition", "partitions": 3, "rackKey": "rack"})
    for number, sts in enumerate(of_kind(objects, "StatefulSet"), start=1):
        affinity = pod_spec(sts)["affinity"]
        (term,) = affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "rack"
        assert term["labelSelector"]["matchLabels"] == {"cache.appliance.io/cluster": "demo"}
        assert term["labelSelector"]["matchExpressions"] == [
            {"key": "cache.appliance.io/partition", "operator": "NotIn", "values": [str(number)]}
        ]
        assert "topologySpreadConstraints" not in pod_spec(sts)
        # ... and keep to the racks their own partition already uses, so that the
        # scheduler's zone spreading does not let one partition take the racks of the next.
        (preferred,) = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert preferred["weight"] == 100
        assert preferred["podAffinityTerm"] == {
            "labelSelector": {
                "matchLabels": {
                    "cache.appliance.io/cluster": "demo",
                    "cache.appliance.io/partition": str(number),
                }
            },
            "topologyKey": "rack",
        }


@pytest.mark.parametrize(
    "placement, keys",
    [
        ({"strategy": "cluster", "zoneKey": "zone"}, ["zone"]),
        ({"strategy": "spread", "zoneKey": "zone"}, ["zone"]),
        ({"strategy": "spread", "spreadLevel": "rack", "zoneKey": "z", "rackKey": "r"}, ["z", "r"]),
        ({"strategy": "partition", "partitions": 2, "rackKey": "rack"}, ["rack"]),
    ],
)
def test_nodes_without_the_labels_a_strategy_relies_on_are_excluded(placement, keys):
    # Otherwise the scheduler treats an unlabelled node as a topology domain of its own
    # and the placement guarantee silently fails.
    for sts in of_kind(build(placement=placement), "StatefulSet"):
        node = pod_spec(sts)["affinity"]["nodeAffinity"]
        (term,) = node["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert term["matchExpressions"] == [{"key": k, "operator": "Exists"} for k in keys]


def test_node_selector_tolerations_image_and_extra_args_reach_the_pod():
    sts = only_statefulset(
        build(
            image="mirror.example/cache:2",
            imagePullPolicy="IfNotPresent",
            nodeSelector={"pool": "cache"},
            tolerations=[{"key": "dedicated", "operator": "Equal", "value": "cache"}],
            extraArgs=["-c", "4096"],
        )
    )
    pod = pod_spec(sts)
    assert pod["nodeSelector"] == {"pool": "cache"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "cache"}]
    container = server_container(sts)
    assert (container["image"], container["imagePullPolicy"]) == (
        "mirror.example/cache:2",
        "IfNotPresent",
    )
    assert container["command"] == ["cacheserver"]
    assert container["args"] == ["--pin", "-c", "4096"]


def test_the_default_image_is_used_when_the_spec_names_none():
    assert server_container(only_statefulset(build()))["image"] == IMAGE


def test_statefulset_selectors_are_disjoint_and_match_their_pods():
    objects = build(placement={"strategy": "partition", "partitions": 3})
    selectors = []
    for sts in of_kind(objects, "StatefulSet"):
        selector = sts["spec"]["selector"]["matchLabels"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        selectors.append(selector["cache.appliance.io/statefulset"])
        assert sts["spec"]["serviceName"] == "demo-headless"
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert selectors == ["demo-p1", "demo-p2", "demo-p3"]
    for service in of_kind(objects, "Service"):
        assert service["spec"]["selector"] == {"cache.appliance.io/cluster": "demo"}
    (pdb,) = of_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == {"matchLabels": {"cache.appliance.io/cluster": "demo"}}


def test_the_configmap_lists_settings_and_endpoints():
    endpoints = [
        Endpoint(pod="demo-0", address="10.0.0.1", port=11211, worker=0, zone="a"),
        Endpoint(pod="demo-1", address="10.0.0.2", port=11211, worker=0, zone="b"),
    ]
    data = configmap(REF, spec_of(), endpoints)["data"]
    assert data["servers"] == "10.0.0.1:11211\n10.0.0.2:11211\n"
    assert "CACHESERVER_MEMORY_LIMIT=auto\n" in data["cacheserver.env"]
    assert '"zone": "b"' in data["endpoints.json"]


def test_pods_mount_the_membership_and_the_server_is_told_where():
    for sts in of_kind(build(placement={"strategy": "partition", "partitions": 2}), "StatefulSet"):
        pod = pod_spec(sts)
        (volume,) = [v for v in pod["volumes"] if v["name"] == "discovery"]
        # The whole key, never a subPath: the kubelet swaps it in place when it changes.
        assert volume["configMap"] == {
            "name": "demo-config",
            "items": [{"key": "cluster.json", "path": "cluster.json"}],
            "optional": True,
        }
        container = server_container(sts)
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "discovery"]
        assert mount == {"name": "discovery", "mountPath": "/etc/cacheserver/discovery",
                         "readOnly": True}  # fmt: skip
        path = env_of(container)["CACHESERVER_CLUSTER_CONFIG"]
        assert path == mount["mountPath"] + "/cluster.json"


def test_the_discovery_service_is_one_address_for_every_appliance():
    objects = build(port=12000, workers=2, resources={"cpu": 2}, udp={"enabled": True})
    (service,) = [
        s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("-discovery")
    ]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == {"cache.appliance.io/cluster": "demo"}
    # Worker 0's TCP port: any worker answers with the whole list, and never over UDP.
    assert service["spec"]["ports"] == [
        {"name": "memcached", "port": 12000, "targetPort": 12000, "protocol": "TCP"}
    ]


def test_building_twice_gives_the_same_objects():
    spec = {"placement": {"strategy": "partition", "partitions": 3}, "udp": {"enabled": True}}
    assert build(**spec) == build(**spec)


def test_warm_restart_is_on_by_default_with_a_node_directory_per_pod():
    sts = only_statefulset(build())
    pod = pod_spec(sts)
    container = server_container(sts)
    ns, name = REF.namespace, REF.name
    assert env_of(container)["CACHESERVER_MEMORY_FILE"] == "/var/lib/cacheserver/warm/snapshot"
    (volume,) = [v for v in pod["volumes"] if "hostPath" in v]
    assert volume["hostPath"] == {"path": "/dev/shm/cache-appliance", "type": "DirectoryOrCreate"}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    # Each pod sees only its own directory: namespace, cluster, and its name (the ordinal).
    assert mount["subPathExpr"] == f"{ns}/{name}/$(POD_NAME)"
    assert mount["mountPath"] == "/var/lib/cacheserver/warm"
    (init,) = pod["initContainers"]
    assert init["command"] == ["cacheserver-warm-dir"]
    assert init["args"][:2] == ["/warm", f"{ns}/{name}/$(POD_NAME)"]
    assert init["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"],
    }
    assert init["resources"]["requests"] == init["resources"]["limits"]  # still Guaranteed
    # New pods wait for the operator to point them at their snapshot's node (gate.py).
    assert pod["schedulingGates"] == [{"name": "cache.appliance.io/placement"}]


@pytest.mark.parametrize("memory, grace", [("1Gi", 41), ("8Gi", 116), ("64Gi", 718)])
def test_the_grace_period_covers_saving_the_whole_memory_limit(memory, grace):
    sts = only_statefulset(build(resources={"memory": memory}))
    assert pod_spec(sts)["terminationGracePeriodSeconds"] == grace
    # ... and the start-up probe waits as long for the restore before liveness may kill it.
    startup = server_container(sts)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= grace


def test_warm_restart_off_leaves_no_trace_in_the_pod():
    sts = only_statefulset(build(warmRestart={"enabled": False}))
    pod = pod_spec(sts)
    container = server_container(sts)
    assert "CACHESERVER_MEMORY_FILE" not in env_of(container)
    assert "initContainers" not in pod and "startupProbe" not in container
    assert "schedulingGates" not in pod  # nothing to come back to: the scheduler decides
    assert all("hostPath" not in v for v in pod["volumes"])
    assert pod["terminationGracePeriodSeconds"] == 30


def test_warm_restart_host_path_is_the_users_choice_but_must_be_a_plain_absolute_path():
    sts = only_statefulset(build(warmRestart={"hostPath": "/run/cache"}))
    (volume,) = [v for v in pod_spec(sts)["volumes"] if "hostPath" in v]
    assert volume["hostPath"]["path"] == "/run/cache"
    for bad in ("relative/dir", "/", "/a/../b", "/a b"):
        with pytest.raises(ValueError, match=r"host_?[pP]ath"):
            spec_of(warmRestart={"hostPath": bad})
