"""The gateway image of docker runtimes: the host's nginx, copied into an image built offline.

No image registry is reachable and a build must not use the network, so the image is made
``FROM scratch`` out of the worker host's own nginx binary and the shared libraries it
links (as ``ldd`` lists them, the dynamic loader included), plus ``/etc/passwd`` and
``/etc/group`` naming ``nobody``. It depends on no base image and no package mirror at
build time, and is tagged by a digest of those files: another nginx on the host gives
another image, the same one is never built twice. nginx must be installed on the host of
the runtime's worker (``apt-get install nginx-light``; ``scripts/system-deps.sh`` installs it).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from mlc.errors import DeploymentFailedError

NGINX_ENV = "MLC_NGINX"
"""The nginx binary to run (local) or copy into the gateway image (docker); default: PATH."""
IMAGE_REPOSITORY = "mlc-gateway"
DIGEST_LABEL = "mlc.gateway-digest"

_DOCKERFILE = b"""\
FROM scratch
COPY rootfs/ /
USER 65534:65534
ENTRYPOINT ["/usr/sbin/nginx"]
"""
_PASSWD = (
    b"root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
_LDD_PATH = re.compile(r"(/\S+)")


def nginx_binary() -> Path:
    """The host's nginx: ``MLC_NGINX``, else ``nginx`` on PATH or in ``/usr/sbin``.

    Raises:
        DeploymentFailedError: none is installed (saying how to install it).
    """
    found = os.environ.get(NGINX_ENV) or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not found or not Path(found).is_file():
        raise DeploymentFailedError(
            "runtime gateways need nginx on the worker's host, and none is installed: run "
            f"`apt-get install nginx-light` (or set {NGINX_ENV} to an nginx binary)"
        )
    return Path(found)


def _libraries(binary: Path) -> list[str]:
    """Absolute paths of the shared libraries ``binary`` loads, from ``ldd``."""
    try:
        listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DeploymentFailedError(f"cannot list the libraries of {binary} with ldd: {exc}") from exc
    paths = []
    for line in listing.splitlines():
        line = line.split("=>")[-1]
        match = _LDD_PATH.search(line)
        if match and Path(match.group(1)).exists():
            paths.append(match.group(1))
    return sorted(set(paths))


def build_context() -> tuple[bytes, str]:
    """The gzip-free tar build context of the gateway image, and its digest."""
    binary = nginx_binary()
    files: dict[str, bytes] = {"usr/sbin/nginx": binary.read_bytes()}
    for library in _libraries(binary):
        files[library.lstrip("/")] = Path(library).read_bytes()  # symlinks followed: real content
    files["etc/passwd"] = _PASSWD
    files["etc/group"] = _GROUP
    digest = hashlib.sha256(_DOCKERFILE)
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, data: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        add("Dockerfile", _DOCKERFILE, 0o644)
        for name, data in sorted(files.items()):
            add(f"rootfs/{name}", data, 0o644 if name.startswith("etc/") else 0o755)
        tmp = tarfile.TarInfo("rootfs/tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
    return buffer.getvalue(), digest.hexdigest()[:16]


def ensure_gateway_image(client: Any) -> str:
    """The id of the gateway image for the host's nginx, built when missing (blocking)."""
    context, digest = build_context()
    found = client.images.list(filters={"label": f"{DIGEST_LABEL}={digest}"})
    if found:
        return str(found[0].id)
    image, _ = client.images.build(
        fileobj=io.BytesIO(context),
        custom_context=True,
        tag=f"{IMAGE_REPOSITORY}:{digest}",
        labels={DIGEST_LABEL: digest},
        rm=True,
        forcerm=True,
        network_mode="none",
    )
    return str(image.id)
