"""The worker image: which Python and Covalent it must carry, how Cloud Build builds it, and the
content digest that names it."""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import DeployError
from ..local.worker_env import context_files

DOCKERFILE = "worker_image/Dockerfile"
#: Where the Dockerfile reads the user's packages from (empty in the checkout: the default image).
EXTRA_REQUIREMENTS = "worker_image/extra-requirements.txt"
#: Cloud Build's default timeout is 10 minutes; installing Covalent can take longer on a cold cache.
BUILD_TIMEOUT = "1800s"


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


def stage_context(dest: Path, requirements: Path | None = None) -> str:
    """Copy into ``dest`` the build context of the worker image: the Dockerfile and what its build
    stage copies (local/worker_env.py reads the Dockerfile), nothing else; with ``requirements``,
    the user's packages in place of the empty extra-requirements.txt. Returns its digest, which
    names the image: a changed source or requirement gets a new image."""
    from ..local import worker_env

    if not worker_env.available():
        raise DeployError(f"{worker_env.DOCKERFILE} not found: this installation does not carry the worker image's sources")
    if dest.exists():
        shutil.rmtree(dest)
    sources = [DOCKERFILE]
    for argument in worker_env.parse_dockerfile()[0].all("COPY"):
        sources += worker_env.copy_sources(argument, {})[0]
    with worker_env.build_context() as root:  # the checkout, or the installed package's sources
        for source in sources:
            for path in context_files(root / source):
                target = dest / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    if requirements is not None:
        if not requirements.is_file():
            raise DeployError(f"--requirements {requirements}: no such file")
        shutil.copy2(requirements, dest / EXTRA_REQUIREMENTS)
    return digest([str(dest)], [])


def build_config(image: str, python_version: str, covalent_version: str) -> dict:
    build = [
        "build",
        "-f", DOCKERFILE,
        "--build-arg", f"PYTHON_VERSION={python_version}",
        "--build-arg", f"COVALENT_VERSION={covalent_version}",
        "-t", image,
        ".",
    ]  # fmt: skip
    return {
        "steps": [{"name": "gcr.io/cloud-builders/docker", "args": build}],
        "images": [image],
        "timeout": BUILD_TIMEOUT,
        # A build that runs as a user-specified service account must say where its logs go.
        "options": {"logging": "CLOUD_LOGGING_ONLY"},
    }


def digest(paths: Sequence[str], texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(b"text\0" + text.encode() + b"\0")
    for top in paths:
        top_path = Path(top)
        for path in context_files(top_path):
            relative = path.relative_to(top_path).as_posix() if path != top_path else path.name
            h.update(b"file\0" + relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
