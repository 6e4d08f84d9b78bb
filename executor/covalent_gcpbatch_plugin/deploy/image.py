"""The worker image: which Python and Covalent it must carry, how Cloud Build builds it, and the
content digest that names it."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import DeployError

DOCKERFILE = "worker_image/Dockerfile"
#: Cloud Build's default timeout is 10 minutes; installing Covalent can take longer on a cold cache.
BUILD_TIMEOUT = "1800s"
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".mypy_cache"}


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        covalent_version = version("covalent")
    except PackageNotFoundError:
        raise DeployError(
            f"covalent is not installed in {sys.executable}: pass --python pointing at the environment "
            "you dispatch Covalent workflows from"
        ) from None
    try:
        version("covalent-gcpbatch-plugin")
    except PackageNotFoundError:
        print(
            f"deploy_helper: warning: covalent-gcpbatch-plugin is not installed in {sys.executable}; "
            "install it there, or Covalent will not find GCPBatchExecutor",
            file=sys.stderr,
        )
    return f"{sys.version_info.major}.{sys.version_info.minor} {covalent_version}"


def build_config(image: str, python_version: str, covalent_version: str) -> dict:
    build = [
        "build",
        "-f", DOCKERFILE,
        "--build-arg", f"PYTHON_VERSION={python_version}",
        "--build-arg", f"COVALENT_VERSION={covalent_version}",
        "-t", image,
        ".",
    ]  # fmt: skip
    return {"steps": [{"name": "gcr.io/cloud-builders/docker", "args": build}], "images": [image], "timeout": BUILD_TIMEOUT}


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            if child.name not in SKIPPED_PARTS and not child.name.endswith((".pyc", ".egg-info")):
                yield from _files(child)
    else:
        yield path


def digest(paths: Sequence[str], texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(b"text\0" + text.encode() + b"\0")
    for top in paths:
        top_path = Path(top)
        for path in _files(top_path):
            relative = path.relative_to(top_path).as_posix() if path != top_path else path.name
            h.update(b"file\0" + relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
