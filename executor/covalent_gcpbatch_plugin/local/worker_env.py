"""The worker image's Python environment, without Docker: the local stack's workers run in it.

There is no Docker engine, so the local Batch service runs each job's worker as a host process;
what that process can import must still be what the image has, or a task that forgets a
``ct.DepsPip`` passes locally and fails on Google Cloud. This module builds a virtualenv from
``worker_image/Dockerfile`` itself: its build stage's COPY lines are replayed into a scratch
directory (a file the Dockerfile forgets to copy is missing here too) and its ``pip install``
lines are run with the build arguments deploy.sh passes (this interpreter's Python and covalent
versions). The Dockerfile is the one list of what the image holds.

Built environments are cached by a digest of everything that goes into them (the Dockerfile, the
files it copies, the build arguments), under ``~/.cache/covalent-gcpbatch/worker-envs/``; a build
takes about half a minute on a warm pip cache. The sources come from the checkout, or in an
installed wheel from the package itself: its ``assets/source`` (worker_image/, functions/,
pyproject.toml, README.md, copied into the wheel) and the installed package as ``executor/``
(``build_context()``). ``available()`` says whether this installation has the Dockerfile.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import venv
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

from ..errors import StackError

#: The installed package, and the repository root of a source checkout (the package is
#: executor/covalent_gcpbatch_plugin/ there).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = Path(__file__).resolve().parents[3]
#: What the wheel carries of the repository (links into it in a checkout): worker_image/, functions/...
PACKAGED_SOURCES = PACKAGE_DIR / "assets" / "source"
#: A source checkout: the package is its executor/covalent_gcpbatch_plugin.
CHECKOUT = (REPO_ROOT / "worker_image" / "Dockerfile").is_file() and (
    (REPO_ROOT / "executor" / PACKAGE_DIR.name).resolve() == PACKAGE_DIR)
DOCKERFILE = (REPO_ROOT if CHECKOUT else PACKAGED_SOURCES) / "worker_image" / "Dockerfile"
#: The build context's top-level entries outside a checkout: name -> where it is in the installation.
INSTALLED_CONTEXT = {"worker_image": "worker_image", "functions": "functions", "pyproject.toml": "pyproject.toml",
                     "README.md": "README.md"}
#: .dockerignore keeps these out of the build context (``assets``: what ``covalent deploy`` uses,
#: Terraform's working files among them; the worker never deploys).
IGNORED_PARTS = ("__pycache__", ".pytest_cache", ".mypy_cache", "assets")
IGNORED_SUFFIXES = (".pyc", ".egg-info")
#: The same, for shutil.copytree.
COPY_IGNORE = shutil.ignore_patterns(*IGNORED_PARTS, *(f"*{suffix}" for suffix in IGNORED_SUFFIXES))
PIP_TIMEOUT_S = 900
#: Environments kept in the cache; older ones unused for STALE_S are removed when one is built.
KEEP = 3
STALE_S = 24 * 3600
COMPLETE_MARKER = ".complete"


@dataclass
class Stage:
    base: str
    name: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword, argument = keyword.upper(), argument.strip()
        if keyword == "FROM":
            base, _, name = argument.partition(" AS ")
            stages.append(Stage(base=base.strip(), name=name.strip()))
        elif stages:
            stages[-1].instructions.append((keyword, argument))
    return stages


def substitute(text: str, values: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def build_args() -> dict[str, str]:
    """What deploy.sh passes: the Python and covalent versions of the dispatching environment."""
    return {"PYTHON_VERSION": f"{sys.version_info.major}.{sys.version_info.minor}", "COVALENT_VERSION": version("covalent")}


def copy_sources(argument: str, values: Mapping[str, str]) -> tuple[list[str], str]:
    """(sources, destination) of a build-stage COPY without --from."""
    *sources, dest = shlex.split(substitute(argument, values))
    if any(s.startswith("--") for s in sources):
        raise StackError(f"worker_image/Dockerfile: unexpected COPY flags in the build stage: {argument}")
    return sources, dest


def _ignored(path: Path) -> bool:
    return path.name in IGNORED_PARTS or path.name.endswith(IGNORED_SUFFIXES)


def context_files(path: Path) -> Iterator[Path]:
    """The files of ``path`` (itself, or a directory's, recursively, in name order) that a build
    context holds: caches and the package's ``assets`` left out (.dockerignore)."""
    if path.is_dir():
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            if not _ignored(child):
                yield from context_files(child)
    else:
        yield path


def replay_copy(argument: str, context: Path, root: Path, values: Mapping[str, str]) -> None:
    """A build-stage COPY into ``root``, the scratch image filesystem."""
    sources, dest = copy_sources(argument, values)
    target = root / dest.lstrip("/")
    for source in sources:
        src = context / source
        if not src.exists():
            raise StackError(f"worker_image/Dockerfile copies {source}, which is not in {context}")
        if src.is_dir():
            shutil.copytree(src, target, ignore=COPY_IGNORE, dirs_exist_ok=True)
        elif dest.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / src.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def pip_install_args(run: str, root: Path, values: Mapping[str, str]) -> list[str] | None:
    """The arguments of a ``pip install`` RUN line, its image paths mapped into ``root``."""
    words = shlex.split(substitute(run, values))
    if words[:2] != ["pip", "install"]:
        return None
    return [str(root / w.lstrip("/")) if w.startswith("/") and (root / w.lstrip("/")).exists() else w for w in words[2:]]


@contextmanager
def build_context() -> Iterator[Path]:
    """The worker image's build context (the repository root's layout): the checkout itself, or
    outside one a scratch directory of links to the installed package's sources (``executor/``
    linking to the package, whose ``assets`` every walk skips), removed afterwards."""
    if CHECKOUT:
        yield REPO_ROOT
        return
    if not DOCKERFILE.is_file():
        raise StackError(f"{DOCKERFILE} not found: this installation does not carry the worker image's sources")
    with tempfile.TemporaryDirectory(prefix="covalent-gcpbatch-context-") as scratch:
        context = Path(scratch)
        for name, source in INSTALLED_CONTEXT.items():
            if (PACKAGED_SOURCES / source).exists():
                (context / name).symlink_to(PACKAGED_SOURCES / source)
        (context / "executor").mkdir()
        (context / "executor" / PACKAGE_DIR.name).symlink_to(PACKAGE_DIR, target_is_directory=True)
        yield context


def digest(context: Path | None = None, dockerfile: Path = DOCKERFILE, values: Mapping[str, str] | None = None) -> str:
    """Of everything an environment is built from: the Dockerfile, what it copies, the build args."""
    if context is None:
        with build_context() as context:
            return digest(context, dockerfile, values)
    values = build_args() if values is None else values
    h = hashlib.sha256(dockerfile.read_bytes())
    for key in sorted(values):
        h.update(f"\0arg\0{key}={values[key]}".encode())
    for argument in parse_dockerfile(dockerfile)[0].all("COPY"):
        for source in copy_sources(argument, values)[0]:
            top = context / source
            if not top.exists():
                raise StackError(f"worker_image/Dockerfile copies {source}, which is not in {context}")
            for path in context_files(top):
                h.update(b"\0file\0" + path.relative_to(context).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build(env_dir: Path, *, context: Path | None = None, dockerfile: Path = DOCKERFILE,
          values: Mapping[str, str] | None = None) -> int:
    """Build the environment into ``env_dir`` (``RUN python -m venv /opt/venv``, then the build
    stage's COPY and ``pip install`` lines in order). Returns the number of pip installs run."""
    if context is None:
        with build_context() as context:
            return build(env_dir, context=context, dockerfile=dockerfile, values=values)
    values = build_args() if values is None else values
    build_stage = parse_dockerfile(dockerfile)[0]
    root = env_dir.parent / f"{env_dir.name}.root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    installs = 0
    try:
        for keyword, argument in build_stage.instructions:
            if keyword == "COPY":
                replay_copy(argument, context, root, values)
            elif keyword == "RUN" and (args := pip_install_args(argument, root, values)) is not None:
                result = subprocess.run(
                    [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
                    cwd=root, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                )  # fmt: skip
                if result.returncode != 0:
                    raise StackError(f"building the worker environment: pip install {' '.join(args)} failed:\n"
                                     f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
                installs += 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return installs


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "covalent-gcpbatch" / "worker-envs"


def available() -> bool:
    """Whether this installation has the worker image's Dockerfile (a checkout, or a wheel's assets)."""
    return DOCKERFILE.is_file()


def ensure(cache: Path | None = None) -> Path:
    """The python of a worker environment for this checkout and interpreter, built if not cached."""
    if not available():
        raise StackError(f"{DOCKERFILE} not found: this installation does not carry the worker image's sources")
    cache = cache_dir() if cache is None else cache
    cache.mkdir(parents=True, exist_ok=True)
    env_dir = cache / digest()
    python = env_dir / "bin" / "python"
    marker = env_dir / COMPLETE_MARKER
    with FileLock(str(env_dir) + ".lock", timeout=PIP_TIMEOUT_S + 60):
        if not marker.exists():
            build(env_dir)
            marker.write_text("")
            _prune(cache, keep=env_dir)
        os.utime(marker)  # last used: what _prune goes by
    return python


def _prune(cache: Path, keep: Path) -> None:
    """Remove environments beyond the KEEP most recently used, if unused for STALE_S (a stack
    started from another checkout may still run its workers in one)."""
    import time

    built = sorted((p for p in cache.iterdir() if p.is_dir() and (p / COMPLETE_MARKER).exists() and p != keep),
                   key=lambda p: (p / COMPLETE_MARKER).stat().st_mtime, reverse=True)
    for old in built[KEEP - 1 :]:
        if time.time() - (old / COMPLETE_MARKER).stat().st_mtime < STALE_S:
            continue
        try:
            with FileLock(str(old) + ".lock", timeout=0):
                shutil.rmtree(old, ignore_errors=True)
        except TimeoutError:
            continue  # being built or checked right now
