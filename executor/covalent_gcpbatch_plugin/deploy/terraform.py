"""What the Terraform configuration of ``covalent deploy up gcpbatch`` runs: deploy.sh.

    GCPBATCH_INFRA='{...settings...}' [GCPBATCH_CONF=path] python -m covalent_gcpbatch_plugin.deploy.terraform up|down

``GCPBATCH_INFRA`` is the variables of ``assets/infra/main.tf.json`` as JSON (infra.py declares
them); ``up`` writes the deployment's ``[gcpbatch]`` section to ``GCPBATCH_CONF`` for Covalent to
read. Terraform gives this process nothing but PATH, so it sets up what gcloud and deploy.sh need
(HOME, the gcloud configuration) and checks, before anything runs, that gcloud is there and logged
in. deploy.sh comes from the source checkout this package lives in, or, installed from a wheel,
from the copies the package carries (``assets/source``), laid out as a checkout in a temporary
directory. A failure names deploy.sh's step and the way back (run ``up`` again, or ``down``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import DeployError
from ..local.worker_env import COPY_IGNORE

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parents[1]
PACKAGED_SOURCE = PACKAGE / "assets" / "source"
#: What deploy.sh needs beside itself, as in the repository (the package itself goes to executor/).
SOURCE_ENTRIES = ("deploy.sh", "worker_image", "functions", "pyproject.toml", "README.md")
SECTION = re.compile(r"^== (.+?)(?:\s+\[\d+s\])?$")  # deploy.sh's section(): a step, its elapsed time


def say(message: str) -> None:
    print(f"covalent-gcpbatch deploy: {message}", flush=True)


def source_root(scratch: Path) -> Path:
    """A directory laid out as the repository, with deploy.sh at its top."""
    if (CHECKOUT / "deploy.sh").is_file() and (CHECKOUT / "executor" / PACKAGE.name).resolve() == PACKAGE:
        return CHECKOUT
    if not (PACKAGED_SOURCE / "deploy.sh").is_file():
        raise DeployError(f"deploy.sh is neither in a checkout around {PACKAGE} nor packaged in {PACKAGED_SOURCE}: "
                          "reinstall covalent-gcpbatch-plugin")
    root = scratch / "source"
    for entry in SOURCE_ENTRIES:
        source = PACKAGED_SOURCE / entry
        if source.is_dir():
            shutil.copytree(source, root / entry, ignore=COPY_IGNORE)
        else:
            root.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / entry)
    shutil.copytree(PACKAGE, root / "executor" / PACKAGE.name, ignore=COPY_IGNORE)  # caches and assets left out
    (root / "deploy.sh").chmod(0o755)
    return root


def environment(gcloud_config_dir: str) -> dict[str, str]:
    """PATH as given, HOME from the password database (Terraform passes none), gcloud's config."""
    home = pwd.getpwuid(os.getuid()).pw_dir
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "CLOUDSDK_CONFIG": gcloud_config_dir or str(Path(home) / ".config" / "gcloud"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "LANG": "C.UTF-8",
    }


def check_gcloud(env: dict[str, str]) -> None:
    gcloud = shutil.which("gcloud", path=env["PATH"])
    if gcloud is None:
        raise DeployError("the gcloud CLI is not on PATH: install it (https://cloud.google.com/sdk/docs/install) "
                          "and run covalent deploy again")
    done = subprocess.run([gcloud, "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        raise DeployError(f"gcloud is not logged in (configuration {env['CLOUDSDK_CONFIG']}): run `gcloud auth login`, "
                          "or pass --gcloud_config_dir=<the directory of a logged-in configuration>")


def run_deploy(root: Path, action: str, args: Sequence[str], env: dict[str, str]) -> None:
    """deploy.sh, its output passed through; on failure, DeployError naming its last step."""
    argv = ["bash", str(root / "deploy.sh"), action, *args]
    step = "start"
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if found := SECTION.match(line.strip()):
                step = found.group(1)
    if proc.returncode != 0:
        again = "up" if action == "up" else "down"
        raise DeployError(f"deploy.sh {action} failed at step '{step}' (exit {proc.returncode}; its output is above). "
                          f"Fix the cause and run `covalent deploy {again} gcpbatch` again"
                          + ("; `covalent deploy down gcpbatch` removes what was created." if action == "up" else "."))


def main(argv: Sequence[str] | None = None) -> int:
    from ..infra import ExecutorInfraDefaults, deploy_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv not in (["up"], ["down"]):
        print("usage: python -m covalent_gcpbatch_plugin.deploy.terraform up|down", file=sys.stderr)
        return 2
    action = argv[0]
    try:
        settings = ExecutorInfraDefaults(**json.loads(os.environ["GCPBATCH_INFRA"]))
        env = environment(settings.gcloud_config_dir)
        check_gcloud(env)
        args = [*deploy_arguments(settings), "--python", sys.executable]
        conf = os.environ.get("GCPBATCH_CONF", "")
        if conf:
            args += ["--covalent-conf", conf]
        if action == "down":
            args.append("--yes")
        with tempfile.TemporaryDirectory(prefix="covalent-gcpbatch-deploy-") as scratch:
            root = source_root(Path(scratch))
            say(f"{action} {settings.prefix} in {settings.project_id} ({settings.region}) with {root / 'deploy.sh'}")
            run_deploy(root, action, args, env)
    except KeyError:
        print("covalent-gcpbatch deploy: GCPBATCH_INFRA is not set (Terraform sets it: assets/infra/main.tf.json)",
              file=sys.stderr)
        return 2
    except (DeployError, ValueError) as err:
        print(f"covalent-gcpbatch deploy: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
