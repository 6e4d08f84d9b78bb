"""Usage from Batch's typed fields (JobStatus.run_duration, task_groups[...].instances), the
status-event fallback where Batch gives none, and the price table's date and source in `cost`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from click.testing import CliRunner
from fake_bucket import FakeBucket
from google.cloud import batch_v1

from covalent_gcpbatch_plugin import cli, usage, watch

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
NAME = "projects/p/locations/us-central1/jobs/cov-8f1c2d3e-0-a1b2c3d4"


def event(state_from: str, state_to: str, at_s: float) -> batch_v1.StatusEvent:
    """A job-level status event as Batch writes it (platform notes: its text is the only place of the state)."""
    return batch_v1.StatusEvent(type_="STATUS_CHANGED", event_time=T0 + timedelta(seconds=at_s),
                                description=f"Job state is set from {state_from} to {state_to} for job {NAME}.")


def job(*, run_s: float | None, instance: str | None, policy_machine: str = "", cpu_milli: int = 2000,
        memory_mib: int = 2048) -> batch_v1.Job:
    """A job as get_job returns it: scheduled at 0 s, running at 90 s, succeeded at 150 s."""
    found = batch_v1.Job(name=NAME, task_groups=[batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec(
        compute_resource=batch_v1.ComputeResource(cpu_milli=cpu_milli, memory_mib=memory_mib)))])
    if policy_machine:
        found.allocation_policy = batch_v1.AllocationPolicy(instances=[batch_v1.AllocationPolicy.InstancePolicyOrTemplate(
            policy=batch_v1.AllocationPolicy.InstancePolicy(machine_type=policy_machine))])
    found.status = batch_v1.JobStatus(state=batch_v1.JobStatus.State.SUCCEEDED, status_events=[
        event("QUEUED", "SCHEDULED", 0), event("SCHEDULED", "RUNNING", 90), event("RUNNING", "SUCCEEDED", 150)])
    if run_s is not None:
        found.status.run_duration = timedelta(seconds=run_s)
    if instance is not None:
        found.status.task_groups = {"group0": batch_v1.JobStatus.TaskGroupStatus(
            counts={"SUCCEEDED": 1}, instances=[batch_v1.JobStatus.InstanceStatus(
                machine_type=instance, provisioning_model=batch_v1.AllocationPolicy.ProvisioningModel.SPOT, task_pack=1)])}
    return found


def test_usage_from_typed_fields():
    """run_duration and the VM Batch reports win over the events and the job's own request: an
    e2-standard-4 is billed as 4 vCPUs and 16 GiB whatever the task asked for."""
    used = usage.usage_of(job(run_s=61.5, instance="e2-standard-4", policy_machine="n2-standard-2", cpu_milli=500))
    assert (used.vm_seconds, used.time_source) == (61.5, "run_duration")
    assert (used.machine_type, used.machine_source, used.machine_family) == ("e2-standard-4", "instances", "e2")
    assert (used.vcpus, used.memory_gib, used.provisioning_model) == (4.0, 16.0, "SPOT")
    expected = 61.5 / 3600 * (4 * usage.DEFAULT_PRICES["vcpu_hour"]["e2"] + 16 * usage.DEFAULT_PRICES["gib_hour"]["e2"])
    assert abs(usage.estimate(used) - expected) < 1e-9


def test_usage_from_the_wire_shape_of_a_job():
    """The same from the JSON Batch's REST API sends (camelCase, runDuration as a Duration string,
    taskPack as an int64 string), read by the client's own parser."""
    body = {"name": NAME, "status": {"state": "SUCCEEDED", "runDuration": "75.250s", "taskGroups": {"group0": {
        "counts": {"SUCCEEDED": 1}, "instances": [{"machineType": "n2-standard-8", "provisioningModel": "STANDARD",
                                                   "taskPack": "1", "bootDisk": {"type": "pd-balanced", "sizeGb": "30"}}]}}}}
    used = usage.usage_of(batch_v1.Job.from_json(json.dumps(body)))
    assert (used.vm_seconds, used.machine_type, used.vcpus, used.memory_gib) == (75.25, "n2-standard-8", 8.0, 32.0)


def test_usage_falls_back_where_batch_gives_nothing():
    """No run duration (a job still running, or older answers) and no instances: the status
    events' SCHEDULED -> terminal time, and the task's own request."""
    used = usage.usage_of(job(run_s=None, instance=None, cpu_milli=3000, memory_mib=6144))
    assert (used.vm_seconds, used.time_source) == (150.0, "status_events")
    assert (used.machine_type, used.machine_source, used.vcpus, used.memory_gib) == ("", "task", 3.0, 6.0)
    assert "Batch gave no run duration" in usage.summary(used)
    asked = usage.usage_of(job(run_s=None, instance=None, policy_machine="e2-highmem-2"))
    assert (asked.machine_source, asked.vcpus, asked.memory_gib) == ("policy", 2.0, 16.0)


def test_cost_names_the_price_tables_date_and_source(monkeypatch, tmp_path):
    deployment = watch.Deployment("p", "us-central1", "bucket", "", "")
    monkeypatch.setattr(watch.Deployment, "from_config", classmethod(lambda cls: deployment))
    monkeypatch.setattr(watch, "dispatch_jobs", lambda d, dispatch: [job(run_s=61.5, instance="e2-standard-4")])
    monkeypatch.setattr(watch.Deployment, "bucket", lambda self: FakeBucket({}))  # no claims: no warm VM
    drawn = CliRunner().invoke(cli.app, ["cost", "5f1c0d2e"])
    assert drawn.exit_code == 0, drawn.output
    assert f"list prices as of {usage.PRICE_TABLE['as_of']}" in drawn.output
    assert "https://cloud.google.com/compute/vm-instance-pricing" in drawn.output
    as_json = json.loads(CliRunner().invoke(cli.app, ["cost", "5f1c0d2e", "--json"]).output)
    assert as_json["price_table"] == usage.PRICE_TABLE
    (row,) = as_json["jobs"]
    assert (row["machine_type"], row["time_source"], row["vm_s"]) == ("e2-standard-4", "run_duration", 61.5)
    own = tmp_path / "prices.json"
    own.write_text(json.dumps({"as_of": "2027-01-01", "source": "our contract", "vcpu_hour": {"e2": 0.01}}))
    mine = json.loads(CliRunner().invoke(cli.app, ["cost", "5f1c0d2e", "--json", "--prices", str(own)]).output)
    assert mine["price_table"] == {"as_of": "2027-01-01", "source": "our contract"}
