"""Writes a one-layer image as a docker archive (the format of `docker save`), no engine needed.

`docker load` and containerd (`ctr images import`) both read it. The archive is reproducible:
same files, same names, same bytes (every timestamp is the epoch), so an unchanged input
gives an unchanged image ID.

    python3 e2e/images/archive.py --ref registry.k8s.io/pause:3.10.2 --entrypoint /pause \\
        --user 65535:65535 --out pause.tar pause=build/pause

Each FILE argument is PATH_IN_IMAGE=LOCAL_PATH; directories above a path are created. Only
the standard library: scripts/image.sh runs it with the system's python3.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath

EPOCH = "1970-01-01T00:00:00Z"


def _entry(name: str, *, directory: bool = False, size: int = 0, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size, info.mode, info.mtime = size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def layer_tar(files: dict[str, Path]) -> bytes:
    """An uncompressed layer: the given files (mode kept, owner root) and their parents."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for target in sorted(files):
            path = PurePosixPath(target.lstrip("/"))
            for parent in reversed(path.parents[:-1]):
                if str(parent) not in made:
                    made.add(str(parent))
                    tar.addfile(_entry(f"{parent}/", directory=True, mode=0o755))
            data = files[target].read_bytes()
            mode = files[target].stat().st_mode & 0o7777
            tar.addfile(_entry(str(path), size=len(data), mode=mode), io.BytesIO(data))
    return out.getvalue()


def image_config(
    layer: bytes, *, entrypoint: list[str], user: str, architecture: str, labels: dict[str, str]
) -> bytes:
    config = {
        "architecture": architecture,
        "os": "linux",
        "created": EPOCH,
        "config": {
            "Entrypoint": entrypoint,
            "User": user,
            "WorkingDir": "/",
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": labels or None,
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
        "history": [{"created": EPOCH, "created_by": "e2e/images/archive.py"}],
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def write_archive(out: Path, refs: list[str], layer: bytes, config: bytes) -> str:
    """The docker archive at ``out`` (written whole, then renamed); returns the image ID."""
    config_hex = hashlib.sha256(config).hexdigest()
    layer_dir = hashlib.sha256(layer).hexdigest()
    manifest = [
        {"Config": f"{config_hex}.json", "RepoTags": refs, "Layers": [f"{layer_dir}/layer.tar"]}
    ]
    members = {
        f"{layer_dir}/layer.tar": layer,
        f"{config_hex}.json": config,
        "manifest.json": json.dumps(manifest, separators=(",", ":")).encode(),
    }
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_entry(f"{layer_dir}/", directory=True, mode=0o755))
        for name, data in members.items():
            tar.addfile(_entry(name, size=len(data), mode=0o644), io.BytesIO(data))
    os.replace(partial, out)
    return f"sha256:{config_hex}"


def _architecture() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ref", action="append", required=True, help="name:tag (repeatable)")
    parser.add_argument("--entrypoint", action="append", required=True)
    parser.add_argument("--user", default="0:0")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("files", nargs="+", metavar="PATH_IN_IMAGE=LOCAL_PATH")
    args = parser.parse_args(argv)
    files = {}
    for spec in args.files:
        target, sep, local = spec.partition("=")
        if not sep or not target or not local:
            parser.error(f"FILE must be PATH_IN_IMAGE=LOCAL_PATH, not {spec!r}")
        files[target] = Path(local)
    labels = dict(label.partition("=")[::2] for label in args.label)
    layer = layer_tar(files)
    config = image_config(
        layer,
        entrypoint=args.entrypoint,
        user=args.user,
        architecture=_architecture(),
        labels=labels,
    )
    print(write_archive(args.out, args.ref, layer, config))


if __name__ == "__main__":
    main()
