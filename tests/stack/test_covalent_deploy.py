"""`covalent deploy up|status|down gcpbatch`: Covalent's own CLI and the real terraform, with the
recording gcloud first on PATH.

The package is copied (symlinks resolved, as a wheel carries it) to a scratch directory that comes
first on PYTHONPATH, so Covalent finds the plugin there and runs Terraform in that copy's
``assets/infra`` (never in the checkout), and deploy.sh comes from the copy's ``assets/source``, as
after ``pip install``. Terraform passes its provisioners nothing but PATH: the Python that runs the
helper is a shim that puts the copy on PYTHONPATH, passed as ``--python``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from gcloud_recorder import MUTATING, Recorder, check, verb_of

from covalent_gcpbatch_plugin import infra
from covalent_gcpbatch_plugin.deployment import CAP_FIELDS, FIELDS as DEPLOYMENT_FIELDS

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "executor" / "covalent_gcpbatch_plugin"
ON_CI = os.environ.get("CI", "").lower() == "true"
PROJECT, REGION, PREFIX = "my-project-42", "europe-west4", "cgb-tf"
DEPLOY_ARGS = ["--project", PROJECT, "--region", REGION, "--prefix", PREFIX]


def require_tools() -> None:
    missing = [tool for tool in ("terraform", "git", "docker") if shutil.which(tool) is None]
    if missing:
        if ON_CI:
            pytest.fail(f"CI=true and {', '.join(missing)} missing: covalent deploy needs them")
        pytest.skip(f"covalent deploy needs {', '.join(missing)}")


class CovalentDeploy:
    """``covalent deploy`` run against a copy of the package, under a Recorder."""

    def __init__(self, recorder: Recorder, root: Path) -> None:
        self.recorder = recorder
        self.site = root / "site"
        shutil.copytree(PACKAGE, self.site / PACKAGE.name, symlinks=False, ignore=self._package_files)
        self.infra = self.site / PACKAGE.name / "assets" / "infra"
        self.python = root / "python"
        self.python.write_text(f'#!/bin/sh\nPYTHONPATH="{self.site}" exec "{sys.executable}" "$@"\n')
        self.python.chmod(0o755)
        self.gcloud_config = root / "gcloud-config"
        self.gcloud_config.mkdir()
        # Terraform's version check (its "checkpoint") cannot reach the internet here, and logs its
        # failure at ERROR, whenever it returns, into the terraform-error.log whose LAST line
        # Covalent reads as the deployment's status: a failed up then read as "up" at random. Covalent
        # passes Terraform nothing but PATH (and TF_LOG*), so a terraform first on PATH turns the
        # check off, as it is quiet where it succeeds.
        shim = root / "bin"
        shim.mkdir()
        (shim / "terraform").write_text(f'#!/bin/sh\nCHECKPOINT_DISABLE=1 exec "{shutil.which("terraform")}" "$@"\n')
        (shim / "terraform").chmod(0o755)
        self.env = {**recorder.env, "PYTHONPATH": str(self.site), "PATH": f"{shim}{os.pathsep}{recorder.env['PATH']}"}

    @staticmethod
    def _package_files(directory: str, names: list[str]) -> list[str]:
        """What a wheel would not carry: caches, and Terraform's working files of a deploy made
        from the checkout (only main.tf.json is shipped from assets/infra)."""
        ignored = [n for n in names if n == "__pycache__" or n.endswith(".pyc")]
        if Path(directory) == PACKAGE / "assets" / "infra":
            ignored += [n for n in names if n != infra.MAIN_TF.name]
        return ignored

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        covalent = Path(sys.executable).with_name("covalent")
        done = subprocess.run([str(covalent), "deploy", *args], env=self.env, capture_output=True, text=True,
                              timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
        if ok:
            assert done.returncode == 0 and "Error" not in done.stdout, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
        return done

    def up(self, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
        return self.run("up", "gcpbatch", f"--project_id={PROJECT}", f"--region={REGION}", f"--prefix={PREFIX}",
                        f"--python={self.python}", f"--gcloud_config_dir={self.gcloud_config}", *extra, ok=ok)

    def status(self) -> str:
        return self.run("status", "gcpbatch").stdout


def normalized(calls: list[dict]) -> list[list[str]]:
    """The calls with what differs between two runs of the same deployment taken out: temporary
    file paths (their content is compared instead), the source directories' locations."""
    out = []
    for call in calls:
        if call["argv"][:2] == ["auth", "list"]:
            continue  # the Terraform helper's login check, before deploy.sh
        argv = []
        for arg in call["argv"]:
            flag, sep, value = arg.partition("=")
            if sep and flag in call["files"]:
                arg = f"{flag}={call['files'][flag]}"
            elif sep and flag == "--source":
                arg = f"{flag}=<root>/{Path(value).name}"
            argv.append(arg)
        if call["argv"][:2] == ["builds", "submit"]:
            argv[2] = json.dumps(call["context"], sort_keys=True)
        out.append(argv)
    return out


