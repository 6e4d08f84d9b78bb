"""A recording ``gcloud`` (fake_gcloud.py) first on PATH, and deploy.sh (or anything that runs it)
under it: the recorded calls and the fake's state show what was created, with which settings,
and which roles went to which account where. Used by tests/stack/test_deploy.py and
tests/stack/test_covalent_deploy.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy.sh"
FAKE_GCLOUD = Path(__file__).resolve().with_name("fake_gcloud.py")

MUTATING = {"create", "delete", "update", "enable", "deploy", "submit", "rm", "add-iam-policy-binding",
            "remove-iam-policy-binding"}  # fmt: skip


class Recorder:
    """The fake gcloud's log and state, and deploy.sh run with it first on PATH."""

    def __init__(self, root: Path) -> None:
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(f"#!{sys.executable}\n" + FAKE_GCLOUD.read_text())
        gcloud.chmod(0o755)
        self.log, self.state_file, self.config_dir = root / "gcloud.log", root / "gcloud-state.json", root / "covalent"
        # Also beside the script, for callers that clear the environment (Terraform keeps only PATH).
        self.sidecar = bin_dir / "fake-gcloud.json"
        self.sidecar.write_text(json.dumps({"log": str(self.log), "state": str(self.state_file)}))
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_STATE": str(self.state_file),
            "COVALENT_CONFIG_DIR": str(self.config_dir),
        }
        for name in ("GCPBATCH_PROJECT", "GCPBATCH_REGION", "GCPBATCH_PREFIX", "GCPBATCH_PYTHON"):
            self.env.pop(name, None)

    def fail_on(self, words: str) -> None:
        """Every later call starting with these words (``"functions deploy"``) fails, as a denied one does."""
        self.sidecar.write_text(json.dumps({**json.loads(self.sidecar.read_text()), "fail": words}))

    def fail_next(self, words: str, times: int, *, stderr: str = "", build_failure: str = "") -> None:
        """The next ``times`` calls starting with these words fail: printing ``stderr`` (exit 1), or, for
        ``builds submit``, as a build that failed with ``failureInfo.type`` = ``build_failure``."""
        values = json.loads(self.sidecar.read_text())
        values.setdefault("inject", []).append({"words": words, "times": times, "stderr": stderr,
                                                "build_failure": build_failure})  # fmt: skip
        self.sidecar.write_text(json.dumps(values))

    def deploy(self, *args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        return subprocess.run([str(DEPLOY), *args], env=self.env, stdin=stdin, capture_output=True, text=True, timeout=120)

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    @property
    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def bindings(self, resource: str) -> set[tuple[str, str]]:
        """(role, member) pairs bound unconditionally on one resource of the fake's state."""
        policy = self.state["policies"].get(resource, {"bindings": []})
        return {(b["role"], m) for b in policy["bindings"] if not b.get("condition") for m in b["members"]}

    def conditional_bindings(self, resource: str) -> set[tuple[str, str, str]]:
        """(role, member, condition expression) triples bound on one resource under a condition."""
        policy = self.state["policies"].get(resource, {"bindings": []})
        return {(b["role"], m, b["condition"]["expression"]) for b in policy["bindings"] if b.get("condition")
                for m in b["members"]}  # fmt: skip

    def config_section(self) -> dict:
        path = self.config_dir / "covalent.conf"
        return tomllib.loads(path.read_text()).get("executors", {}).get("gcpbatch", {}) if path.exists() else {}


def verb_of(call: dict) -> str:
    return next((arg for arg in call["argv"] if not arg.startswith("-") and arg in MUTATING | {"describe", "list",
                 "get-iam-policy", "service-agent"}), "")  # fmt: skip


def flag_values(call: dict, name: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in call["argv"] if arg.startswith(f"{name}=")]


def find(calls: list[dict], *words: str) -> list[dict]:
    """Calls whose argv starts with these words (``gcloud`` itself is not in argv)."""
    return [c for c in calls if c["argv"][: len(words)] == list(words)]


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"deploy.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result
