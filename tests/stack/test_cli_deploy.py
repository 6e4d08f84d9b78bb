"""`covalent-gcpbatch deploy ...` with the recording gcloud first on PATH (gcloud_recorder): it runs
the packaged deploy.sh with the arguments it was given (the project from the environment when
--project is not), and from an installed package, without a checkout, as `deploy.sh` does from one.

"Installed" is the package copied with its links resolved (as a wheel carries it: assets/source
holds deploy.sh, functions/ and worker_image/ as files) into a scratch directory first on
PYTHONPATH, as tests/stack/test_covalent_deploy.py does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gcloud_recorder import Recorder, check

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "executor" / "covalent_gcpbatch_plugin"
CLI = str(Path(sys.executable).with_name("covalent-gcpbatch"))
PROJECT, REGION, PREFIX = "my-project-42", "europe-west4", "cgb-cli"


def environment(recorder: Recorder, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in recorder.env.items() if key not in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")}
    return {**env, "GCPBATCH_PYTHON": sys.executable, "NO_GCE_CHECK": "True", **extra}


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def comparable(text: str, recorder: Recorder) -> str:
    """deploy.sh's output without its timings and the recorder's own directory."""
    return re.sub(r"  \[\d+s\]", "", text).replace(str(recorder.root), "<root>")


def argvs(recorder: Recorder) -> list[list[str]]:
    return [call["argv"] for call in recorder.calls()]


def test_deploy_status_reaches_deploy_sh_with_the_same_arguments(tmp_path):
    by_script, by_cli = Recorder(tmp_path / "script"), Recorder(tmp_path / "cli")
    args = ["--project", PROJECT, "--region", REGION, "--prefix", PREFIX]
    reference = run([str(REPO / "deploy.sh"), "status", *args], environment(by_script))
    done = run([CLI, "deploy", "status", *args], environment(by_cli))
    assert argvs(by_cli) == argvs(by_script) and argvs(by_cli)
    assert all(f"--project={PROJECT}" in argv or argv[:1] == ["projects"] for argv in argvs(by_cli))
    # Nothing deployed: status says so (every resource missing, the warm topic and its subscription too), and exits as deploy.sh does.
    assert done.returncode == reference.returncode != 0 and "12 missing" in done.stdout
    assert comparable(done.stdout, by_cli) == comparable(reference.stdout, by_script)


def test_deploy_takes_the_project_from_google_cloud_project(tmp_path):
    by_script, by_cli = Recorder(tmp_path / "script"), Recorder(tmp_path / "cli")
    reference = run([str(REPO / "deploy.sh"), "status", "--project", PROJECT, "--prefix", PREFIX], environment(by_script))
    done = run([CLI, "deploy", "status", "--prefix", PREFIX], environment(by_cli, GOOGLE_CLOUD_PROJECT=PROJECT))
    assert done.returncode == reference.returncode
    assert argvs(by_cli) == argvs(by_script)
    assert f"project {PROJECT} (from GOOGLE_CLOUD_PROJECT" in done.stderr


def test_without_any_project_it_says_how_to_give_one(tmp_path):
    recorder = Recorder(tmp_path / "cli")
    done = run([CLI, "deploy", "status"], environment(recorder))  # the fake gcloud has no configured project
    assert done.returncode == 2 and "no project: pass --project P" in done.stderr, done.stderr
    assert [argv for argv in argvs(recorder) if argv[:2] != ["config", "get-value"]] == []


@pytest.fixture
def installed(tmp_path) -> Path:
    """The package as a wheel installs it (links resolved), without the checkout around it."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / PACKAGE.name, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".terraform*", "terraform.tfstate*"))  # fmt: skip
    assert not (site / PACKAGE.name / "assets" / "source" / "deploy.sh").is_symlink()
    return site


def test_an_installed_package_deploys_the_same_image_without_a_checkout(tmp_path, installed):
    """`deploy up --only image` from the installed package builds the same context, so the same
    image, as ./deploy.sh in the checkout: the Dockerfile and sources the wheel carries, and the
    installed package as executor/. Before, it stopped: "worker_image/Dockerfile not found: run
    deploy.sh from a source checkout"."""
    by_script, by_installed = Recorder(tmp_path / "script"), Recorder(tmp_path / "installed")
    args = ["--project", PROJECT, "--region", REGION, "--prefix", PREFIX, "--only", "image"]
    check(run([str(REPO / "deploy.sh"), "up", *args], environment(by_script)))
    env = environment(by_installed, PYTHONPATH=str(installed), HOME=str(tmp_path / "home"))
    done = check(run([sys.executable, "-m", "covalent_gcpbatch_plugin.cli", "deploy", "up", *args], env))
    (reference,) = [c for c in by_script.calls() if c["argv"][:2] == ["builds", "submit"]]
    (build,) = [c for c in by_installed.calls() if c["argv"][:2] == ["builds", "submit"]]
    assert build["context"] == reference["context"]
    assert "executor/covalent_gcpbatch_plugin/worker.py" in build["context"] and "worker_image/Dockerfile" in build["context"]
    assert not [name for name in build["context"] if "/assets/" in name]
    assert json.loads(build["files"]["--config"]) == json.loads(reference["files"]["--config"])  # the same image tag
    # No Application Default Credentials here: said, with the command that makes them, not a failure.
    assert "\n  gcloud auth application-default login\n" in done.stderr


def test_an_installed_package_builds_the_local_workers_environment_from_its_own_dockerfile(installed):
    """`covalent-gcpbatch local up` from a wheel: the workers' environment comes from the
    Dockerfile the wheel ships (not this interpreter, with a warning), and is the checkout's."""
    probe = ("from covalent_gcpbatch_plugin.local import worker_env as w; "
             "print(w.__file__, w.CHECKOUT, w.available(), w.DOCKERFILE, w.digest())")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    module, checkout, available, dockerfile, digest = done.stdout.split()
    assert module.startswith(str(installed)) and (checkout, available) == ("False", "True")
    assert dockerfile == str(installed / PACKAGE.name / "assets" / "source" / "worker_image" / "Dockerfile")
    from covalent_gcpbatch_plugin.local import worker_env

    assert worker_env.CHECKOUT and digest == worker_env.digest()
