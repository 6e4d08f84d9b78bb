"""`covalent-gcpbatch` through click's CliRunner: --version, help with examples, shell completion,
exit codes (one line on Google auth and API errors, 130 on Ctrl-C, never a traceback), --json and
the rich tables of `jobs` and `cost`, and `deploy`'s arguments, project default and ADC check."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from fake_bucket import FakeBucket
from google.cloud import batch_v1

from covalent_gcpbatch_plugin import cli, watch

DISPATCH = "5f1c0d2e-8a7b-4c3d-9e0f-123456789abc"


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli.app, list(args), prog_name=cli.PROG, env=env)


def commands(group: click.Group = cli.app, path: tuple[str, ...] = ()):
    """Every command of the tree, with its path."""
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_version_is_the_installed_distributions():
    done = invoke("--version")
    assert done.exit_code == 0
    assert done.output.strip() == f"covalent-gcpbatch {version('covalent-gcpbatch-plugin')}"


def test_every_command_has_help_with_an_example_of_each_argument_and_option():
    seen = set()
    for path, command in commands():
        done = invoke(*path, "--help")
        assert done.exit_code == 0, (path, done.output)
        assert "Examples:" in done.output, path
        examples = command.epilog.split("Examples:", 1)[1]
        assert all(f"covalent-gcpbatch {' '.join(path)}".strip() in line for line in examples.splitlines()[3:] if line.strip()
                   and not line.strip().startswith("eval")), path  # fmt: skip
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert any(flag in examples for flag in param.opts), (path, param.opts)
            elif isinstance(param, click.Argument) and param.name != "deploy_sh_options":
                # an argument: an example passes it (a dispatch id, a node id)
                assert DISPATCH in examples, (path, param.name)
        seen.add(path)
    assert {("local", "up"), ("local", "down"), ("local", "status"), ("logs",), ("jobs",), ("cost",),
            ("deploy", "up"), ("deploy", "status"), ("deploy", "down"), ("deploy", "image")} <= seen  # fmt: skip


def test_deploy_help_lists_deploy_sh_options():
    done = invoke("deploy", "up", "--help")
    assert done.exit_code == 0
    assert "deploy.sh's options, passed through" in done.output and "--retention-days N" in done.output


def test_shell_completion_is_clicks():
    done = CliRunner().invoke(cli.app, [], prog_name=cli.PROG, env={"_COVALENT_GCPBATCH_COMPLETE": "bash_source"})
    assert done.exit_code == 0
    assert "_COVALENT_GCPBATCH_COMPLETE=bash_complete" in done.output and "complete " in done.output
    done = CliRunner().invoke(cli.app, [], prog_name=cli.PROG,
                              env={"_COVALENT_GCPBATCH_COMPLETE": "bash_complete", "COMP_WORDS": "covalent-gcpbatch lo",
                                   "COMP_CWORD": "1"})  # fmt: skip
    assert done.output.split() == ["plain,local", "plain,logs"]


# -- errors: one line, exit 1; Ctrl-C: 130; no traceback ------------------------------------------


@pytest.mark.parametrize("error", [
    auth_exceptions.DefaultCredentialsError("Your default credentials were not found.\nSee https://example"),
    auth_exceptions.RefreshError("invalid_grant: Token has been expired or revoked."),
    api_exceptions.PermissionDenied("Permission 'batch.jobs.list' denied on resource"),
    api_exceptions.ServiceUnavailable("the service is unavailable"),
])  # fmt: skip
def test_google_errors_are_one_line_and_exit_1(monkeypatch, error):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(watch, "jobs", fails)
    done = invoke("jobs")
    assert done.exit_code == 1, done.output
    (line,) = done.stderr.splitlines()
    assert line.startswith("covalent-gcpbatch: ") and "Traceback" not in done.output
    if isinstance(error, auth_exceptions.GoogleAuthError):
        assert line.endswith("run: gcloud auth application-default login")
    # the console script's entry too
    assert cli.main(["jobs"]) == 1


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(watch, "logs", interrupted)
    done = invoke("logs", DISPATCH, "0", "--follow")
    assert done.exit_code == 130 and done.stderr == "covalent-gcpbatch: interrupted\n"
    assert cli.main(["logs", DISPATCH]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_is_not_hidden(monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(watch, "jobs", broken)
    done = invoke("jobs")
    assert isinstance(done.exception, ZeroDivisionError)


def test_usage_errors_exit_2():
    assert invoke("jobs", "--force").exit_code == 2
    assert invoke("jobs", "--cancel", "--json").exit_code == 2
    assert invoke("logs").exit_code == 2
    assert cli.main(["jobs", "--yes"]) == 2
    assert cli.main(["--help"]) == 0


# -- jobs and cost: rich tables, --json ------------------------------------------------------------


def batch_job(job_id: str, node: str, state: str, ran_s: float = 0.0) -> batch_v1.Job:
    created = datetime.now(timezone.utc) - timedelta(seconds=300)
    job = batch_v1.Job(name=f"projects/p/locations/us-east1/jobs/{job_id}",
                       labels={"covalent-dispatch-id": DISPATCH, "covalent-node-id": node})  # fmt: skip
    job.create_time = created
    job.status.state = getattr(batch_v1.JobStatus.State, state)
    if ran_s:
        scheduled = created + timedelta(seconds=10)
        job.status.status_events = [
            batch_v1.StatusEvent(description="Job state is set from QUEUED to SCHEDULED for job x.", event_time=scheduled),
            batch_v1.StatusEvent(description=f"Job state is set from RUNNING to {state} for job x.",
                                 event_time=scheduled + timedelta(seconds=ran_s)),
        ]  # fmt: skip
    return job


@pytest.fixture
def deployment(monkeypatch):
    found = [batch_job("cov-5f1c0d2e-1-abcdef", "1", "RUNNING", 0.0),
             batch_job("cov-5f1c0d2e-0-123456", "0", "SUCCEEDED", 42.0)]  # fmt: skip
    here = watch.Deployment("my-project", "us-east1", "my-bucket", "", "")
    monkeypatch.setattr(watch.Deployment, "from_config", classmethod(lambda cls: here))
    monkeypatch.setattr(watch, "dispatch_jobs", lambda deployment, dispatch_id: found)
    monkeypatch.setattr(watch.Deployment, "bucket", lambda self: FakeBucket({}))  # no claims: no warm VM
    return found


def test_jobs_json(deployment):
    done = invoke("jobs", DISPATCH, "--json")
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)
    assert [(r["job"], r["state"], r["dispatch_id"], r["node_id"]) for r in rows] == [
        ("cov-5f1c0d2e-1-abcdef", "RUNNING", DISPATCH, "1"), ("cov-5f1c0d2e-0-123456", "SUCCEEDED", DISPATCH, "0")]
    assert rows[1]["vm_s"] == 42.0 and 290 < rows[1]["age_s"] < 400
    assert set(rows[0]) == {"job", "state", "dispatch_id", "node_id", "age_s", "age", "vm_s", "nodes", "other_dispatches"}
    assert [r["nodes"] for r in rows] == [["1"], ["0"]] and rows[0]["other_dispatches"] is None


def test_jobs_table_keeps_its_columns_one_job_a_line(deployment):
    done = invoke("jobs")
    assert done.exit_code == 0, done.output
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines[0].split() == ["JOB", "STATE", "DISPATCH", "NODE", "AGE", "VM"]
    rows = [line.split() for line in lines if line.lstrip().startswith("cov-")]
    assert [row[:4] for row in rows] == [["cov-5f1c0d2e-1-abcdef", "RUNNING", DISPATCH, "1"],
                                         ["cov-5f1c0d2e-0-123456", "SUCCEEDED", DISPATCH, "0"]]  # fmt: skip
    assert rows[1][-1] == "42s"


def test_cost_json_and_table(deployment):
    done = invoke("cost", DISPATCH, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["dispatch_id"] == DISPATCH and report["project_id"] == "my-project"
    assert [j["job"] for j in report["jobs"]] == ["cov-5f1c0d2e-1-abcdef", "cov-5f1c0d2e-0-123456"]
    succeeded = report["jobs"][1]
    assert succeeded["vm_s"] == 42.0 and succeeded["billed_s"] == 60 and succeeded["usd"] > 0
    assert report["billed_s"] == 60 and report["usd"] == pytest.approx(sum(j["usd"] for j in report["jobs"]))
    table = invoke("cost", DISPATCH)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "MACHINE", "VM", "BILLED", "vCPU-h", "GiB-h", "USD", "ELECTRONS"]
    assert lines[3].split()[:2] == ["cov-5f1c0d2e-0-123456", "SUCCEEDED"] and lines[3].split()[-6:-4] == ["42.0s", "60s"]
    assert lines[3].split()[-1] == "0"
    assert f"dispatch {DISPATCH}: 2 job(s), VM-seconds 42.0 (billed 60)" in table.stdout and "on demand" in table.stdout


def test_cost_of_a_dispatch_without_jobs_exits_1(monkeypatch, deployment):
    monkeypatch.setattr(watch, "dispatch_jobs", lambda deployment, dispatch_id: [])
    done = invoke("cost", DISPATCH)
    assert done.exit_code == 1 and "No Batch job of dispatch" in done.stdout
    done = invoke("cost", DISPATCH, "--json")
    assert done.exit_code == 1 and json.loads(done.stdout)["jobs"] == []


# -- deploy ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_deploy_sh(tmp_path, monkeypatch):
    """deploy.sh replaced by a script that records its arguments (and GCPBATCH_PYTHON), exit status
    from FAKE_DEPLOY_RC."""
    record = tmp_path / "argv.json"
    script = tmp_path / "deploy.sh"
    script.write_text(f'#!/usr/bin/env bash\n"{sys.executable}" -c \'import json, os, sys; '
                      f'json.dump({{"argv": sys.argv[1:], "python": os.environ.get("GCPBATCH_PYTHON")}}, open("{record}", "w"))\' "$@"\n'
                      'exit "${FAKE_DEPLOY_RC:-0}"\n')  # fmt: skip
    monkeypatch.setattr(cli, "DEPLOY_SH", script)
    for name in (*cli.PROJECT_ENV, "GCPBATCH_PYTHON"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-gcloud") + os.pathsep + "/usr/bin:/bin")
    return lambda: json.loads(record.read_text())


def no_adc(monkeypatch):
    import google.auth

    def missing(*args, **kwargs):
        raise auth_exceptions.DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", missing)


def test_deploy_passes_its_arguments_through(fake_deploy_sh, monkeypatch):
    no_adc(monkeypatch)
    done = invoke("deploy", "status", "--region", "europe-west4", "--project", "my-project-42", "--prefix=team-a", "-y")
    assert done.exit_code == 0, done.output
    assert fake_deploy_sh() == {"argv": ["status", "--project", "my-project-42", "--region", "europe-west4",
                                         "--prefix=team-a", "-y"], "python": sys.executable}  # fmt: skip
    done = invoke("deploy", "image", "--project=my-project-42", "--python", "/opt/py/bin/python", "--name", "ml")
    assert done.exit_code == 0, done.output
    assert fake_deploy_sh() == {"argv": ["image", "--project", "my-project-42", "--python", "/opt/py/bin/python",
                                         "--name", "ml"], "python": None}  # fmt: skip


@pytest.mark.parametrize("variable", cli.PROJECT_ENV)
def test_deploy_project_defaults_from_the_environment(fake_deploy_sh, monkeypatch, variable):
    monkeypatch.setenv(variable, "from-env-project")
    done = invoke("deploy", "down", "--yes")
    assert done.exit_code == 0, done.output
    assert fake_deploy_sh()["argv"] == ["down", "--project", "from-env-project", "--yes"]
    assert f"project from-env-project (from {variable}" in done.stderr


def test_deploy_project_order_and_gcloud_config(fake_deploy_sh, monkeypatch, tmp_path):
    monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "second")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "first")
    assert invoke("deploy", "status").exit_code == 0
    assert fake_deploy_sh()["argv"] == ["status", "--project", "first"]
    for name in cli.PROJECT_ENV:
        monkeypatch.delenv(name, raising=False)
    bin_dir = tmp_path / "no-gcloud"  # on PATH (fake_deploy_sh): now it has one
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text('#!/bin/sh\n[ "$*" = "config get-value project" ] && echo configured-project\n')
    (bin_dir / "gcloud").chmod(0o755)
    done = invoke("deploy", "status")
    assert done.exit_code == 0, done.output
    assert fake_deploy_sh()["argv"] == ["status", "--project", "configured-project"]
    assert "(from gcloud config get-value project" in done.stderr
    (bin_dir / "gcloud").write_text("#!/bin/sh\necho '(unset)'\n")
    done = invoke("deploy", "status")
    assert done.exit_code == 2 and "no project: pass --project P" in done.output


def test_deploy_up_checks_application_default_credentials(fake_deploy_sh, monkeypatch):
    no_adc(monkeypatch)
    done = invoke("deploy", "up", "--project", "my-project-42")
    # The deployment is complete: a missing ADC is reported with its remedy, not an error (the
    # Covalent server may run elsewhere, with credentials of its own).
    assert done.exit_code == 0, done.output
    assert "no Application Default Credentials" in done.stderr
    assert "\n  gcloud auth application-default login\n" in done.stderr

    import google.auth
    import google.auth.credentials

    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (google.auth.credentials.AnonymousCredentials(), "adc-project"))
    done = invoke("deploy", "up", "--project", "my-project-42")
    assert done.exit_code == 0 and "Application Default Credentials found" in done.stdout and "adc-project" in done.stdout


def test_deploy_failure_is_deploy_sh_exit_status_without_adc_check(fake_deploy_sh, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("ADC checked after a failed up")

    import google.auth

    monkeypatch.setattr(google.auth, "default", never)
    monkeypatch.setenv("FAKE_DEPLOY_RC", "3")
    done = invoke("deploy", "up", "--project", "my-project-42")
    assert done.exit_code == 3


def test_the_packaged_deploy_sh_is_the_repositorys():
    repo = Path(__file__).resolve().parents[2]
    assert cli.DEPLOY_SH.read_bytes() == (repo / "deploy.sh").read_bytes()
    for source in ("functions/main.py", "worker_image/Dockerfile"):
        assert (cli.DEPLOY_SH.parent / source).is_file(), source
