"""Translation of a validated job spec into a Batch ``Job``: pure functions, no I/O.

The Cloud Function calls ``build_job``; the tests check its output against real ``batch_v1`` types.
"""

from __future__ import annotations

import re

from google.cloud import batch_v1
from google.protobuf import duration_pb2

from .deployment import DeploymentSettings
from .protocol import (
    HYPERDISK_ONLY_FAMILIES,
    NO_RESERVATION,
    RETRIED_EXIT_CODES,
    SCRATCH_DEVICE_NAME,
    SCRATCH_MOUNT_PATH,
    JobSpec,
    PackManifest,
    location_name,
    pack_environment,
    warm_environment,
    worker_environment,
)

_LABEL_INVALID = re.compile(r"[^a-z0-9_-]")


def sanitize_label_value(value: str) -> str:
    """GCP label values: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return _LABEL_INVALID.sub("-", value.lower())[:63]


#: Every job of the plugin carries CREATED_BY_LABEL = CREATED_BY, and DEPLOYMENT_LABEL naming the
#: deployment that created it (``deployment_label_value`` of its bucket): ``covalent-gcpbatch jobs``
#: lists and cancels only its own deployment's jobs by them (watch.py), declared here once.
CREATED_BY_LABEL = "created-by"
CREATED_BY = "covalent-gcpbatch"
DEPLOYMENT_LABEL = "covalent-deployment"
#: And the dispatch and node of its electron (a pack's: of its first), by which `jobs`, `logs` and
#: `cost` find a dispatch's jobs.
DISPATCH_LABEL = "covalent-dispatch-id"
NODE_LABEL = "covalent-node-id"


def deployment_label_value(bucket: str) -> str:
    """The deployment's label value: its bucket's name (unique across Google Cloud, one per
    deployment, and known to the function and to the Covalent config alike), as a label value."""
    return sanitize_label_value(bucket)


def job_labels(spec: JobSpec, pack: PackManifest | None = None, *, bucket: str = "") -> dict[str, str]:
    """The user's labels plus automatic ones, which win: they are how a job is traced back, to its
    dispatch, node and deployment (``bucket``, its data bucket). A pack's job names the node of its
    first electron and how many it runs."""
    labels = {
        **spec.options.labels,
        DISPATCH_LABEL: sanitize_label_value(spec.dispatch_id),
        NODE_LABEL: str(spec.node_id),
        CREATED_BY_LABEL: CREATED_BY,
    }
    if bucket:
        labels[DEPLOYMENT_LABEL] = deployment_label_value(bucket)
    if pack is not None:
        labels["covalent-pack-tasks"] = str(len(pack.members))
    return labels


def build_task_spec(spec: JobSpec, *, environment: dict[str, str], max_run_s: int | None = None) -> batch_v1.TaskSpec:
    """One container runnable (the worker image's entrypoint runs the task), sized and bounded.

    Retries are for infrastructure failures only: a RETRY_TASK lifecycle policy on
    ``RETRIED_EXIT_CODES`` (preemption, VM loss) retries those ``retries`` times and fails every
    other non-zero exit at once, so the user's code is never re-run for its own failure.

    A scratch disk is a volume at SCRATCH_MOUNT_PATH, mounted buckets are gcsfuse volumes
    (``build_volumes``); the container sees each at the same path.
    """
    # Container.volumes: "If the TaskSpec.Volumes field is specified but this field is not, Batch
    # will mount each volume ... read-write (rw) for other volume types, regardless of the original
    # mount options" (batch_v1.Runnable.Container, google-cloud-batch 0.22.4): so each bucket is
    # bound into the container explicitly, ro or rw as asked (as Nextflow's GoogleBatchScriptLauncher
    # binds its gcsfuse mounts, path:path:rw), and then the scratch disk must be named too.
    binds = [f"{path}:{path}:{'ro' if v.read_only else 'rw'}" for path, v in spec.options.gcs_volumes.items()]
    volumes = build_volumes(spec)
    if spec.options.scratch_disk_gb:
        volumes.insert(0, batch_v1.Volume(device_name=SCRATCH_DEVICE_NAME, mount_path=SCRATCH_MOUNT_PATH))
        if binds:
            binds.insert(0, f"{SCRATCH_MOUNT_PATH}:{SCRATCH_MOUNT_PATH}:rw")
    container = batch_v1.Runnable.Container(image_uri=spec.container_image_uri, volumes=binds,
                                            enable_image_streaming=spec.options.image_streaming)
    return batch_v1.TaskSpec(
        runnables=[batch_v1.Runnable(container=container)],
        volumes=volumes,
        compute_resource=batch_v1.ComputeResource(
            cpu_milli=round(spec.vcpus * 1000),
            memory_mib=spec.memory_mb,
        ),
        # A warm VM's job lives for several electrons (``max_run_s``); its worker bounds each by its own time_limit.
        max_run_duration=duration_pb2.Duration(seconds=max_run_s or spec.time_limit_s),
        max_retry_count=spec.retries,
        lifecycle_policies=[
            batch_v1.LifecyclePolicy(
                action=batch_v1.LifecyclePolicy.Action.RETRY_TASK,
                action_condition=batch_v1.LifecyclePolicy.ActionCondition(exit_codes=list(RETRIED_EXIT_CODES)),
            )
        ],
        # secret_variables: "environment variable names to Secret Manager secret names. The VM will
        # access the named secrets to set the value of each environment variable" (batch_v1.Environment):
        # the job carries names only, and the job's service account needs secretAccessor on each
        # (https://cloud.google.com/batch/docs/create-run-job-secret-manager).
        environment=batch_v1.Environment(variables=environment, secret_variables=dict(spec.options.secrets)),
    )


def build_volumes(spec: JobSpec) -> list[batch_v1.Volume]:
    """The task's buckets, mounted by Batch with gcsfuse on the VM (batch_v1.Volume: "For a Cloud
    Storage bucket, all the mount options provided by the gcsfuse tool are supported"): read-only
    by gcsfuse's ``-o ro`` unless the task asked to write (``-o rw``, Nextflow's default), then the
    task's own options, in the order of ``gcs_volumes``."""
    return [
        batch_v1.Volume(gcs=batch_v1.GCS(remote_path=volume.remote_path), mount_path=path,
                        mount_options=["-o ro" if volume.read_only else "-o rw", *volume.mount_options])
        for path, volume in spec.options.gcs_volumes.items()
    ]


