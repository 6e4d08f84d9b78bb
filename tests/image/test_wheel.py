"""The built wheel, as the package index and pip see it: its metadata and the files a pip user
needs (LICENSE, py.typed, the deploy assets). A build takes a few seconds (pip wheel --no-deps)."""

from __future__ import annotations

import email.parser
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                            "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("covalent_gcpbatch_plugin-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_metadata_is_pyprojects(wheel):
    dist_info = f"covalent_gcpbatch_plugin-{PROJECT['version']}.dist-info"
    metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    assert metadata["Version"] == PROJECT["version"]
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["License-File"] == "LICENSE"
    assert metadata["Requires-Python"] == PROJECT["requires-python"]
    assert metadata.get_all("Classifier") == PROJECT["classifiers"]
    assert metadata.get_all("Project-URL") == [f"{k}, {v}" for k, v in PROJECT["urls"].items()]
    assert wheel.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()


def test_wheel_carries_the_type_marker_and_the_assets(wheel):
    names = set(wheel.namelist())
    for needed in ("py.typed", "gcpbatch.py", "settings.py", "assets/infra/main.tf.json", "assets/source/deploy.sh",
                   "assets/source/worker_image/Dockerfile", "assets/source/functions/main.py"):
        assert f"covalent_gcpbatch_plugin/{needed}" in names, needed
    assert "covalent_gcpbatch_plugin/function_source/main.py" in names
