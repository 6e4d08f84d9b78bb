"""Job spec -> Batch Job translation, checked on real batch_v1 types and their JSON wire form."""

import json

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_plugin import jobs
from covalent_gcpbatch_plugin import protocol as p
from specs import deployment, spec

JOB_ID = "cov-8f1c2d3e-3-a1b2c3d4"


def build(**overrides) -> batch_v1.Job:
    return jobs.build_job(spec(**overrides), bucket="tasks-bucket", job_id=JOB_ID, settings=deployment())


def test_container_resources_and_limits():
    job = build(vcpus=0.5, memory_mb=1536, time_limit_s=900, retries=2)
    (group,) = job.task_groups
    assert group.task_count == 1
    task = group.task_spec
    assert task.runnables[0].container.image_uri == "us-docker.pkg.dev/my-project/covalent/worker:1"
    assert task.compute_resource.cpu_milli == 500 and task.compute_resource.memory_mib == 1536
    assert task.max_run_duration.total_seconds() == 900
    assert task.max_retry_count == 2
    assert dict(task.environment.variables) == {p.ENV_BUCKET: "tasks-bucket", p.ENV_JOB_ID: JOB_ID}


def test_task_failures_are_never_retried_but_infrastructure_failures_are():
    """One RETRY_TASK policy on Batch's transient infrastructure codes: everything else fails at
    once (a task that raised, was killed for memory (137), exited 1, or hit its time limit)."""
    (policy,) = build().task_groups[0].task_spec.lifecycle_policies
    assert policy.action == batch_v1.LifecyclePolicy.Action.RETRY_TASK
    assert set(policy.action_condition.exit_codes) == {50001, 50002, 50003, 50004, 50006}
    never = {p.EXIT_TASK_FAILED, p.EXIT_WORKER_ERROR, p.EXIT_UPLOAD_FAILED, p.EXIT_CANCELLED, p.EXIT_TOO_LATE, 50005, 137, 1}
    assert not set(policy.action_condition.exit_codes) & never


def test_runs_as_the_deployment_account_and_notifies_its_topic():
    job = build(service_account_email=None)
    assert job.allocation_policy.service_account.email == "runner@my-project.iam.gserviceaccount.com"
    assert list(job.allocation_policy.location.allowed_locations) == ["regions/us-east1"]
    (notification,) = job.notifications
    assert notification.pubsub_topic == "projects/my-project/topics/jobs"
    assert notification.message.type_ == batch_v1.JobNotification.Type.JOB_STATE_CHANGED
    assert job.logs_policy.destination == batch_v1.LogsPolicy.Destination.CLOUD_LOGGING


def test_labels_follow_label_rules():
    labels = dict(build(dispatch_id="Mixed.Case_ID").labels)
    assert labels["covalent-dispatch-id"] == "mixed-case_id"
    assert labels["covalent-node-id"] == "3"
    assert all(len(v) <= 63 and v == v.lower() for v in labels.values())


def test_every_job_names_its_deployment_by_its_bucket():
    """`covalent-gcpbatch jobs` lists and cancels one deployment's jobs by this label (watch.py
    filters on the same constant): the bucket's name, as a label value; a user's label of the same
    key cannot change it, and the VMs carry it too."""
    job = jobs.build_job(spec(options=p.JobOptions(labels={jobs.DEPLOYMENT_LABEL: "someone-elses", "team": "a"})),
                         bucket="My.Data_Bucket-1",
                         job_id=JOB_ID, settings=deployment())
    assert jobs.DEPLOYMENT_LABEL == "covalent-deployment"
    assert job.labels[jobs.DEPLOYMENT_LABEL] == "my-data_bucket-1" == jobs.deployment_label_value("My.Data_Bucket-1")
    assert job.labels[jobs.CREATED_BY_LABEL] == jobs.CREATED_BY and job.labels["team"] == "a"
    assert dict(job.allocation_policy.labels) == dict(job.labels)
    assert jobs.deployment_label_value("b" * 222) == "b" * 63