@pytest.fixture
def deploy(tmp_path) -> CovalentDeploy:
    require_tools()
    return CovalentDeploy(Recorder(tmp_path / "covalent-deploy"), tmp_path)


def test_covalent_deploy_up_status_down_does_what_deploy_sh_does(deploy, tmp_path):
    assert "down" in deploy.status()
    up = deploy.up()
    by_covalent = deploy.recorder.calls()
    assert [c["argv"][:2] for c in by_covalent if c["argv"][:2] == ["auth", "list"]] == [["auth", "list"]]

    # The same gcloud calls as ./deploy.sh up, with the same results.
    reference = Recorder(tmp_path / "deploy-sh")
    check(reference.deploy("up", *DEPLOY_ARGS, "--python", sys.executable))
    assert normalized(by_covalent) == normalized(reference.calls())
    def created(recorder: Recorder) -> dict:  # flags name temporary files; the calls compared them
        return {key: {k: v for k, v in resource.items() if k != "flags"} for key, resource in recorder.state["resources"].items()}

    assert created(deploy.recorder) == created(reference)
    assert deploy.recorder.state["policies"] == reference.state["policies"]

    # Covalent read the deployment's settings into [executors.gcpbatch].
    section = deploy.recorder.config_section()
    wrote = reference.config_section()
    for key in ("project_id", "region", "bucket_name", "container_image_uri", "service_account_email", "pubsub_topic"):
        assert section[key] == wrote[key], key
    assert section["bucket_name"] == f"{PREFIX}-{PROJECT}" and section["region"] == REGION
    assert section["container_image_uri"].startswith(f"{REGION}-docker.pkg.dev/{PROJECT}/{PREFIX}/worker:")
    assert "Provisioned Resources" in deploy.status() or re.search(r"\bup\b", deploy.status())

    # A second up changes nothing: Terraform sees no change, deploy.sh does not run.
    before = len(deploy.recorder.calls())
    deploy.up()
    assert deploy.recorder.calls()[before:] == []

    # A changed cap re-runs deploy.sh up (which redeploys the function only), never down.
    before = len(deploy.recorder.calls())
    deploy.up("--max_vcpus=8")
    changed = [c["argv"][:3] for c in deploy.recorder.calls()[before:] if verb_of(c) in MUTATING]
    assert changed == [["functions", "deploy", f"{PREFIX}-submit"]]

    # down: deploy.sh down through Terraform's destroy-time provisioner.
    before = len(deploy.recorder.calls())
    deploy.run("down", "gcpbatch")
    deleted = [c["argv"][:3] for c in deploy.recorder.calls()[before:] if verb_of(c) in ("delete", "rm")]
    assert ["functions", "delete", f"{PREFIX}-submit"] in deleted
    assert deploy.recorder.state["resources"] == {}, "everything up created is gone"
    assert "down" in deploy.status()
    assert not (deploy.infra / infra.CONF_NAME).exists()


