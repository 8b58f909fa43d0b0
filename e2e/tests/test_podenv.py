"""The node agent's env and command-line rules, checked against the kubelet's documented
behaviour without a cluster."""

from __future__ import annotations

import base64

import pytest

from e2e.podenv import ContainerConfigError, command_line, container_env, expand


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("x$(A)y$(B)z", "x1y2z"),
        ("$$(A)", "$(A)"),  # escaped: the reference stays literal
        ("$(MISSING)", "$(MISSING)"),  # unknown names are left as they are
        ("$(A", "$(A"),  # unterminated
        ("cost: $5 and $", "cost: $5 and $"),
        ("$$$(A)", "$1"),
    ],
)
def test_expand_follows_kubelet_rules(text, expected):
    assert expand(text, {"A": "1", "B": "2"}) == expected


POD = {
    "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
    "spec": {"nodeName": "node-2", "containers": []},
}


def lookups(configmaps=None, secrets=None):
    return (
        lambda ns, name: (configmaps or {}).get((ns, name)),
        lambda ns, name: (secrets or {}).get((ns, name)),
    )


def test_env_resolves_downward_api_and_references_in_order():
    container = {
        "name": "main",
        "resources": {"limits": {"memory": "1Gi", "cpu": "1500m"}},
        "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "NONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['x']"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {
                "name": "MILLI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}},
            },
            {"name": "REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory"}}},
            {"name": "LATER", "value": "$(EARLIER)"},  # defined below: not expanded
            {"name": "EARLIER", "value": "e"},
            {"name": "BOTH", "value": "$(POD)@$(IP)"},
        ],
    }
    env = container_env(POD, container, "127.0.9.2", {"memory": "8Gi"}, *lookups())
    assert env == {
        "POD": "web-0",
        "APP": "web",
        "NONE": "",
        "IP": "127.0.9.2",
        "MEM": str(1 << 30),
        "CPU": "2",  # rounded up, as the kubelet does
        "MILLI": "1500",
        "REQ": "0",
        "LATER": "$(EARLIER)",
        "EARLIER": "e",
        "BOTH": "web-0@127.0.9.2",
    }


def test_limits_default_to_node_allocatable():
    container = {
        "name": "main",
        "env": [{"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}}],
    }
    env = container_env(POD, container, "127.0.0.1", {"memory": "2Gi"}, *lookups())
    assert env["MEM"] == str(2 << 30)


def test_configmap_and_secret_values():
    configmaps = {("shop", "cfg"): {"mode": "fast", "bad key": "skipped"}}
    secrets = {("shop", "sec"): {"token": base64.b64encode(b"s3cret").decode()}}
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
            {
                "name": "OPT",
                "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    env = container_env(POD, container, "127.0.0.1", {}, *lookups(configmaps, secrets))
    assert env == {"CFG_mode": "fast", "TOKEN": "s3cret"}


def test_missing_configmap_is_a_config_error_naming_it():
    container = {
        "name": "main",
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}}],
    }
    with pytest.raises(ContainerConfigError, match="ConfigMap 'cfg' not found"):
        container_env(POD, container, "127.0.0.1", {}, *lookups())


def test_command_line_expands_and_needs_a_command():
    env = {"HOST_IP": "127.0.3.1"}
    container = {"name": "c", "command": ["cacheserver"], "args": ["-l", "$(HOST_IP)"]}
    assert command_line(container, env, {}) == ["cacheserver", "-l", "127.0.3.1"]
    imageonly = {"name": "c", "image": "registry.local/cache:1.0", "args": ["-v"]}
    with pytest.raises(ContainerConfigError, match="runs no images"):
        command_line(imageonly, env, {})
    entry = {"registry.local/cache": ["cacheserver"]}
    assert command_line(imageonly, env, entry) == ["cacheserver", "-v"]