#: Machine families whose VMs come with GPUs attached (A100, H100, L4): they need the drivers even
#: when no accelerator is asked for separately.
GPU_MACHINE_FAMILIES = ("a2-", "a3-", "g2-")


def has_gpus(options) -> bool:
    return bool(options.accelerator_count) or options.machine_type.startswith(GPU_MACHINE_FAMILIES)


def reservation_field(spec: JobSpec) -> str:
    """InstancePolicy.reservation for the spec: "" (any matching one, Batch's default), NO_RESERVATION,
    or the named one's path. Flex-start VMs consume none (Compute Engine creates them with
    reservation affinity none, "About Flex-start VMs")."""
    reservation = spec.options.reservation
    if reservation == "none" or spec.options.provisioning == "FLEX_START":
        return NO_RESERVATION
    if reservation == "any":
        return ""
    return reservation if "/" in reservation else f"projects/{spec.project_id}/reservations/{reservation}"


def boot_disk_type(options) -> str:
    """The boot disk's type: the user's, else hyperdisk-balanced for the families that take only
    Hyperdisk (Batch's default, pd-balanced, fails there: Nextflow PR #6841 sets it so), else Batch's."""
    if options.boot_disk_type:
        return options.boot_disk_type
    return "hyperdisk-balanced" if options.machine_type.startswith(HYPERDISK_ONLY_FAMILIES) else ""


