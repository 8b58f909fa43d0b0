"""A container's environment and command line, worked out from its pod the way the kubelet
does: envFrom then env in order, downward-API values (fieldRef, resourceFieldRef), ConfigMap
and Secret keys, and ``$(VAR)`` references expanded in env values, command and args.

Pods are plain dicts as the API server sends them (camelCase keys). Part of the e2e node
agent (test infrastructure, not product code)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from decimal import ROUND_CEILING, Decimal

from kubernetes.utils import parse_quantity


class ContainerConfigError(Exception):
    """The container cannot start yet: the kubelet's CreateContainerConfigError."""


# (namespace, name) -> the object's data (ConfigMap .data, Secret .data base64), None if absent
Lookup = Callable[[str, str], Mapping[str, str] | None]


def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand ``$(NAME)`` from ``env``; ``$$`` is a literal ``$``; unknown names stay as is."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$" or i + 1 == len(text):
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append("$")
            i += 1
    return "".join(out)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: Mapping, path: str, host_ip: str) -> str:
    """A downward-API ``fieldRef`` value; hostNetwork pods have podIP == hostIP."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    match = _SUBSCRIPT.match(path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    values = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
        "status.podIP": host_ip,
        "status.podIPs": host_ip,
    }
    if path not in values:
        raise ContainerConfigError(f"fieldRef {path!r} is not supported by the node agent")
    return values[path]


def container_by_name(pod: Mapping, name: str) -> Mapping:
    for c in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", []):
        if c["name"] == name:
            return c
    raise ContainerConfigError(f"resourceFieldRef names unknown container {name!r}")


def resource_value(
    pod: Mapping, container: Mapping, ref: Mapping, allocatable: Mapping[str, str]
) -> str:
    """A ``resourceFieldRef`` value: ceil(quantity / divisor); limits default to the node's
    allocatable and requests to 0, as the kubelet does."""
    target = container_by_name(pod, ref["containerName"]) if ref.get("containerName") else container
    kind, _, resource = ref["resource"].partition(".")
    resources = target.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None:
        raw = allocatable.get(resource, "0") if kind == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    if divisor == 0:  # the API server stores an unset divisor as 0; it means 1
        divisor = parse_quantity("1")
    value = parse_quantity(raw) / divisor
    return str(int(value.to_integral_value(rounding=ROUND_CEILING)))


def _key(lookup: Lookup, kind: str, namespace: str, ref: Mapping, decode: bool) -> str | None:
    data = lookup(namespace, ref["name"])
    optional = bool(ref.get("optional"))
    if data is None:
        if optional:
            return None
        raise ContainerConfigError(f"{kind} {ref['name']!r} not found")
    if ref["key"] not in data:
        if optional:
            return None
        raise ContainerConfigError(f"key {ref['key']!r} not found in {kind} {ref['name']!r}")
    value = data[ref["key"]]
    return base64.b64decode(value).decode() if decode else value


_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def container_env(
    pod: Mapping,
    container: Mapping,
    host_ip: str,
    allocatable: Mapping[str, str],
    configmaps: Lookup,
    secrets: Lookup,
) -> dict[str, str]:
    """The environment the container sees (without the image's own, which there is none of)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, ref_key, decode, lookup in (
            ("ConfigMap", "configMapRef", False, configmaps),
            ("Secret", "secretRef", True, secrets),
        ):
            ref = source.get(ref_key)
            if not ref:
                continue
            data = lookup(namespace, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f"{kind} {ref['name']!r} not found")
            for key, value in data.items():
                if _ENV_NAME.match(prefix + key):  # invalid names are skipped, as the kubelet does
                    env[prefix + key] = base64.b64decode(value).decode() if decode else value
    for var in container.get("env") or []:
        name = var["name"]
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand(var.get("value") or "", env)
        elif "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"], host_ip)
        elif "resourceFieldRef" in source:
            env[name] = resource_value(pod, container, source["resourceFieldRef"], allocatable)
        elif "configMapKeyRef" in source:
            value = _key(configmaps, "ConfigMap", namespace, source["configMapKeyRef"], False)
            if value is not None:
                env[name] = value
        elif "secretKeyRef" in source:
            value = _key(secrets, "Secret", namespace, source["secretKeyRef"], True)
            if value is not None:
                env[name] = value
        else:
            raise ContainerConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
    return env


def command_line(
    container: Mapping, env: Mapping[str, str], entrypoints: Mapping[str, list[str]]
) -> list[str]:
    """command + args with ``$(VAR)`` expanded. The agent runs no images, so a container
    without ``command`` needs an entry for its image in ``entrypoints``."""
    command = list(container.get("command") or [])
    if not command:
        image = container.get("image", "")
        repository = image.rsplit("@", 1)[0]
        if ":" in repository.rsplit("/", 1)[-1]:
            repository = repository.rsplit(":", 1)[0]
        if repository not in entrypoints:
            raise ContainerConfigError(
                f"container {container['name']!r} has no command and the node agent runs no "
                f"images: set spec.containers[].command (or map image {repository!r} to an "
                "entrypoint in the agent's configuration)"
            )
        command = list(entrypoints[repository])
    return [expand(part, env) for part in command + list(container.get("args") or [])]


def quantity_bytes(value: str | None) -> int | None:
    return None if value is None else int(parse_quantity(value))


def cpu_count(value: str | None) -> Decimal | None:
    return None if value is None else parse_quantity(value)
