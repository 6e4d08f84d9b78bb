"""What a deployment allows: the Cloud Function's settings, declared once.

The function reads them from its environment (``GCPBATCH_<FIELD>``, set by deploy.sh or
``covalent-gcpbatch local up``: pydantic-settings, ``DeploymentSettings.from_env``) and checks every
uploaded job spec against them (``check``). The caps (``CAP_FIELDS``) are also deploy.sh's flags
(``--max-vcpus``...: ``cap_flag``) and the "Deployment caps" table of docs/deploy.md (``caps_table``); tests
keep both equal to this declaration.

Imported by the Cloud Function (``functions/`` links it) and by the job builder; never by the
worker, so the worker image does not need pydantic-settings.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import machine_types
from .errors import FunctionNotConfigured, SpecError
from .protocol import BUCKET_NAME, MAX_KEEP_WARM_S, SECRET_NAME, JobSpec, PackManifest, cap_exceeded, secret_of_version, topic_path

ENV_PREFIX = "GCPBATCH_"
#: A comma-separated list in the environment (``a,b``), a tuple here.
CsvList = Annotated[tuple[str, ...], NoDecode]
CAP = {"cap": True}
#: A cap that lists what a task may reach: empty allows nothing (the caps table says "none").
ALLOWLIST = {"cap": True, "empty": "none"}


class DeploymentSettings(BaseSettings):
    """The function's settings. Limits here bound anything an uploaded object can ask for."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", validate_by_name=True)

    project_id: str = Field(min_length=1, validation_alias="GCPBATCH_PROJECT", description="Project the jobs run in.")
    region: str = Field(min_length=1, description="Region the jobs run in.")
    topic: str = Field(min_length=3, description="Topic id (not path) job state changes and rejections are published to.")
    job_service_account: str | None = Field(
        None, description="The service account jobs run as. Never taken from the uploaded object.")
    allowed_images: CsvList = Field(
        (), description="Images a job may run: exact URIs, or prefixes ending in `*` (deploy.sh allows "
        "`<registry>/<repo>/worker*`, every worker image it builds); empty means any (only sensible for the local stack).")
    batch_api_endpoint: str | None = Field(None, description="Batch API endpoint override (the local Batch service).")
    task_bucket: str | None = Field(
        None, description="The trigger bucket, where task objects and pack manifests are uploaded; an event of any "
        "other bucket is ignored. Unset: the trigger's bucket, whichever it is.")
    bucket: str | None = Field(
        None, description="The bucket of the tasks' outputs, cancel markers and records. Unset: the task's own bucket "
        "(one bucket for everything, as before task buckets).")
    max_vcpus: float = Field(
        64, gt=0, json_schema_extra=CAP, description="Most vCPUs a task may ask for (`vcpus`, and its `machine_type`'s).")
    max_memory_mb: int = Field(
        256 * 1024, gt=0, json_schema_extra=CAP,
        description="Most memory in MiB a task may ask for (`memory`, and its `machine_type`'s).")
    max_time_limit_s: int = Field(
        7 * 24 * 3600, gt=0, json_schema_extra=CAP, description="Longest `time_limit` in seconds a task may ask for.")
    max_accelerator_count: int = Field(
        8, ge=0, json_schema_extra=CAP,
        description="Most GPUs a task may ask for (`accelerator_count` plus the GPUs its `machine_type` comes with).")
    #: 4 TiB: room for a large image and hundreds of GB of scratch, yet a bound (a task may otherwise
    #: ask for protocol's 64 TiB); a deployment that needs more says so.
    max_boot_disk_size_gb: int = Field(
        4096, gt=0, json_schema_extra=CAP, description="Largest boot disk in GB a task may ask for (`boot_disk_size_gb`).")
    #: 9,000: 24 local SSDs of 375 GB, the most Compute Engine attaches to one N2 VM ("About Local SSD
    #: disks"); pd and Hyperdisk scratch disks go further, with the deployer's consent.
    max_scratch_disk_gb: int = Field(
        9000, gt=0, json_schema_extra=CAP, description="Largest scratch disk in GB a task may ask for (`scratch_disk_gb`).")
    #: 4,000: a pack at the executor's defaults (1,000 electrons of 2 vCPUs, all at once) needs 2,000;
    #: this leaves it twice that, and equals the most VMs Batch runs at once for a job spread over
    #: zones (4,000; one VM per task here), so only a pack wider than Batch would run anyway, or
    #: one of bigger tasks, needs a lower pack_parallelism or the deployer's consent.
    max_parallel_vcpus: float = Field(
        4000, gt=0, json_schema_extra=CAP,
        description="Most vCPUs one job may run at once: a pack's tasks at once (`pack_parallelism`, 0: all of them) "
                    "times each task's vCPUs (its `machine_type`'s if larger); a lone task's own.")
    allowed_machine_types: CsvList = Field(
        (), json_schema_extra=CAP,
        description="Machine types a task may ask for (`machine_type`); empty means any whose size the function knows "
                    "(`machine_types.py`). A type listed here that it does not know is allowed, sized by the task's fields.")

    #: Warm VMs (protocol/warm.py): 600 s of waiting is ten billed minutes per idle VM at most, and
    #: no more than ten of them: a bound a deployer raises knowingly.
    max_keep_warm_s: int = Field(
        600, ge=0, le=MAX_KEEP_WARM_S, json_schema_extra=CAP,
        description="Longest `keep_warm` in seconds a task may ask for; `0` turns warm VMs off.")
    max_warm_vms: int = Field(
        10, ge=0, json_schema_extra=CAP,
        description="Most warm VMs waiting for an electron at once; a VM that finds this many waiting exits instead.")
    warm_lifetime_s: int = Field(
        4 * 3600, gt=0, json_schema_extra=CAP,
        description="Longest life in seconds of a job whose VM is kept warm (its max run duration): a warm VM takes "
                    "only an electron whose `time_limit` ends before it.")
    warm_topic: str | None = Field(
        None, description="Topic id of the offers to warm VMs. Unset: `<topic>-warm`.")
    warm_subscription: str | None = Field(
        None, description="Subscription id the warm VMs take offers from (one, shared). Unset: `<topic>-warm-offers`.")

    #: Allowlists of what a task may reach as the job's service account: empty allows nothing, and
    #: deploy.sh grants the runner account access to exactly these (no project-wide role).
    allowed_mount_buckets: CsvList = Field(
        (), json_schema_extra=ALLOWLIST,
        description="Buckets a task may mount read-only (`gcs_volumes`); deploy.sh grants the jobs' account "
                    "roles/storage.objectViewer on each.")
    allowed_writable_mount_buckets: CsvList = Field(
        (), json_schema_extra=ALLOWLIST,
        description="Buckets a task may mount read-write (`gcs_volumes` with `read_only` false), or read-only; "
                    "deploy.sh grants the jobs' account roles/storage.objectUser on each.")
    allowed_secrets: CsvList = Field(
        (), json_schema_extra=ALLOWLIST,
        description="Secret Manager secrets a task may read into its environment (`secrets`), as full names "
                    "`projects/P/secrets/S` (any version of each); deploy.sh grants the jobs' account "
                    "roles/secretmanager.secretAccessor on each secret, not project-wide.")

    @field_validator("allowed_images", "allowed_machine_types", "allowed_mount_buckets",
                     "allowed_writable_mount_buckets", "allowed_secrets", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("allowed_mount_buckets", "allowed_writable_mount_buckets")
    @classmethod
    def _bucket_names(cls, buckets: tuple[str, ...]) -> tuple[str, ...]:
        for bucket in buckets:
            if not BUCKET_NAME.fullmatch(bucket):
                raise ValueError(f"{bucket!r} is not a bucket name (give the name, not gs://...)")
        return buckets

    @field_validator("allowed_secrets")
    @classmethod
    def _secret_names(cls, secrets: tuple[str, ...]) -> tuple[str, ...]:
        for secret in secrets:
            if not SECRET_NAME.fullmatch(secret):
                raise ValueError(f"{secret!r} is not a secret's full name 'projects/PROJECT/secrets/SECRET' (no "
                                 "version, no wildcard: each secret is granted to the jobs' account by name)")
        return secrets

    @classmethod
    def from_env(cls) -> DeploymentSettings:
        """The settings in this process's environment, or FunctionNotConfigured naming the variables."""
        try:
            return cls()
        except ValidationError as err:
            problems = "; ".join(f"{env_name(str(e['loc'][0]))}: {e['msg']}" for e in err.errors() if e["loc"])
            raise FunctionNotConfigured(f"the function is not configured: {problems} (deploy.sh sets them)") from None

    def to_env(self) -> dict[str, str]:
        """The environment ``from_env`` reads these settings back from."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None or value == ():
                continue
            env[env_name(name)] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env

    @property
    def topic_path(self) -> str:
        return topic_path(self.project_id, self.topic)

    @property
    def warm_topic_path(self) -> str:
        return topic_path(self.project_id, self.warm_topic or f"{self.topic}-warm")

    @property
    def warm_subscription_path(self) -> str:
        return f"projects/{self.project_id}/subscriptions/{self.warm_subscription or f'{self.topic}-warm-offers'}"

    def image_allowed(self, uri: str) -> bool:
        """Whether ``uri`` is in the allowlist: equal to an entry, or starting with an entry's text
        before its trailing ``*``. Empty allows any."""
        if not self.allowed_images:
            return True
        return any(uri.startswith(entry[:-1]) if entry.endswith("*") else uri == entry for entry in self.allowed_images)

    def check(self, spec: JobSpec) -> None:
        """Raise SpecError naming the first thing in ``spec`` this deployment does not allow."""
        if spec.project_id != self.project_id or spec.region != self.region:
            raise SpecError(
                f"this deployment creates jobs in project {self.project_id!r}, region {self.region!r}; "
                f"the task asked for {spec.project_id!r}, {spec.region!r}: set project_id and region to match"
            )
        if not self.image_allowed(spec.container_image_uri):
            raise SpecError(
                f"container image {spec.container_image_uri!r} is not allowed by this deployment; "
                f"allowed: {', '.join(self.allowed_images)}"
            )
        if spec.service_account_email and self.job_service_account and spec.service_account_email != self.job_service_account:
            raise SpecError(
                f"jobs of this deployment run as {self.job_service_account!r}, not {spec.service_account_email!r}: "
                "set service_account_email to the deployment's account (or leave it empty)"
            )
        options = spec.options
        if self.allowed_machine_types and options.machine_type and options.machine_type not in self.allowed_machine_types:
            raise SpecError(
                f"machine_type {options.machine_type!r} is not allowed by this deployment; "
                f"allowed: {', '.join(self.allowed_machine_types)}"
            )
        self.check_volumes(spec)
        self.check_secrets(spec)
        for location in options.allowed_locations:
            if not location.split("/", 1)[1].startswith(self.region):
                raise SpecError(f"allowed location {location!r} is outside this deployment's region {self.region!r}")
        for name, value, cap in (
            ("vcpus", spec.vcpus, self.max_vcpus),
            ("memory", spec.memory_mb, self.max_memory_mb),
            ("time_limit", spec.time_limit_s, self.max_time_limit_s),
            ("accelerator_count", options.accelerator_count, self.max_accelerator_count),
            ("boot_disk_size_gb", options.boot_disk_size_gb, self.max_boot_disk_size_gb),
            ("scratch_disk_gb", options.scratch_disk_gb, self.max_scratch_disk_gb),
            ("keep_warm", options.keep_warm, self.max_keep_warm_s),
        ):
            if value > cap:
                raise SpecError(cap_exceeded(name, value, cap))
        machine = self.machine_shape(options.machine_type)
        if machine is not None:
            what = f"machine_type {options.machine_type!r}"
            for has, value, cap, flag in (
                (f"{machine.vcpus} vCPUs", machine.vcpus, self.max_vcpus, "max_vcpus"),
                (f"{machine.memory_mb} MiB of memory", machine.memory_mb, self.max_memory_mb, "max_memory_mb"),
                (f"{machine.gpus} GPUs" + (f" (plus accelerator_count={options.accelerator_count})"
                                           if options.accelerator_count else ""),
                 machine.gpus + options.accelerator_count, self.max_accelerator_count, "max_accelerator_count"),
            ):
                if value > cap:
                    raise SpecError(f"{what} has {has}, over this deployment's cap of {cap:g} ({cap_flag(flag)}): "
                                    "choose a smaller machine type, or leave machine_type empty to size the VM by vcpus and memory")
        self.check_parallel(spec, 1)

    def check_volumes(self, spec: JobSpec) -> None:
        """Each mounted bucket on the allowlist of its kind: a read-write mount's on
        ``allowed_writable_mount_buckets``, a read-only one's on either list."""
        for path, volume in spec.options.gcs_volumes.items():
            readable = self.allowed_mount_buckets + self.allowed_writable_mount_buckets
            allowed, flag = ((readable, "--allowed-mount-buckets") if volume.read_only
                             else (self.allowed_writable_mount_buckets, "--allowed-writable-mount-buckets"))
            if volume.bucket not in allowed:
                how = "read-only" if volume.read_only else "read-write"
                raise SpecError(
                    f"gcs_volumes[{path!r}]: bucket {volume.bucket!r} may not be mounted {how} by this deployment "
                    f"(allowed: {', '.join(allowed) or 'none'}): ask the deployer to add it (deploy.sh up {flag} "
                    f"{volume.bucket}), which also grants the jobs' account access to it")

    def check_secrets(self, spec: JobSpec) -> None:
        """Each secret on ``allowed_secrets`` (by its full name; any version)."""
        for name, version in spec.options.secrets.items():
            secret = secret_of_version(version)
            if secret not in self.allowed_secrets:
                raise SpecError(
                    f"secrets[{name!r}]: secret {secret!r} is not allowed by this deployment (allowed: "
                    f"{', '.join(self.allowed_secrets) or 'none'}): ask the deployer to add it (deploy.sh up "
                    f"--allowed-secrets {secret}), which also grants the jobs' account access to it alone")

    def machine_shape(self, machine_type: str) -> machine_types.MachineShape | None:
        """What ``machine_type`` brings (None: no machine type, or one the deployer allowed by name
        that the table does not know: the task's own fields are then all that is checked). SpecError
        for a type neither known nor allowed by name: its vCPUs, memory and GPUs cannot be capped."""
        if not machine_type:
            return None
        shape = machine_types.shape_of(machine_type)
        if shape is None and machine_type not in self.allowed_machine_types:
            raise SpecError(
                f"machine_type {machine_type!r} is not one whose vCPUs, memory and GPUs this deployment knows, so its caps "
                f"cannot be checked: choose a predefined type of a known series or a custom type (e.g. "
                f"{machine_types.known_examples()}), leave machine_type empty, or have the deployer allow it by name "
                f"(deploy.sh up --allowed-machine-types {machine_type})"
            )
        return shape

    def task_vcpus(self, spec: JobSpec) -> float:
        """The vCPUs one task of ``spec`` occupies: its VM's (its machine type's) when larger than ``vcpus``."""
        shape = self.machine_shape(spec.options.machine_type)
        return max(spec.vcpus, shape.vcpus) if shape else spec.vcpus

    def check_parallel(self, spec: JobSpec, tasks_at_once: int) -> None:
        """SpecError if ``tasks_at_once`` tasks of ``spec`` would hold more than ``max_parallel_vcpus``."""
        per_task = self.task_vcpus(spec)
        if tasks_at_once * per_task > self.max_parallel_vcpus:
            if tasks_at_once == 1:
                raise SpecError(f"a task of {per_task:g} vCPUs exceeds this deployment's cap of {self.max_parallel_vcpus:g} "
                                f"vCPUs at once ({cap_flag('max_parallel_vcpus')})")
            fits = int(self.max_parallel_vcpus // per_task)
            raise SpecError(
                f"the pack runs {tasks_at_once} tasks of {per_task:g} vCPUs at once, {tasks_at_once * per_task:g} vCPUs, "
                f"over this deployment's cap of {self.max_parallel_vcpus:g} ({cap_flag('max_parallel_vcpus')}): set "
                f"pack_parallelism to at most {fits}, or ask the deployer to raise the cap"
            )

    def check_pack(self, spec: JobSpec, manifest: PackManifest) -> None:
        """The pack as a whole (its spec is checked per task by ``check``): its tasks running at
        once, ``parallelism`` (0: all of them), times each task's vCPUs."""
        members = len(manifest.members)
        self.check_parallel(spec, min(manifest.parallelism or members, members))


FIELDS = DeploymentSettings.model_fields
#: The limits a deployment puts on tasks: deploy.sh flags, docs/deploy.md rows.
CAP_FIELDS = tuple(name for name, field in FIELDS.items() if (field.json_schema_extra or {}).get("cap"))


def env_name(field: str) -> str:
    """The environment variable of a setting (``GCPBATCH_PROJECT``, ``GCPBATCH_MAX_VCPUS``...)."""
    alias = FIELDS[field].validation_alias
    return alias if isinstance(alias, str) else f"{ENV_PREFIX}{field.upper()}"


def cap_flag(field: str) -> str:
    """deploy.sh's flag for a cap: ``max_vcpus`` -> ``--max-vcpus``."""
    return "--" + field.replace("_", "-")


def caps_table() -> str:
    """The "Deployment caps" table of docs/deploy.md."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name in CAP_FIELDS:
        default = FIELDS[name].default
        empty = (FIELDS[name].json_schema_extra or {}).get("empty", "any")
        shown = empty if default == () else f"{default:g}" if isinstance(default, float) else str(default)
        rows.append(f"| `{cap_flag(name)}` | {shown} | {FIELDS[name].description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m covalent_gcpbatch_plugin.deployment > docs/deploy.md's caps table
    print(caps_table())