def test_wire_form_is_what_the_rest_client_sends():
    wire = batch_v1.Job.to_json(build(), use_integers_for_enums=True)
    assert '"maxRunDuration": "300s"' in wire
    assert batch_v1.Job.from_json(wire) == build()


@pytest.mark.parametrize("machine_type, drivers", [("g2-standard-4", True), ("a2-highgpu-1g", True), ("a3-highgpu-8g", True),
                                                   ("n2-standard-4", False), ("", False)])
def test_gpu_machine_families_get_their_drivers(machine_type, drivers):
    """g2/a2/a3 VMs come with GPUs: Batch must install the drivers though accelerator_count is 0."""
    (instances,) = build(options=p.JobOptions(machine_type=machine_type)).allocation_policy.instances
    assert instances.install_gpu_drivers is drivers
    (off,) = build(options=p.JobOptions(machine_type=machine_type, install_gpu_drivers=False)).allocation_policy.instances
    assert off.install_gpu_drivers is False, "the user can still opt out"


def test_no_external_ip_needs_network_and_subnetwork():
    with pytest.raises(ValueError, match="no_external_ip needs network and subnetwork"):
        p.JobOptions(no_external_ip=True, network="global/networks/private")
    p.JobOptions(no_external_ip=True, network="global/networks/private", subnetwork="regions/us-east1/subnetworks/b")


def test_job_options_shape_the_allocation_policy():
    options = p.JobOptions(
        machine_type="n1-standard-4",
        provisioning="spot",
        accelerator_type="nvidia-tesla-t4",
        accelerator_count=1,
        boot_disk_size_gb=100,
        labels={"team": "ml", "covalent-node-id": "spoofed"},
        network="global/networks/private",
        subnetwork="regions/us-east1/subnetworks/batch",
        no_external_ip=True,
        allowed_locations=("zones/us-east1-b",),
    )
    job = build(options=options)
    Policy = batch_v1.AllocationPolicy
    (instances,) = job.allocation_policy.instances
    assert instances.policy.machine_type == "n1-standard-4"
    assert instances.policy.provisioning_model == Policy.ProvisioningModel.SPOT
    assert [(a.type_, a.count) for a in instances.policy.accelerators] == [("nvidia-tesla-t4", 1)]
    assert instances.install_gpu_drivers is True
    assert instances.policy.boot_disk.size_gb == 100
    (nic,) = job.allocation_policy.network.network_interfaces
    assert (nic.network, nic.subnetwork, nic.no_external_ip_address) == ("global/networks/private", "regions/us-east1/subnetworks/batch", True)
    assert list(job.allocation_policy.location.allowed_locations) == ["zones/us-east1-b"]
    assert job.labels["team"] == "ml" and job.labels["covalent-node-id"] == "3", "automatic labels win"
    assert dict(job.allocation_policy.labels) == dict(job.labels), "the VMs carry the job's labels (billing exports)"


def test_default_options_keep_batch_defaults():
    (instances,) = build().allocation_policy.instances
    assert instances.policy.provisioning_model == batch_v1.AllocationPolicy.ProvisioningModel.STANDARD
    assert not instances.policy.accelerators and not instances.install_gpu_drivers
    assert not build().allocation_policy.network.network_interfaces


@pytest.mark.parametrize("options", [p.JobOptions(accelerator_type="nvidia-l4", accelerator_count=1),
                                     p.JobOptions(machine_type="g2-standard-4"), p.JobOptions()])
def test_the_worker_container_runs_unprivileged_on_gpu_and_cpu_vms(options):
    """Batch gives a container on a GPU VM whose drivers it installed the GPUs and driver libraries
    itself: no --privileged (root on the VM for the user's code) and no /var/lib/nvidia mounts,
    which Nextflow dropped in 2025 (PR #5406: "now automatically handled by Google Cloud")."""
    job = build(options=options)
    (runnable,) = job.task_groups[0].task_spec.runnables
    assert isinstance(runnable.container, batch_v1.Runnable.Container)
    assert runnable.container.options == "" and list(runnable.container.volumes) == []
    assert job.allocation_policy.instances[0].install_gpu_drivers is jobs.has_gpus(options)


