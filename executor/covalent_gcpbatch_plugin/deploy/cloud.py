"""The deployment's Google Cloud resources, as data: what deploy.sh creates and checks."""

from __future__ import annotations

import json

from ..deployment import DeploymentSettings
from ..protocol import TASKS_PREFIX


def lifecycle(days: int, prefix: str = TASKS_PREFIX) -> dict:
    """Delete objects under ``prefix`` (every object if empty) after ``days``."""
    condition = {"age": days, "matchesPrefix": [prefix]} if prefix else {"age": days}
    return {"rule": [{"action": {"type": "Delete"}, "condition": condition}]}


def bucket_differences(bucket: dict, days: int) -> list[str]:
    """What in a bucket resource (JSON API form) differs from what deploy.sh creates."""
    problems = []
    rules = (bucket.get("lifecycle") or {}).get("rule") or []
    wanted = lifecycle(days)["rule"][0]
    if not any(_same_rule(rule, wanted) for rule in rules):
        problems.append(f"no lifecycle rule deleting {TASKS_PREFIX}* after {days} days")
    iam = bucket.get("iamConfiguration") or {}
    if not (iam.get("uniformBucketLevelAccess") or {}).get("enabled"):
        problems.append("uniform bucket-level access is off")
    if iam.get("publicAccessPrevention") != "enforced":
        problems.append("public access prevention is not enforced")
    return problems


def _same_rule(rule: dict, wanted: dict) -> bool:
    condition = rule.get("condition") or {}
    return (
        (rule.get("action") or {}).get("type") == "Delete"
        and str(condition.get("age")) == str(wanted["condition"]["age"])
        and list(condition.get("matchesPrefix") or []) == wanted["condition"]["matchesPrefix"]
    )


def has_binding(policy: dict, role: str, member: str, condition: str | None = None) -> bool:
    """Whether the policy binds ROLE to MEMBER under exactly this condition expression (None: none)."""
    return any(
        binding.get("role") == role
        and member in binding.get("members", [])
        and (binding.get("condition") or {}).get("expression") == condition
        for binding in policy.get("bindings", [])
    )


def function_env(*, project: str, region: str, topic: str, job_service_account: str, allowed_images: list[str],
                 caps: dict[str, str | None], task_bucket: str, bucket: str) -> dict[str, str]:
    """The function's environment: DeploymentSettings.to_env, exactly what its from_env reads."""
    settings = DeploymentSettings(
        project_id=project,
        region=region,
        topic=topic,
        job_service_account=job_service_account,
        allowed_images=tuple(allowed_images),
        task_bucket=task_bucket,
        bucket=bucket,
        **{key: value for key, value in caps.items() if value not in (None, "")},
    )
    return settings.to_env()


def env_yaml(env: dict[str, str]) -> str:
    # JSON strings are YAML double-quoted scalars: every value stays a string, whatever it holds.
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in sorted(env.items()))