def build_allocation_policy(spec: JobSpec, settings: DeploymentSettings) -> batch_v1.AllocationPolicy:
    """Where and on what the task runs: machine, provisioning, reservation, GPUs, disks, network,
    locations, and the deployment's service account (never one from the spec)."""
    Policy = batch_v1.AllocationPolicy
    options = spec.options
    instance = Policy.InstancePolicy(
        machine_type=options.machine_type,
        provisioning_model=Policy.ProvisioningModel[options.provisioning],
        reservation=reservation_field(spec),
    )
    if options.accelerator_count:
        instance.accelerators = [Policy.Accelerator(type_=options.accelerator_type, count=options.accelerator_count)]
    if options.boot_disk_size_gb or boot_disk_type(options):
        instance.boot_disk = Policy.Disk(size_gb=options.boot_disk_size_gb, type_=boot_disk_type(options))
    if options.scratch_disk_gb:
        instance.disks = [Policy.AttachedDisk(
            new_disk=Policy.Disk(type_=options.scratch_disk_type, size_gb=options.scratch_disk_gb),
            device_name=SCRATCH_DEVICE_NAME)]
    allocation = Policy(
        instances=[
            Policy.InstancePolicyOrTemplate(
                policy=instance,
                install_gpu_drivers=options.install_gpu_drivers and has_gpus(options),
            )
        ],
        location=Policy.LocationPolicy(allowed_locations=list(options.allowed_locations) or [f"regions/{settings.region}"]),
    )
    if options.network or options.subnetwork or options.no_external_ip:
        allocation.network = Policy.NetworkPolicy(
            network_interfaces=[
                Policy.NetworkInterface(
                    network=options.network,
                    subnetwork=options.subnetwork,
                    no_external_ip_address=options.no_external_ip,
                )
            ]
        )
    if settings.job_service_account:
        allocation.service_account = batch_v1.ServiceAccount(email=settings.job_service_account)
    return allocation


#: Tasks Batch may place on one VM at once. Unset, Batch packs several of a pack's tasks onto one VM
#: by their resources; each electron asked for its own vcpus and memory, and the usage report, the
#: README and the local Batch service count one VM per running task.
TASKS_PER_VM = 1


def build_job(spec: JobSpec, *, bucket: str, job_id: str, settings: DeploymentSettings,
              pack: PackManifest | None = None, task_bucket: str | None = None) -> batch_v1.Job:
    """The Batch job for one task (one task group of one task) or for a pack (``pack``: one task
    per electron, ``pack.parallelism`` at once, each task's VM reused for the next), logs to Cloud
    Logging, and a notification to the deployment's topic on every job state change and, for a
    pack, every task state change (each electron ends with its own task). Its worker reads its task
    from ``task_bucket`` (default ``bucket``) and writes its outputs to ``bucket``."""
    Notification = batch_v1.JobNotification
    kinds = [Notification.Type.JOB_STATE_CHANGED]
    if pack is None:
        environment, max_run_s = worker_environment(bucket, job_id, task_bucket), None
        if keeps_warm(spec, settings):
            # Its task's failures reach the electrons lent its VM even when Batch retries the task.
            kinds.append(Notification.Type.TASK_STATE_CHANGED)
            environment |= warm_environment(settings.warm_subscription_path, settings.topic_path,
                                            settings.warm_lifetime_s, settings.max_warm_vms)
            max_run_s = max(settings.warm_lifetime_s, spec.time_limit_s)
        group = batch_v1.TaskGroup(task_spec=build_task_spec(spec, environment=environment, max_run_s=max_run_s),
                                   task_count=1, task_count_per_node=TASKS_PER_VM)
    else:
        kinds.append(Notification.Type.TASK_STATE_CHANGED)
        group = batch_v1.TaskGroup(task_spec=build_task_spec(spec, environment=pack_environment(bucket, job_id, task_bucket)),
                                   task_count=len(pack.members), parallelism=pack.parallelism,
                                   task_count_per_node=TASKS_PER_VM)
    labels = job_labels(spec, pack, bucket=bucket)
    allocation = build_allocation_policy(spec, settings)
    allocation.labels = labels  # the VMs carry them too, so billing exports trace a VM to its task
    return batch_v1.Job(
        task_groups=[group],
        allocation_policy=allocation,
        labels=labels,
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
        notifications=[
            Notification(pubsub_topic=settings.topic_path, message=Notification.Message(type_=kind)) for kind in kinds
        ],
    )


def keeps_warm(spec: JobSpec, settings: DeploymentSettings) -> bool:
    """Whether a lone electron's job keeps its VM warm: asked for, and the deployment has warm VMs
    (a pack's tasks never wait: the pack's next task needs the VM)."""
    return spec.options.keep_warm > 0 and settings.max_keep_warm_s > 0 and settings.max_warm_vms > 0


def job_parent(settings: DeploymentSettings) -> str:
    return location_name(settings.project_id, settings.region)
