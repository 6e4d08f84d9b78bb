"""The job spec: what the executor asks for, carried as the task object's custom metadata, and
what the Cloud Function validates before it builds a Batch job from it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import SpecError
from .outcome import RESERVED_ENV_PREFIXES, WORKER_ENV_NAMES

PROTOCOL_VERSION = 1

#: The object metadata key that carries the JSON job spec.
SPEC_METADATA_KEY = "gcpbatch-spec"
#: The object metadata key of a task object that belongs to a pack: the pack's id. The function
#: creates no job for such an object (its pack's manifest does); the worker checks it.
PACK_METADATA_KEY = "gcpbatch-pack"
#: Most electrons one pack (one Batch job) runs; Batch allows 100,000 tasks per job, but the
#: manifest (one id per task) stays small, and one lost pack costs less.
MAX_PACK_TASKS = 1000
#: Batch's limit on tasks of one job running at once (../shared/notes/platform.md, "Quotas").
MAX_PARALLELISM = 5000
#: Cloud Storage limits all custom metadata of an object to 8 KiB.
MAX_METADATA_BYTES = 8 * 1024

_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: Label key prefixes Google reserves for itself (batch_v1 Job.labels): Batch refuses such a job.
RESERVED_LABEL_PREFIXES = ("goog-", "google-")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_OPTIONAL_RESOURCE_NAME = r"^([a-z0-9][a-z0-9./_-]*)?$"

# -- Disks ---------------------------------------------------------------------------------------
#: Scratch disk types (batch_v1 AllocationPolicy.Disk.type_: a type of `gcloud compute disk-types
#: list`); a boot disk cannot be a local SSD.
SCRATCH_DISK_TYPES = ("local-ssd", "pd-balanced", "pd-ssd", "hyperdisk-balanced")
BOOT_DISK_TYPES = ("pd-balanced", "pd-ssd", "hyperdisk-balanced")
#: Local SSDs come in disks of 375 GB: Batch rounds any other size up to the next multiple
#: (batch_v1 AllocationPolicy.Disk.size_gb), so one is refused here rather than billed larger.
LOCAL_SSD_GB = 375
#: The scratch disk's device name (AttachedDisk.device_name = Volume.device_name) and mount path.
#: The container sees it at the same path: with TaskSpec.volumes set and Container.volumes unset,
#: "Batch will mount each volume from the host machine to the container with the same mount path",
#: read-write for a new disk (batch_v1 Runnable.Container.volumes).
SCRATCH_DEVICE_NAME = "scratch"
SCRATCH_MOUNT_PATH = "/mnt/disks/scratch"
#: Machine families that take Hyperdisk only, boot disk too (Nextflow issue #6614 and PR #6841's
#: HYPERDISK_ONLY_FAMILIES; dsub #301: n4 with a pd-standard disk fails "No zone supports all of the
#: provided instance templates"). Batch's boot disk default is pd-balanced (AllocationPolicy.Disk.type_).
HYPERDISK_ONLY_FAMILIES = ("c4-", "c4a-", "c4d-", "n4-", "n4a-", "n4d-")
#: E2 VMs take no local SSD (Compute Engine, "About Local SSD disks"); Batch picks an E2 machine when
#: the job names none (local/batch/runner.py, reported_instance), so local SSD needs a machine type,
#: as Nextflow picks one itself for it (GoogleBatchTaskHandler: findBestMachineType(..., local-ssd)).
NO_LOCAL_SSD_FAMILIES = ("e2-",) + HYPERDISK_ONLY_FAMILIES

# -- Capacity ------------------------------------------------------------------------------------
#: InstancePolicy.reservation: unset consumes any matching reservation, "NO_RESERVATION" none, a
#: name only that one (batch_v1 AllocationPolicy.InstancePolicy.reservation).
NO_RESERVATION = "NO_RESERVATION"
_RESERVATION = r"^(any|none|[a-z]([-a-z0-9]{0,61}[a-z0-9])?|projects/[a-z][-a-z0-9]{4,28}[a-z0-9]/reservations/[a-z]([-a-z0-9]{0,61}[a-z0-9])?)$"
#: Flex-start VMs (DWS): accelerator-optimized machine types but A4X and G4, and H4D; they run for
#: at most seven days (Compute Engine, "About Flex-start VMs").
FLEX_START_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "h4d-")
FLEX_START_MAX_RUN_S = 7 * 24 * 3600

# -- Warm VMs ------------------------------------------------------------------------------------
#: Longest ``keep_warm`` any deployment allows (a deployment's own cap is at most this).
MAX_KEEP_WARM_S = 3600

# -- Image streaming -----------------------------------------------------------------------------
#: Batch streams only images in Artifact Registry, from a location that contains the job's VMs: the
#: job's region, or the multi-region it is in (Batch, "Use Image streaming" limitations,
#: https://cloud.google.com/batch/docs/use-image-streaming).
_ARTIFACT_REGISTRY = re.compile(r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/")
ARTIFACT_REGISTRY_MULTI_REGIONS = ("us", "europe", "asia")


def image_streaming_problem(image_uri: str, region: str) -> str | None:
    """Why Batch cannot stream ``image_uri`` to VMs in ``region`` (None: it can)."""
    match = _ARTIFACT_REGISTRY.match(image_uri)
    if match is None:
        return (f"image_streaming needs an Artifact Registry image (<region>-docker.pkg.dev/...), not "
                f"{image_uri!r}: push the worker image to Artifact Registry, or set image_streaming false")
    location = match["location"]
    if location != region and not (location in ARTIFACT_REGISTRY_MULTI_REGIONS and region.startswith(f"{location}-")):
        return (f"image_streaming needs the image in the job's region {region!r} (or its multi-region), not in "
                f"{location!r}: use a {region}-docker.pkg.dev image, or set image_streaming false")
    return None


def job_problem(options: JobOptions, *, image_uri: str, region: str, time_limit_s: int) -> str | None:
    """What the job options cannot do with the task's image, region and time limit (None: nothing).
    The executor checks it at construction (settings.py), the function with the spec."""
    if options.image_streaming and image_uri:
        problem = image_streaming_problem(image_uri, region)
        if problem:
            return problem
    if options.provisioning == "FLEX_START" and time_limit_s > FLEX_START_MAX_RUN_S:
        return (f"provisioning FLEX_START runs a VM for at most 7 days ({FLEX_START_MAX_RUN_S} s), not "
                f"time_limit={time_limit_s}: lower time_limit, or use STANDARD")
    return None


#: Bucket names (Cloud Storage naming rules, dotted names included).
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{1,220}[a-z0-9]$")
_GCS_URI = re.compile(r"^gs://(?P<bucket>[a-z0-9][a-z0-9_.-]{1,220}[a-z0-9])(?:/(?P<path>[A-Za-z0-9._~=+@-][A-Za-z0-9._~=+@/-]*)?)?$")
#: Secret Manager names as Batch's ``secret_variables`` take them: a secret version,
#: ``projects/PROJECT/secrets/SECRET/versions/VERSION`` (https://cloud.google.com/batch/docs/create-run-job-secret-manager:
#: "you must format it as the path to a secret version"); a project id or number; secret ids are
#: letters, digits, '_' and '-', up to 255; a version is a number or ``latest``.
SECRET_NAME = re.compile(r"^projects/[a-z0-9][a-z0-9-]{0,62}/secrets/[A-Za-z0-9_-]{1,255}$")
SECRET_VERSION_NAME = re.compile(r"^(?P<secret>projects/[a-z0-9][a-z0-9-]{0,62}/secrets/[A-Za-z0-9_-]{1,255})/versions/([1-9][0-9]*|latest)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MOUNT_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
#: Where a bucket may not be mounted: the container's own system directories (a mount there would
#: hide the image's files) and the worker's home. /mnt/... is the usual place (Batch's examples).
RESERVED_MOUNT_ROOTS = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
                        "/run", "/sbin", "/sys", "/tmp", "/usr", "/var")
#: gcsfuse options a task may not pass: read/write is ``read_only``'s (``-o ro``/``-o rw``), and the
#: credentials and configuration are the job's service account's, never a task's.
_FORBIDDEN_MOUNT_OPTIONS = ("-o", "--o", "--key-file", "--token-url", "--reuse-token-from-url", "--config-file",
                            "--billing-project", "--custom-endpoint", "--endpoint")
_MOUNT_OPTION = re.compile(r"^--?[a-z][a-z0-9-]*(=[A-Za-z0-9._:,/-]{1,100})?$")


class GcsVolume(BaseModel):
    """A bucket (or a folder of it) mounted in the task: ``uri``, read-only unless ``read_only`` is
    false, with extra gcsfuse ``mount_options`` (``--implicit-dirs``, ``--file-mode=644``...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(max_length=1024)
    read_only: bool = True
    mount_options: tuple[str, ...] = Field(default=(), max_length=8)

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        if not _GCS_URI.fullmatch(uri) or "//" in uri[5:] or "/../" in f"{uri}/" or "/./" in f"{uri}/":
            raise ValueError(f"{uri!r} is not a gs://BUCKET or gs://BUCKET/FOLDER address")
        return uri

    @field_validator("mount_options")
    @classmethod
    def _options(cls, options: tuple[str, ...]) -> tuple[str, ...]:
        for option in options:
            if not _MOUNT_OPTION.fullmatch(option):
                raise ValueError(f"mount option {option!r} must be one gcsfuse flag, like '--implicit-dirs' or "
                                 "'--file-mode=644'")
            if option.split("=", 1)[0] in _FORBIDDEN_MOUNT_OPTIONS:
                raise ValueError(f"mount option {option!r} is not allowed: read/write is set by read_only, and "
                                 "the bucket is reached as the job's service account")
        return options

    @property
    def bucket(self) -> str:
        return _GCS_URI.fullmatch(self.uri)["bucket"]

    @property
    def folder(self) -> str:
        """The folder inside the bucket ("" for the whole bucket), without a trailing '/'."""
        return (_GCS_URI.fullmatch(self.uri)["path"] or "").rstrip("/")

    @property
    def remote_path(self) -> str:
        """Batch's GCS.remote_path: "bucket_name, bucket_name/subdirectory/" (batch_v1.GCS)."""
        return f"{self.bucket}/{self.folder}/" if self.folder else self.bucket


def secret_of_version(version_name: str) -> str:
    """``projects/P/secrets/S`` of ``projects/P/secrets/S/versions/V``."""
    return version_name.rsplit("/versions/", 1)[0]


def cap_exceeded(name: str, value: float, cap: float) -> str:
    """The function's refusal of a value over one of the deployment's caps (deployment.py), in the
    words the executor reads back with ``exceeded_cap``."""
    return f"{name}={value:g} exceeds this deployment's cap of {cap:g}"


def exceeded_cap(text: str, name: str) -> float | None:
    """The cap a refusal (``cap_exceeded``'s words) names for setting ``name``, if it names one."""
    found = re.search(rf"\b{re.escape(name)}=[0-9.e+]+ exceeds this deployment's cap of ([0-9.e+]+)", text)
    return float(found.group(1)) if found else None


class JobOptions(BaseModel):
    """Batch job options beyond size and time: where and on what the task runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    machine_type: str = Field(
        default="", max_length=64, pattern=r"^([a-z0-9][a-z0-9-]*)?$",
        description="Compute Engine machine type, e.g. `n2-standard-8`; empty lets Batch choose from `vcpus`/`memory`. "
                    "The deployment may restrict it.")
    provisioning: Literal["STANDARD", "SPOT", "FLEX_START"] = Field(
        default="STANDARD",
        description="`STANDARD`, `SPOT` (cheaper, preemptible: preemptions are retried up to `retries` times) or "
                    "`FLEX_START` (Dynamic Workload Scheduler: waits for scarce GPUs, discounted; needs a `machine_type` "
                    "of the a2, a3, a4, g2 or h4d families, and `time_limit` of at most 7 days).")
    reservation: str = Field(
        default="any", max_length=128, pattern=_RESERVATION,
        description="Compute Engine reservation the VMs consume: `any` (a matching one if there is, Batch's default), "
                    "`none`, or a reservation's name (`projects/P/reservations/R` for another project's). A named one "
                    "needs `machine_type` and `allowed_locations` to match the reservation's type and zone, and "
                    "`provisioning = \"STANDARD\"` (Spot and flex-start VMs consume no reservation).")
    accelerator_type: str = Field(
        default="", max_length=64, pattern=r"^([a-z0-9][a-z0-9-]*)?$",
        description="GPU type, e.g. `nvidia-tesla-t4`; set together with `accelerator_count`.")
    accelerator_count: int = Field(
        default=0, ge=0, le=16, description="GPUs per task (0 to 16; capped by the deployment, 8 by default).")
    install_gpu_drivers: bool = Field(
        default=True, description="Let Batch install the GPU drivers when the task has GPUs: `accelerator_count`, or a machine "
                    "type that comes with them (`a2-`, `a3-`, `g2-`).")
    boot_disk_size_gb: int = Field(
        default=0, ge=0, le=65536, description="Boot disk size; `0` keeps Batch's default.")
    boot_disk_type: Literal[("",) + BOOT_DISK_TYPES] = Field(
        default="",
        description="Boot disk type; empty keeps Batch's default (`pd-balanced`), or `hyperdisk-balanced` for the "
                    "machine families that take only Hyperdisk (`c4`, `c4a`, `c4d`, `n4`, `n4a`, `n4d`).")
    scratch_disk_gb: int = Field(
        default=0, ge=0, le=65536,
        description=f"Size in GB of a scratch disk mounted at `{SCRATCH_MOUNT_PATH}` (deleted with the VM); `0`: none. "
                    f"A `local-ssd` size is a multiple of {LOCAL_SSD_GB}. Capped by the deployment.")
    scratch_disk_type: Literal[SCRATCH_DISK_TYPES] = Field(
        default="pd-balanced",
        description="`pd-balanced`, `pd-ssd`, `hyperdisk-balanced` (the only one `c4`/`n4` families take) or "
                    "`local-ssd` (fastest; needs a `machine_type` that takes local SSDs, not `e2`, `c4` or `n4`).")
    labels: dict[str, str] = Field(
        default_factory=dict, max_length=32,
        description="Job labels, on its VMs too (GCP label rules; keys starting with `goog-` or `google-` are Google's). "
                    "`covalent-dispatch-id`, `covalent-node-id`, `covalent-deployment` and `created-by` are added "
                    "automatically and win.")
    network: str = Field(
        default="", max_length=512, pattern=_OPTIONAL_RESOURCE_NAME,
        description="VPC network, e.g. `global/networks/my-vpc`.")
    subnetwork: str = Field(
        default="", max_length=512, pattern=_OPTIONAL_RESOURCE_NAME,
        description="Subnetwork, e.g. `regions/us-east1/subnetworks/batch`.")
    no_external_ip: bool = Field(
        default=False,
        description="VMs without external IPs; needs `network` and `subnetwork` (with Cloud NAT or Private Google "
                    "Access to pull images and reach GCS).")
    allowed_locations: tuple[str, ...] = Field(
        default=(), max_length=32,
        description="`regions/...` or `zones/...` entries inside the deployment's region; empty means the whole region.")
    image_streaming: bool = Field(
        default=False,
        description="Stream the worker image instead of pulling it first: a 600 MB image's job started in about 1 "
                    "minute instead of 2.5 (Nextflow PR #6836). Needs the image in Artifact Registry in the job's region "
                    "or its multi-region (`us-east1-docker.pkg.dev/...`, `us-docker.pkg.dev/...`).")

    keep_warm: int = Field(
        default=0, ge=0, le=MAX_KEEP_WARM_S,
        description="Seconds a lone electron's VM waits, its electron done, for the next electron of the same job spec "
                    "(but for the node): that electron then starts on it at once, with no VM boot and no `pack_window` "
                    "wait (README, \"Warm VMs\"). "
                    "A VM is billed for one minute at least: waiting 60 s costs at most what the next electron's own new "
                    "VM would. `0`: off, every electron boots its own VM. Capped by the deployment.")
    gcs_volumes: dict[str, GcsVolume] = Field(
        default_factory=dict, max_length=8,
        description="Buckets mounted in the task (gcsfuse), by mount path: `{\"/mnt/data\": \"gs://bucket/folder\"}` "
                    "mounts read-only; `{\"/mnt/out\": {\"uri\": \"gs://bucket/out\", \"read_only\": false, "
                    "\"mount_options\": [\"--implicit-dirs\"]}}` read-write, with gcsfuse flags. Each bucket must be on "
                    "the deployment's allowlist (`--allowed-mount-buckets`, `--allowed-writable-mount-buckets`). Not under "
                    "`/bin`, `/etc`, `/home`, `/opt`, `/tmp`, `/usr`, `/var` and the like; `/mnt/...` is usual. On the "
                    "local stack, read the files through `covalent_gcpbatch_plugin.volume_path(\"/mnt/data\")` "
                    "(docs/local.md); on Batch that is the path itself.")
    secrets: dict[str, str] = Field(
        default_factory=dict, max_length=16,
        description="Secret Manager secrets as environment variables of the task, by name: `{\"API_KEY\": "
                    "\"projects/P/secrets/S/versions/1\"}` (or `versions/latest`). Batch reads them on the VM as the job's "
                    "service account: the values are in no object, message or log of this plugin. Each secret must be "
                    "on the deployment's allowlist (`--allowed-secrets`). Names may not start with `GCPBATCH_` or "
                    "`BATCH_` (the worker's and Batch's own).")

    @field_validator("gcs_volumes", mode="before")
    @classmethod
    def _volume_shorthand(cls, value: object) -> object:
        # "gs://bucket/path" is short for {"uri": "gs://bucket/path"} (read-only, no options).
        if isinstance(value, Mapping):
            return {path: {"uri": v} if isinstance(v, str) else v for path, v in value.items()}
        return value

    @field_validator("gcs_volumes")
    @classmethod
    def _mount_paths(cls, volumes: dict[str, GcsVolume]) -> dict[str, GcsVolume]:
        paths = sorted(volumes)
        for path in paths:
            if not _MOUNT_PATH.fullmatch(path) or "/../" in f"{path}/" or "/./" in f"{path}/" or len(path) > 256:
                raise ValueError(f"mount path {path!r} must be an absolute path like '/mnt/data' (letters, digits, "
                                 "'.', '_', '-'; no '..')")
            reserved = next((root for root in RESERVED_MOUNT_ROOTS if path == root or path.startswith(root + "/")), None)
            if reserved:
                raise ValueError(f"mount path {path!r} is inside {reserved}, a directory of the container's own: "
                                 "mount under /mnt instead, e.g. '/mnt/data'")
        for outer in paths:  # every pair: sorted, '/mnt/a-b' falls between '/mnt/a' and '/mnt/a/c'
            inner = next((other for other in paths if other.startswith(outer + "/")), None)
            if inner:
                raise ValueError(f"mount paths {outer!r} and {inner!r} are nested: give each bucket its own directory")
        return volumes

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, secrets: dict[str, str]) -> dict[str, str]:
        for name, version in secrets.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"secret environment name {name!r} must be letters, digits and '_', not starting with "
                                 "a digit")
            if name in WORKER_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"secret environment name {name!r} is reserved: names starting with "
                                 f"{' or '.join(RESERVED_ENV_PREFIXES)} are the worker's and Batch's own; choose another")
            if not SECRET_VERSION_NAME.fullmatch(version):
                raise ValueError(f"secret {name}={version!r} must name a secret version: "
                                 "'projects/PROJECT/secrets/SECRET/versions/VERSION' (a number, or 'latest')")
        return secrets

    @field_validator("provisioning", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("labels")
    @classmethod
    def _label_rules(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(f"label {key!r} is reserved: Google keeps keys starting with "
                                 f"{' or '.join(RESERVED_LABEL_PREFIXES)} for itself; choose another key")
            if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise ValueError(
                    f"label {key!r}={value!r} breaks GCP label rules: keys start with a lowercase letter, and keys "
                    "and values use only lowercase letters, digits, '_' and '-' (at most 63 characters)"
                )
        return labels

    @field_validator("allowed_locations")
    @classmethod
    def _locations(cls, locations: tuple[str, ...]) -> tuple[str, ...]:
        for location in locations:
            if not re.fullmatch(r"(regions|zones)/[a-z0-9-]+", location):
                raise ValueError(f"allowed location {location!r} must look like 'regions/us-east1' or 'zones/us-east1-b'")
        return locations

    def model_post_init(self, _context: object) -> None:
        if bool(self.accelerator_type) != bool(self.accelerator_count):
            raise ValueError("accelerator_type and accelerator_count go together: set both (or neither)")
        if self.no_external_ip and not (self.network and self.subnetwork):
            # Batch refuses the job: VMs without an external IP must be placed in a given subnet.
            raise ValueError("no_external_ip needs network and subnetwork: set both (a VPC with Cloud NAT or "
                             "Private Google Access), or leave no_external_ip false")
        self._check_disks()
        self._check_capacity()

    def _check_disks(self) -> None:
        machine = self.machine_type
        if self.scratch_disk_gb:
            for path in self.gcs_volumes:
                if path == SCRATCH_MOUNT_PATH or f"{path}/".startswith(f"{SCRATCH_MOUNT_PATH}/") or \
                        SCRATCH_MOUNT_PATH.startswith(f"{path}/"):
                    raise ValueError(f"mount path {path!r} overlaps the scratch disk's {SCRATCH_MOUNT_PATH!r}: mount the "
                                     "bucket elsewhere, e.g. '/mnt/data'")
        if machine.startswith(HYPERDISK_ONLY_FAMILIES):
            for key, kind in (("boot_disk_type", self.boot_disk_type),
                              ("scratch_disk_type", self.scratch_disk_type if self.scratch_disk_gb else "")):
                if kind.startswith("pd-"):
                    raise ValueError(f"machine_type {machine!r} takes Hyperdisk only, not {key}={kind!r}: set {key} "
                                     "to hyperdisk-balanced, or choose another machine type")
        if not self.scratch_disk_gb or self.scratch_disk_type != "local-ssd":
            return
        if self.scratch_disk_gb % LOCAL_SSD_GB:
            fit = -(-self.scratch_disk_gb // LOCAL_SSD_GB) * LOCAL_SSD_GB
            raise ValueError(f"scratch_disk_gb={self.scratch_disk_gb} is not a multiple of {LOCAL_SSD_GB}: local SSDs "
                             f"come in {LOCAL_SSD_GB} GB disks; set scratch_disk_gb to e.g. {fit}")
        if not machine or machine.startswith(NO_LOCAL_SSD_FAMILIES):
            given = repr(machine) if machine else "none (Batch would pick an e2 machine)"
            raise ValueError(f"scratch_disk_type local-ssd needs a machine_type that takes local SSDs (e.g. n2-standard-8; "
                             f"not e2, c4 or n4), not {given}: set machine_type, or use a pd-balanced scratch disk")

    def _check_capacity(self) -> None:
        named = self.reservation not in ("any", "none")
        if self.provisioning != "STANDARD" and named:
            # Spot VMs do not consume reservations; flex-start VMs take their capacity from DWS
            # (Compute Engine, "About Flex-start VMs": reservation affinity none).
            raise ValueError(f"provisioning {self.provisioning} cannot consume reservation {self.reservation!r}: use "
                             "provisioning STANDARD with the reservation, or reservation 'any'")
        if named and not self.machine_type:
            raise ValueError(f"reservation {self.reservation!r} needs machine_type: set it to the reservation's machine "
                             "type (its VMs must match the reservation exactly)")
        if self.provisioning == "FLEX_START" and not self.machine_type.startswith(FLEX_START_FAMILIES):
            raise ValueError(f"provisioning FLEX_START needs a machine_type of the a2, a3, a4, g2 or h4d families, not "
                             f"{self.machine_type or 'none'!r}: e.g. g2-standard-4 for one L4 GPU, or use STANDARD or SPOT")


class JobSpec(BaseModel):
    """What the executor asks for; the function validates it and builds the Batch job from it.

    Unknown fields are rejected: the function trusts nothing in an object beyond this schema.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = PROTOCOL_VERSION
    dispatch_id: str = Field(min_length=1, max_length=64)
    node_id: int = Field(ge=0)
    project_id: str = Field(min_length=1, max_length=64)
    region: str = Field(min_length=1, max_length=64)
    container_image_uri: str = Field(min_length=1, max_length=1024)
    service_account_email: str | None = Field(default=None, max_length=256)
    vcpus: float = Field(gt=0, le=416)
    memory_mb: int = Field(gt=0, le=12 * 1024 * 1024)
    time_limit_s: int = Field(gt=0, le=14 * 24 * 3600)
    retries: int = Field(ge=0, le=10)
    python_version: str = Field(pattern=r"^3\.\d+$")
    covalent_version: str = Field(min_length=1, max_length=64)
    #: The electron must start within this many seconds of its task object's creation (GCS's own
    #: timeCreated): ``submit_timeout`` + ``queue_timeout``, by when a live executor has given up
    #: and cancelled it. A worker starting later (its Covalent server gone, its job queued for a
    #: VM until capacity came) does not run it. None: no deadline.
    start_within_s: float | None = Field(default=None, gt=0, le=30 * 24 * 3600)
    options: JobOptions = Field(default_factory=JobOptions)

    @field_validator("dispatch_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("dispatch_id may contain only letters, digits, '.', '_' and '-'")
        return value

    def model_post_init(self, _context: object) -> None:
        problem = job_problem(self.options, image_uri=self.container_image_uri, region=self.region,
                              time_limit_s=self.time_limit_s)
        if problem:
            raise ValueError(problem)

    def to_metadata(self) -> dict[str, str]:
        """Custom object metadata carrying this spec; raises SpecError if over GCS's 8 KiB."""
        encoded = self.model_dump_json()
        if len(encoded.encode()) + len(SPEC_METADATA_KEY) > MAX_METADATA_BYTES:
            raise SpecError(f"job spec is {len(encoded)} bytes; object metadata is limited to 8 KiB")
        return {SPEC_METADATA_KEY: encoded}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> JobSpec:
        """Parse and validate the spec from object metadata, or raise SpecError saying why."""
        if not metadata or SPEC_METADATA_KEY not in metadata:
            raise SpecError(f"object has no {SPEC_METADATA_KEY!r} metadata: it was not uploaded by GCPBatchExecutor")
        size = sum(len(k.encode()) + len(str(v).encode()) for k, v in metadata.items())
        if size > MAX_METADATA_BYTES:
            raise SpecError(f"object metadata is {size} bytes, over the 8 KiB limit")
        try:
            return cls.model_validate_json(metadata[SPEC_METADATA_KEY])
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in err.errors()
            )
            raise SpecError(f"invalid job spec: {problems}") from None


class PackManifest(BaseModel):
    """What a pack runs: its electrons (each one's id, which is its objects' prefix) in task-index
    order, and how many run at once. The worker of task i runs ``members[i]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = PROTOCOL_VERSION
    members: tuple[str, ...] = Field(min_length=2, max_length=MAX_PACK_TASKS)
    #: Tasks of the pack running at once (each on its own VM); 0: all of them.
    parallelism: int = Field(default=0, ge=0, le=MAX_PARALLELISM)

    @field_validator("members")
    @classmethod
    def _ids(cls, members: tuple[str, ...]) -> tuple[str, ...]:
        from .layout import JOB_ID_PATTERN, is_pack_id

        for member in members:
            if not JOB_ID_PATTERN.fullmatch(member) or is_pack_id(member):
                raise ValueError(f"member {member!r} is not an electron's job id")
        if len(set(members)) != len(members):
            raise ValueError("members must be distinct")
        return members

    def dumps(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def loads(cls, payload: bytes) -> PackManifest:
        """The manifest, or SpecError saying what is wrong with it."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in err.errors())
            raise SpecError(f"invalid pack manifest: {problems}") from None