# -- Issue 26: scratch disks and disk types, reservations and flex-start, image streaming -----------


def test_a_scratch_disk_is_an_attached_disk_and_a_volume_the_container_gets_by_default():
    job = build(options=p.JobOptions(machine_type="n2-standard-8", scratch_disk_gb=750, scratch_disk_type="local-ssd"))
    (disk,) = job.allocation_policy.instances[0].policy.disks
    assert isinstance(disk, batch_v1.AllocationPolicy.AttachedDisk)
    assert (disk.new_disk.type_, disk.new_disk.size_gb, disk.device_name) == ("local-ssd", 750, p.SCRATCH_DEVICE_NAME)
    task = job.task_groups[0].task_spec
    (volume,) = task.volumes
    assert (volume.device_name, volume.mount_path) == (disk.device_name, "/mnt/disks/scratch")
    assert list(task.runnables[0].container.volumes) == [], "Batch mounts TaskSpec volumes in the container at the same path"
    assert batch_v1.Job.from_json(batch_v1.Job.to_json(job)) == job
    plain = build()
    assert not plain.allocation_policy.instances[0].policy.disks and not plain.task_groups[0].task_spec.volumes


def test_boot_disk_type_and_hyperdisk_only_families():
    (policy,) = [i.policy for i in build(options=p.JobOptions(boot_disk_type="pd-ssd", boot_disk_size_gb=50)).allocation_policy.instances]
    assert (policy.boot_disk.type_, policy.boot_disk.size_gb) == ("pd-ssd", 50)
    assert "boot_disk" not in build().allocation_policy.instances[0].policy, "Batch's default boot disk"
    c4 = build(options=p.JobOptions(machine_type="c4-standard-8")).allocation_policy.instances[0].policy
    assert c4.boot_disk.type_ == "hyperdisk-balanced" and c4.boot_disk.size_gb == 0
    with pytest.raises(ValueError, match="takes Hyperdisk only, not boot_disk_type='pd-balanced'"):
        p.JobOptions(machine_type="n4-standard-4", boot_disk_type="pd-balanced")
    with pytest.raises(ValueError, match="scratch_disk_type='pd-ssd'"):
        p.JobOptions(machine_type="c4-standard-8", scratch_disk_gb=100, scratch_disk_type="pd-ssd")


