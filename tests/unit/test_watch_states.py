"""Job and task states newer than the installed google-cloud-batch client: reported, not a crash."""

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_plugin import usage

pytestmark = pytest.mark.filterwarnings("ignore:Unrecognized State enum value")


def job_in_state(state: int) -> batch_v1.Job:
    name = "projects/p/locations/r/jobs/cov-8f1c2d3e-0-a1b2c3d4"
    return batch_v1.Job.from_json('{"name": "%s", "status": {"state": %d}}' % (name, state))


def test_an_unknown_state_is_named_with_its_number():
    job = job_in_state(17)
    assert isinstance(job.status.state, int) and not hasattr(job.status.state, "name"), "proto-plus gives an int"
    assert usage.state_name(job.status.state) == "UNKNOWN(17)"
    assert usage.state_name(batch_v1.JobStatus.State.RUNNING) == "RUNNING"
    assert usage.state_name(batch_v1.TaskStatus.State.ASSIGNED) == "ASSIGNED"


def test_usage_of_a_job_in_an_unknown_state():
    used = usage.usage_of(job_in_state(99))
    assert used.state == "UNKNOWN(99)"
    assert usage.summary(used).startswith("job cov-8f1c2d3e-0-a1b2c3d4 UNKNOWN(99): VM 0.0 s")
