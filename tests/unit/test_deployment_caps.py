"""DeploymentSettings.check and check_pack: a machine type, a boot disk and a pack cannot get a task
more than the deployment's caps allow (issue 23, item 1)."""

from __future__ import annotations

import pytest

from covalent_gcpbatch_plugin import protocol as p
from covalent_gcpbatch_plugin.deployment import CAP_FIELDS
from specs import deployment, spec


def members(n: int) -> tuple[str, ...]:
    return tuple(p.make_job_id("f00dbabe", node, "a1b2c3d4") for node in range(n))


def refused(settings, task, fragment: str) -> None:
    with pytest.raises(p.SpecError) as info:
        settings.check(task)
    assert fragment in str(info.value), str(info.value)


def test_a_gpu_machine_type_cannot_bypass_the_vcpu_and_gpu_caps():
    """The issue's case: vcpus=1 with a3-highgpu-8g (208 vCPUs, 8 H100s) under --max-vcpus 2
    --max-accelerator-count 0 passed before, since only the explicit fields were capped."""
    settings = deployment(max_vcpus=2, max_accelerator_count=0)
    task = spec(vcpus=1, options=p.JobOptions(machine_type="a3-highgpu-8g"))
    refused(settings, task, "machine_type 'a3-highgpu-8g' has 208 vCPUs, over this deployment's cap of 2 (--max-vcpus)")
    refused(deployment(max_vcpus=256, max_memory_mb=2 * 1024 * 1024, max_accelerator_count=0), task,
            "has 8 GPUs, over this deployment's cap of 0 (--max-accelerator-count)")


def test_a_machine_type_s_gpus_add_to_accelerator_count():
    settings = deployment(max_vcpus=64, max_accelerator_count=2)
    settings.check(spec(options=p.JobOptions(machine_type="g2-standard-24")))  # 2 L4s: at the cap
    refused(settings, spec(options=p.JobOptions(machine_type="g2-standard-48")), "has 4 GPUs")
    n1 = deployment(max_accelerator_count=1)
    n1.check(spec(options=p.JobOptions(machine_type="n1-standard-4", accelerator_type="nvidia-tesla-t4", accelerator_count=1)))


def test_a_custom_machine_type_over_the_memory_cap_is_refused():
    settings = deployment(max_vcpus=8, max_memory_mb=16384)
    settings.check(spec(options=p.JobOptions(machine_type="n2-custom-4-16384")))
    refused(settings, spec(memory_mb=1024, options=p.JobOptions(machine_type="n2-custom-4-32768-ext")),
            "machine_type 'n2-custom-4-32768-ext' has 32768 MiB of memory, over this deployment's cap of 16384 (--max-memory-mb)")


def test_an_unknown_machine_type_is_refused_unless_allowed_by_name():
    refused(deployment(), spec(options=p.JobOptions(machine_type="c3-standard-8")),
            "machine_type 'c3-standard-8' is not one whose vCPUs, memory and GPUs this deployment knows")
    refused(deployment(), spec(options=p.JobOptions(machine_type="c3-standard-8")), "--allowed-machine-types c3-standard-8")
    # The deployer's explicit consent: sized by the task's own fields, which are still capped.
    allowed = deployment(allowed_machine_types=("c3-standard-8", "n2-standard-4"))
    allowed.check(spec(options=p.JobOptions(machine_type="c3-standard-8")))
    refused(allowed, spec(vcpus=16, options=p.JobOptions(machine_type="c3-standard-8")), "vcpus=16 exceeds")
    # A known type on the allowlist is still capped by its size.
    refused(deployment(max_vcpus=2, allowed_machine_types=("n2-standard-4",)),
            spec(vcpus=1, options=p.JobOptions(machine_type="n2-standard-4")), "has 4 vCPUs")


def test_a_known_machine_type_within_the_caps_passes():
    deployment().check(spec(options=p.JobOptions(machine_type="e2-standard-4")))
    deployment().check(spec(options=p.JobOptions(machine_type="n2-standard-8")))  # 8 vCPUs, the cap


def test_the_boot_disk_is_capped():
    settings = deployment(max_boot_disk_size_gb=200)
    settings.check(spec(options=p.JobOptions(boot_disk_size_gb=200)))
    refused(settings, spec(options=p.JobOptions(boot_disk_size_gb=201)), "boot_disk_size_gb=201 exceeds this deployment's cap of 200")
    refused(deployment(), spec(options=p.JobOptions(boot_disk_size_gb=8192)), "boot_disk_size_gb=8192 exceeds")


