"""What a deployment allows: the Cloud Function's settings, declared once.

The function reads them from its environment (``GCPBATCH_<FIELD>``, set by deploy.sh or
``covalent-gcpbatch local up``: pydantic-settings, ``DeploymentSettings.from_env``) and checks every
uploaded job spec against them (``check``). The caps (``CAP_FIELDS``) are also deploy.sh's flags
(``--max-vcpus``...: ``cap_flag``) and the README's "Deployment caps" table (``caps_table``); tests
keep both equal to this declaration.

Imported by the Cloud Function (``functions/`` links it) and by the job builder; never by the
worker, so the worker image does not need pydantic-settings.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import FunctionNotConfigured, SpecError
from .protocol import JobSpec, topic_path

ENV_PREFIX = "GCPBATCH_"
#: A comma-separated list in the environment (``a,b``), a tuple here.
CsvList = Annotated[tuple[str, ...], NoDecode]
CAP = {"cap": True}


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
    max_vcpus: float = Field(64, gt=0, json_schema_extra=CAP, description="Most vCPUs a task may ask for (`vcpus`).")
    max_memory_mb: int = Field(
        256 * 1024, gt=0, json_schema_extra=CAP, description="Most memory in MiB a task may ask for (`memory`).")
    max_time_limit_s: int = Field(
        7 * 24 * 3600, gt=0, json_schema_extra=CAP, description="Longest `time_limit` in seconds a task may ask for.")
    max_accelerator_count: int = Field(
        8, ge=0, json_schema_extra=CAP, description="Most GPUs a task may ask for (`accelerator_count`).")
    allowed_machine_types: CsvList = Field(
        (), json_schema_extra=CAP, description="Machine types a task may ask for (`machine_type`); empty means any.")

    @field_validator("allowed_images", "allowed_machine_types", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

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
        for location in options.allowed_locations:
            if not location.split("/", 1)[1].startswith(self.region):
                raise SpecError(f"allowed location {location!r} is outside this deployment's region {self.region!r}")
        for name, value, cap in (
            ("vcpus", spec.vcpus, self.max_vcpus),
            ("memory", spec.memory_mb, self.max_memory_mb),
            ("time_limit", spec.time_limit_s, self.max_time_limit_s),
            ("accelerator_count", options.accelerator_count, self.max_accelerator_count),
        ):
            if value > cap:
                raise SpecError(f"{name}={value:g} exceeds this deployment's cap of {cap:g}")


FIELDS = DeploymentSettings.model_fields
#: The limits a deployment puts on tasks: deploy.sh flags, README rows.
CAP_FIELDS = tuple(name for name, field in FIELDS.items() if (field.json_schema_extra or {}).get("cap"))


def env_name(field: str) -> str:
    """The environment variable of a setting (``GCPBATCH_PROJECT``, ``GCPBATCH_MAX_VCPUS``...)."""
    alias = FIELDS[field].validation_alias
    return alias if isinstance(alias, str) else f"{ENV_PREFIX}{field.upper()}"


def cap_flag(field: str) -> str:
    """deploy.sh's flag for a cap: ``max_vcpus`` -> ``--max-vcpus``."""
    return "--" + field.replace("_", "-")


def caps_table() -> str:
    """The README's "Deployment caps" table."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for name in CAP_FIELDS:
        default = FIELDS[name].default
        shown = "any" if default == () else f"{default:g}" if isinstance(default, float) else str(default)
        rows.append(f"| `{cap_flag(name)}` | {shown} | {FIELDS[name].description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m covalent_gcpbatch_plugin.deployment > the README's caps table
    print(caps_table())