@pytest.mark.parametrize("options, fragment", [
    (dict(machine_type="n2-standard-8", scratch_disk_gb=400, scratch_disk_type="local-ssd"), "set scratch_disk_gb to e.g. 750"),
    (dict(scratch_disk_gb=375, scratch_disk_type="local-ssd"), "needs a machine_type that takes local SSDs"),
    (dict(machine_type="e2-standard-4", scratch_disk_gb=375, scratch_disk_type="local-ssd"), "not 'e2-standard-4'"),
    (dict(scratch_disk_type="nvme"), "scratch_disk_type"),
])
def test_impossible_scratch_disks_are_refused_naming_the_fix(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        p.JobOptions(**options)


@pytest.mark.parametrize("reservation, provisioning, field", [
    ("any", "STANDARD", ""),
    ("none", "STANDARD", "NO_RESERVATION"),
    ("gpu-pool", "STANDARD", "projects/my-project/reservations/gpu-pool"),
    ("projects/other-project/reservations/gpu-pool", "STANDARD", "projects/other-project/reservations/gpu-pool"),
    ("any", "FLEX_START", "NO_RESERVATION"),
])
def test_reservation_and_provisioning_shape_the_instance_policy(reservation, provisioning, field):
    options = p.JobOptions(machine_type="g2-standard-4", reservation=reservation, provisioning=provisioning)
    policy = build(options=options).allocation_policy.instances[0].policy
    assert policy.reservation == field
    assert policy.provisioning_model == batch_v1.AllocationPolicy.ProvisioningModel[provisioning]


@pytest.mark.parametrize("options, fragment", [
    (dict(machine_type="n2-standard-4", reservation="r1", provisioning="SPOT"), "provisioning SPOT cannot consume reservation"),
    (dict(machine_type="a2-highgpu-1g", reservation="r1", provisioning="FLEX_START"), "use provisioning STANDARD"),
    (dict(reservation="r1"), "reservation 'r1' needs machine_type"),
    (dict(provisioning="flex_start"), "FLEX_START needs a machine_type of the a2, a3, a4, g2 or h4d"),
    (dict(machine_type="n1-standard-4", accelerator_type="nvidia-tesla-t4", accelerator_count=1, provisioning="FLEX_START"),
     "not 'n1-standard-4'"),
    (dict(reservation="Not_A_Name"), "reservation"),
])
def test_impossible_capacity_combinations_are_refused_naming_the_fix(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        p.JobOptions(**options)


def test_flex_start_runs_at_most_seven_days():
    flex = p.JobOptions(machine_type="a3-highgpu-1g", provisioning="FLEX_START")
    spec(options=flex, time_limit_s=7 * 24 * 3600)
    with pytest.raises(ValueError, match="at most 7 days"):
        spec(options=flex, time_limit_s=7 * 24 * 3600 + 1)


def test_image_streaming_sets_the_container_and_needs_artifact_registry_in_the_region():
    streamed = p.JobOptions(image_streaming=True)
    (runnable,) = build(options=streamed).task_groups[0].task_spec.runnables
    assert runnable.container.enable_image_streaming is True  # us-docker.pkg.dev holds us-east1
    assert build().task_groups[0].task_spec.runnables[0].container.enable_image_streaming is False
    spec(options=streamed, container_image_uri="us-east1-docker.pkg.dev/my-project/covalent/worker:1")
    with pytest.raises(ValueError, match="needs an Artifact Registry image"):
        spec(options=streamed, container_image_uri="gcr.io/my-project/worker:1")
    with pytest.raises(ValueError, match="in the job's region 'us-east1'"):
        spec(options=streamed, container_image_uri="europe-west1-docker.pkg.dev/my-project/covalent/worker:1")
    with pytest.raises(ValueError, match="not in 'us-west1'"):
        spec(options=streamed, container_image_uri="us-west1-docker.pkg.dev/my-project/covalent/worker:1")


def test_the_function_refuses_what_the_executor_refuses():
    """The same rules reach the function through the spec's metadata (SpecError, not a job)."""
    bad = spec().model_dump()
    bad["options"] = dict(image_streaming=True)
    bad["container_image_uri"] = "gcr.io/my-project/worker:1"
    import json
    with pytest.raises(p.SpecError, match="image_streaming needs an Artifact Registry image"):
        p.JobSpec.from_metadata({p.SPEC_METADATA_KEY: json.dumps(bad)})

def wire_task_spec(job: batch_v1.Job) -> dict:
    """The task spec as the REST client sends it: camelCase, fields at their defaults left out."""
    text = batch_v1.Job.to_json(job, always_print_fields_with_no_presence=False)
    return json.loads(text)["taskGroups"][0]["taskSpec"]


def test_gcs_volumes_are_gcsfuse_volumes_bound_into_the_container():
    """gcs_volumes (issue 26, item 3): a TaskSpec volume per bucket (GCS.remote_path "bucket" or
    "bucket/folder/"), read-only by gcsfuse's -o ro unless asked to write, the task's own gcsfuse
    flags after it, and each bound into the container at the same path, ro or rw (Container.volumes;
    without it Batch would bind a GCS volume rw whatever its options)."""
    job = build(options=p.JobOptions(gcs_volumes={
        "/mnt/data": "gs://my-data/inputs/2024",
        "/mnt/out": {"uri": "gs://my-results", "read_only": False, "mount_options": ["--implicit-dirs"]},
    }))
    task = job.task_groups[0].task_spec
    assert [type(v) for v in task.volumes] == [batch_v1.Volume, batch_v1.Volume]
    data, out = task.volumes
    assert (data.gcs.remote_path, data.mount_path, list(data.mount_options)) == ("my-data/inputs/2024/", "/mnt/data", ["-o ro"])
    assert (out.gcs.remote_path, out.mount_path, list(out.mount_options)) == ("my-results", "/mnt/out", ["-o rw", "--implicit-dirs"])
    assert list(task.runnables[0].container.volumes) == ["/mnt/data:/mnt/data:ro", "/mnt/out:/mnt/out:rw"]
    # As the client sends it (camelCase JSON, Batch's REST names).
    wire = wire_task_spec(job)
    assert wire["volumes"][0] == {"gcs": {"remotePath": "my-data/inputs/2024/"}, "mountPath": "/mnt/data", "mountOptions": ["-o ro"]}
    assert wire["runnables"][0]["container"]["volumes"] == ["/mnt/data:/mnt/data:ro", "/mnt/out:/mnt/out:rw"]
    # No volumes asked for, none sent.
    plain = build().task_groups[0].task_spec
    assert list(plain.volumes) == [] and list(plain.runnables[0].container.volumes) == []


def test_secrets_are_secret_variables_of_the_task_environment():
    """secrets (issue 26, item 5): Batch's Environment.secret_variables (names of secret versions; the
    VM reads the values), beside the worker's own variables, never among them."""
    version = "projects/my-project/secrets/api-key/versions/3"
    job = build(options=p.JobOptions(secrets={"API_KEY": version}))
    environment = job.task_groups[0].task_spec.environment
    assert dict(environment.secret_variables) == {"API_KEY": version}
    assert dict(environment.variables) == {p.ENV_BUCKET: "tasks-bucket", p.ENV_JOB_ID: JOB_ID}
    wire = wire_task_spec(job)["environment"]
    assert wire["secretVariables"] == {"API_KEY": version}
    assert "secretVariables" not in wire_task_spec(build())["environment"]


def test_a_lone_job_kept_warm_lives_for_its_vm_and_tells_its_task_states():
    """keep_warm: the job's max run duration is the deployment's warm lifetime (its worker bounds
    each electron by its own time limit), its worker learns where offers come from, and its task
    state changes are notified (an electron lent its VM hears the VM's task fail)."""
    settings = deployment(warm_lifetime_s=7200)
    warm = spec(options=p.JobOptions(keep_warm=60))
    job = jobs.build_job(warm, bucket="b", job_id="cov-abc-1-x", settings=settings)
    task = job.task_groups[0].task_spec
    assert task.max_run_duration.seconds == 7200
    env = dict(task.environment.variables)
    assert env[p.ENV_WARM_SUBSCRIPTION] == settings.warm_subscription_path
    assert env[p.ENV_TOPIC] == settings.topic_path and env[p.ENV_WARM_LIFETIME_S] == "7200"
    kinds = {n.message.type_ for n in job.notifications}
    assert batch_v1.JobNotification.Type.TASK_STATE_CHANGED in kinds
    for cold in (jobs.build_job(spec(), bucket="b", job_id="cov-abc-1-x", settings=settings),
                 jobs.build_job(warm, bucket="b", job_id="cov-abc-1-x", settings=deployment(max_keep_warm_s=0)),
                 jobs.build_job(warm, bucket="b", job_id="cov-abc-pack-x", settings=settings,
                                pack=p.PackManifest(members=("cov-abc-1-x", "cov-abc-2-x")))):
        task = cold.task_groups[0].task_spec
        assert p.ENV_WARM_SUBSCRIPTION not in dict(task.environment.variables)
        assert task.max_run_duration.seconds == 300