def test_a_pack_is_capped_as_a_whole_by_its_tasks_at_once():
    settings = deployment(max_vcpus=8, max_parallel_vcpus=100)
    task = spec(vcpus=2)
    settings.check(task)  # each task is within the per-task caps
    settings.check_pack(task, p.PackManifest(members=members(50)))  # all 50 at once: 100 vCPUs
    with pytest.raises(p.SpecError) as info:
        settings.check_pack(task, p.PackManifest(members=members(51)))
    assert "the pack runs 51 tasks of 2 vCPUs at once, 102 vCPUs" in str(info.value)
    assert "set pack_parallelism to at most 50" in str(info.value)
    settings.check_pack(task, p.PackManifest(members=members(200), parallelism=50))
    with pytest.raises(p.SpecError, match="--max-parallel-vcpus"):
        settings.check_pack(task, p.PackManifest(members=members(200), parallelism=60))
    settings.check_pack(task, p.PackManifest(members=members(10), parallelism=5000))  # never more than its members


def test_a_pack_counts_its_machine_type_s_vcpus():
    settings = deployment(max_vcpus=8, max_parallel_vcpus=64)
    task = spec(vcpus=1, options=p.JobOptions(machine_type="n2-standard-8"))
    settings.check_pack(task, p.PackManifest(members=members(8)))
    with pytest.raises(p.SpecError, match="9 tasks of 8 vCPUs"):
        settings.check_pack(task, p.PackManifest(members=members(9)))


def test_a_lone_task_is_within_max_parallel_vcpus():
    refused(deployment(max_vcpus=8, max_parallel_vcpus=4), spec(vcpus=6), "a task of 6 vCPUs exceeds this deployment's cap of 4")


def test_the_defaults_take_a_pack_at_the_executor_s_defaults():
    """1,000 electrons (the most a pack holds) of 2 vCPUs (the executor's default), all at once."""
    settings = deployment(max_vcpus=64)
    settings.check_pack(spec(vcpus=2), p.PackManifest(members=members(p.MAX_PACK_TASKS)))


def test_the_new_caps_are_caps():
    assert {"max_boot_disk_size_gb", "max_parallel_vcpus"} <= set(CAP_FIELDS)


def test_the_scratch_disk_is_capped():
    settings = deployment(max_scratch_disk_gb=750)
    settings.check(spec(options=p.JobOptions(scratch_disk_gb=750)))
    refused(settings, spec(options=p.JobOptions(scratch_disk_gb=751)), "scratch_disk_gb=751 exceeds this deployment's cap of 750")
    assert "max_scratch_disk_gb" in CAP_FIELDS

MOUNTS = p.JobOptions(gcs_volumes={"/mnt/data": "gs://shared-data/in", "/mnt/out": {"uri": "gs://results", "read_only": False}})


def test_mounted_buckets_must_be_on_the_deployments_allowlists():
    """Issue 26, item 3: nothing may be mounted by default; a read-only mount's bucket on either
    list, a read-write mount's on the writable list only; the error names the flag."""
    refused(deployment(), spec(options=MOUNTS), "deploy.sh up --allowed-mount-buckets shared-data")
    refused(deployment(allowed_mount_buckets=("shared-data", "results")), spec(options=MOUNTS),
            "bucket 'results' may not be mounted read-write by this deployment (allowed: none): ask the deployer "
            "to add it (deploy.sh up --allowed-writable-mount-buckets results)")
    deployment(allowed_mount_buckets=("shared-data",), allowed_writable_mount_buckets=("results",)).check(spec(options=MOUNTS))
    deployment(allowed_writable_mount_buckets=("shared-data", "results")).check(spec(options=MOUNTS))


def test_secrets_must_be_on_the_deployments_allowlist_by_full_name():
    """Issue 26, item 5: any version of an allowed secret; another secret (even a prefix match) is refused."""
    task = spec(options=p.JobOptions(secrets={"API_KEY": "projects/my-project/secrets/api-key/versions/latest"}))
    refused(deployment(), task, "deploy.sh up --allowed-secrets projects/my-project/secrets/api-key")
    refused(deployment(allowed_secrets=("projects/my-project/secrets/api",)), task, "is not allowed by this deployment")
    deployment(allowed_secrets=("projects/my-project/secrets/api-key",)).check(task)


@pytest.mark.parametrize("field, value, message", [
    ("allowed_mount_buckets", "gs://shared-data", "is not a bucket name"),
    ("allowed_secrets", "projects/p1/secrets/*", "is not a secret's full name"),
    ("allowed_secrets", "projects/p1/secrets/s/versions/1", "is not a secret's full name"),
])
def test_allowlist_entries_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        deployment(**{field: value})


def test_allowlists_are_caps_and_read_from_the_environment(monkeypatch):
    assert {"allowed_mount_buckets", "allowed_writable_mount_buckets", "allowed_secrets"} <= set(CAP_FIELDS)
    env = deployment(allowed_mount_buckets=("a-bucket", "b-bucket"), allowed_secrets=("projects/p1/secrets/s",)).to_env()
    assert env["GCPBATCH_ALLOWED_MOUNT_BUCKETS"] == "a-bucket,b-bucket"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from covalent_gcpbatch_plugin.deployment import DeploymentSettings

    settings = DeploymentSettings.from_env()
    assert settings.allowed_mount_buckets == ("a-bucket", "b-bucket") and settings.allowed_secrets == ("projects/p1/secrets/s",)
