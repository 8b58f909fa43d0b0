"""The images the e2e nodes run, built by scripts/image.sh and cached by content.

    image = images.appliance()   # cache-appliance:<version>, the chart's default image
    sandbox = images.pause()     # registry.k8s.io/pause:3.10.2 (and :3.10.1), our pause.c

Each call builds what is stale (the first project image build takes minutes: Docker, maybe
a locally made base image) and returns where the archive is. A node imports it with
``ctr -n k8s.io images import <archive>``; containerd names the project image
``docker.io/library/cache-appliance:<version>``, which is what a pod's ``cache-appliance:<version>``
means. ``id`` is the image's config digest: ``crictl inspecti <ref>`` reports the same, so a
node whose image has another ID holds a stale one.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from e2e.base import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "image.sh"
# A cold build of the project image: debootstrap of a base, then the Dockerfile.
BUILD_TIMEOUT = 1800.0


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    ref: str  # the name pods use
    archive: Path  # a docker archive (`docker save` format)
    id: str  # sha256:<config digest>
    key: str  # the content key of the build inputs


def _built(option: str) -> Image:
    result = subprocess.run(
        [str(SCRIPT), option],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-40:])
        raise ImageError(f"scripts/image.sh {option} failed ({result.returncode}):\n{tail}")
    archive = Path(result.stdout.strip())
    stamp = archive.with_name(archive.name + ".stamp")
    fields = dict(line.partition("=")[::2] for line in stamp.read_text().splitlines())
    return Image(ref=fields["ref"], archive=archive, id=fields["id"], key=fields["key"])


def appliance() -> Image:
    """The project's image (Dockerfile): cacheserver and cacheoperator."""
    return _built("--print-archive")


def pause() -> Image:
    """The pod sandbox image: e2e/images/pause.c, static, alone in one layer."""
    return _built("--print-pause-archive")


@dataclass(frozen=True)
class NodeImages:
    """What every e2e node imports, and the reference pods (and the chart) use."""

    ref: str
    archives: tuple[Path, ...]


def for_nodes() -> NodeImages:
    project, sandbox = appliance(), pause()
    return NodeImages(project.ref, (project.archive, sandbox.archive))
