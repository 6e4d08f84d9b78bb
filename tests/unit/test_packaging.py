"""What the package index shows and pip resolves: pyproject.toml's metadata, the files it ships,
and every third-party module the code imports declared as a dependency (no build here: the built
wheel is tests/image/test_wheel.py)."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import covalent_gcpbatch_plugin

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PACKAGE = REPO / "executor" / "covalent_gcpbatch_plugin"
#: SHA-256 of the Apache License 2.0 text as apache.org publishes it (LICENSE-2.0.txt), the same
#: bytes google-cloud-batch, google-api-core and functions-framework ship.
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
#: The Python versions the suite runs on (CI and the worker image): the classifiers say these.
TESTED_PYTHONS = ["3.11"]


def test_the_version_succeeds_0_15_and_is_declared_once():
    """pip upgrades only to a higher version: above the published 0.15.0."""
    version = Version(PROJECT["version"])
    assert version > Version("0.15.0") and version.major >= 1
    init = (PACKAGE / "__init__.py").read_text()
    assert not re.search(r"__version__\s*=", init), "the version lives in pyproject.toml only"
    assert covalent_gcpbatch_plugin.__version__ == importlib.metadata.version("covalent-gcpbatch-plugin")
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(r"^## (\S+)", changelog, re.M).group(1) == PROJECT["version"], "CHANGELOG.md starts with it"


def test_index_page_metadata():
    classifiers = PROJECT["classifiers"]
    assert "Environment :: Plugins" in classifiers and "Typing :: Typed" in classifiers
    assert [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)] \
        == TESTED_PYTHONS
    assert PROJECT["requires-python"] == f">={TESTED_PYTHONS[0]}"
    assert PROJECT["license"] == "Apache-2.0"
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: the SPDX expression says it"
    for label, url in PROJECT.get("urls", {}).items():
        assert url.startswith("https://"), label
    readme = (REPO / "README.md").read_text()
    assert re.search(rf"^Tested with: Python {re.escape(TESTED_PYTHONS[0])}\.\d+", readme, re.M)
    assert not re.search(r"Python >= ?3\.(?:[0-9]|10)\b", readme), "the README says the same Pythons"
    for trap in ("fastapi<0.132", "functions-framework 3.10.1"):  # why, where a user looks
        assert trap in readme[readme.index("## Known issues"):], trap


def test_license_is_the_apache_2_text_and_py_typed_ships():
    assert hashlib.sha256((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256
    assert (PACKAGE / "py.typed").is_file()
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["covalent_gcpbatch_plugin"]
    # Default license-files patterns pick LICENSE up; an explicit list would break the worker image's
    # build, whose context has pyproject.toml and README.md but no LICENSE (worker_image/Dockerfile).
    assert "license-files" not in PROJECT


def _declared(*extras: str) -> set[str]:
    requirements = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return {canonicalize_name(r.name) for r in requirements}


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from google.cloud import storage` imports google.cloud.storage
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "__future__"}


_packages_distributions = functools.cache(importlib.metadata.packages_distributions)


@functools.cache
def _owners(top: str) -> dict[Path, str]:
    """Every file of the distributions that install the top-level package ``top``: file -> distribution."""
    owners = {}
    for name in _packages_distributions().get(top, []):
        for file in importlib.metadata.distribution(name).files or ():
            if file.parts[0] == top:
                owners[Path(file.locate()).resolve()] = canonicalize_name(name)
    return owners


def _distribution(module: str) -> str | None:
    """The distribution that installs ``module`` (or, for a name imported from a module, its module)."""
    top = module.split(".")[0]
    if top == "covalent_gcpbatch_plugin":
        return "self"
    while module:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin not in (None, "namespace"):
            owner = _owners(top).get(Path(spec.origin).resolve())
            if owner:
                return owner
        module = module.rpartition(".")[0]
    return None


def test_every_third_party_import_is_declared():
    """A library declares what it imports, not what happens to come along (google-auth, grpcio,
    protobuf and requests came with the Google clients). local/ and the function's source may use
    the `local` extra."""
    undeclared = []
    for path in [*PACKAGE.rglob("*.py"), REPO / "functions" / "main.py"]:
        if "assets" in path.relative_to(PACKAGE if PACKAGE in path.parents else REPO).parts:
            continue
        local = "local" in path.relative_to(REPO).parts or path.name == "main.py"
        declared = _declared("local") if local else _declared()
        for module in sorted(_imported_modules(path)):
            dist = _distribution(module)
            if dist != "self" and dist not in declared:
                undeclared.append(f"{path.relative_to(REPO)}: {module} ({dist or 'not installed'})")
    assert not undeclared, "declare in pyproject.toml:\n" + "\n".join(undeclared)


def test_pins_that_block_upgrades_are_only_the_explained_ones():
    """google-cloud-batch is 0.x with a stable v1 API: allowed up to 1.0. The exact pins and the
    fastapi cap are the platform's version traps, each with its reason beside it."""
    text = (REPO / "pyproject.toml").read_text()
    batch = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("google-cloud-batch"))
    assert batch.specifier.contains("0.30.0") and not batch.specifier.contains("1.0.0")
    for pinned in ("fastapi<0.132", "functions-framework==3.10.1", "cloudevents==1.12.0"):
        line = text.index(f'"{pinned}"')
        assert "#" in text[text.rindex("\n", 0, text.rindex("\n", 0, line)):line], f"{pinned}: say why"


def test_test_modules_have_unique_names():
    """pytest imports test modules by basename (the test folders are not packages): two
    test_x.py in different folders fail the whole run at collection ("import file mismatch")."""
    from collections import Counter

    names = Counter(path.name for path in (Path(__file__).resolve().parents[1]).rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