def test_a_missing_project_or_login_is_named(deploy):
    no_project = deploy.run("up", "gcpbatch", f"--python={deploy.python}", ok=False)
    assert no_project.returncode != 0
    assert "--project_id" in no_project.stdout + no_project.stderr
    assert deploy.recorder.calls() == []

    fake = Path(deploy.recorder.env["PATH"].split(os.pathsep)[0]) / "gcloud"
    fake.write_text("#!/bin/sh\n[ \"$1\" = auth ] && exit 0\nexit 1\n")  # logged out: no active account
    logged_out = deploy.up(ok=False)
    assert logged_out.returncode != 0
    assert "gcloud auth login" in logged_out.stdout + logged_out.stderr


def test_a_failed_step_is_named_and_up_or_down_recover(deploy):
    deploy.recorder.fail_on("functions deploy")
    failed = deploy.up(ok=False)
    said = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "failed at step 'Cloud Function" in said and "covalent deploy up gcpbatch" in said
    assert "covalent deploy down gcpbatch" in said
    assert "*up" in deploy.status() or "Provisioning error" in deploy.status()

    deploy.recorder.fail_on("")  # the cause fixed: up again completes the deployment
    deploy.up()
    assert [c for c in deploy.recorder.calls() if c["argv"][:2] == ["functions", "deploy"]][-1]
    assert deploy.recorder.config_section()["bucket_name"] == f"{PREFIX}-{PROJECT}"
    deploy.run("down", "gcpbatch")
    assert deploy.recorder.state["resources"] == {}


def test_infra_defaults_are_deploy_sh_s_and_the_terraform_config_is_generated():
    """ExecutorInfraDefaults is derived (caps from deployment.py, region from settings.py); the
    prefix and retention defaults are deploy.sh's; main.tf.json is infra.py's output."""
    fields = infra.ExecutorInfraDefaults.model_fields
    script = (REPO / "deploy.sh").read_text()
    assert f"PREFIX=${{GCPBATCH_PREFIX:-{fields['prefix'].default}}}" in script
    assert f"REGION=${{GCPBATCH_REGION:-{fields['region'].default}}}" in script
    assert f"RETENTION_DAYS={fields['retention_days'].default}\n" in script
    for name in CAP_FIELDS:
        default = DEPLOYMENT_FIELDS[name].default
        assert fields[name].default == (",".join(default) if isinstance(default, tuple) else default), name
    assert infra.MAIN_TF.read_text() == infra.terraform_json(), "regenerate: python -m covalent_gcpbatch_plugin.infra"
    assert set(json.loads(infra.MAIN_TF.read_text())["variable"]) == set(fields)


def test_the_wheel_carries_what_covalent_deploy_needs(tmp_path):
    """pip install is enough: the built wheel has the Terraform configuration and deploy.sh with
    everything it uses, as files (the checkout's links resolved)."""
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
                            str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("covalent_gcpbatch_plugin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    base = "covalent_gcpbatch_plugin/assets/"
    for needed in ("infra/main.tf.json", "source/deploy.sh", "source/pyproject.toml", "source/README.md",
                   "source/worker_image/Dockerfile", "source/worker_image/requirements.txt",
                   "source/worker_image/extra-requirements.txt", "source/functions/main.py",
                   "source/functions/requirements.txt", "source/functions/covalent_gcpbatch_plugin/deployment.py",
                   "source/functions/covalent_gcpbatch_plugin/protocol/messages.py"):  # fmt: skip
        assert base + needed in names, needed
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(base + "source/deploy.sh") == (REPO / "deploy.sh").read_bytes()
    assert not [n for n in names if n.startswith(base + "infra/") and not n.endswith("main.tf.json")]
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"] == "covalent-gcpbatch-plugin"
