"""What ``deploy.sh`` asks Python for, so that the shell script never parses JSON or edits TOML.

    python -m covalent_gcpbatch_plugin.deploy_helper COMMAND [ARGS]

Commands (each prints its answer on stdout; a check answers with its exit status):

``versions``
    ``<python major.minor> <covalent version>`` of this interpreter: the worker image must be built
    for the environment tasks are dispatched from.
``lifecycle --days N``
    The bucket's lifecycle file: delete objects under protocol.TASKS_PREFIX after N days.
``bucket-matches --days N`` (bucket resource JSON, ``describe --raw``, on stdin)
    Exit 0 if the bucket has that lifecycle rule, uniform bucket-level access and public access
    prevention; else exit 3 (NO), saying what differs on stderr.
``has-binding ROLE MEMBER`` (IAM policy JSON on stdin)
    Exit 0 if the policy binds ROLE to MEMBER unconditionally, else 3 (NO).
``build-config --image URI --python-version X.Y --covalent-version V``
    The Cloud Build config (JSON) that builds worker_image/Dockerfile with those build arguments
    from the repository root and pushes it.
``function-env --project P --region R --topic T --job-service-account SA --allowed-image URI [caps]``
    The function's environment (YAML, for ``gcloud functions deploy --env-vars-file``), written by
    deployment.DeploymentSettings.to_env, so it is exactly what DeploymentSettings.from_env reads.
    The caps' flags are deployment.CAP_FIELDS (``--max-vcpus``...).
``digest [--text S]... PATH...``
    A short content digest of files (directories recursively, symlinks followed, caches skipped).
``config-set KEY=VALUE...`` / ``config-unset --if-bucket B [KEY...]`` / ``config-show``
    Edit or show ``[executors.gcpbatch]`` of the Covalent config in use (local/covalent_config.py,
    which honours COVALENT_CONFIG_DIR). Keys must be GCPBatchExecutor settings (settings.py).
    ``config-unset`` removes the given keys, or every key a deployment writes
    (settings.DEPLOYMENT_KEYS), and leaves the section alone unless its bucket_name is B, so
    tearing a deployment down never removes another deployment's settings.

Imports are local to the commands that need them (each command is one short-lived process; most
need only the standard library). Only the standard library, pydantic (protocol) and filelock/toml (Covalent's own dependencies) are
imported: every environment Covalent dispatches from has them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import DeployError

DOCKERFILE = "worker_image/Dockerfile"
#: Cloud Build's default timeout is 10 minutes; installing Covalent can take longer on a cold cache.
BUILD_TIMEOUT = "1800s"
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".mypy_cache"}
#: The exit status of a check that answers "no" (1 is left to Python's own errors).
NO = 3


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        covalent_version = version("covalent")
    except PackageNotFoundError:
        raise DeployError(
            f"covalent is not installed in {sys.executable}: pass --python pointing at the environment "
            "you dispatch Covalent workflows from"
        ) from None
    try:
        version("covalent-gcpbatch-plugin")
    except PackageNotFoundError:
        print(
            f"deploy_helper: warning: covalent-gcpbatch-plugin is not installed in {sys.executable}; "
            "install it there, or Covalent will not find GCPBatchExecutor",
            file=sys.stderr,
        )
    return f"{sys.version_info.major}.{sys.version_info.minor} {covalent_version}"


def lifecycle(days: int) -> dict:
    from .protocol import TASKS_PREFIX

    return {"rule": [{"action": {"type": "Delete"}, "condition": {"age": days, "matchesPrefix": [TASKS_PREFIX]}}]}


def bucket_differences(bucket: dict, days: int) -> list[str]:
    """What in a bucket resource (JSON API form) differs from what deploy.sh creates."""
    from .protocol import TASKS_PREFIX

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


def has_binding(policy: dict, role: str, member: str) -> bool:
    return any(
        binding.get("role") == role and member in binding.get("members", []) and not binding.get("condition")
        for binding in policy.get("bindings", [])
    )


def build_config(image: str, python_version: str, covalent_version: str) -> dict:
    build = [
        "build",
        "-f", DOCKERFILE,
        "--build-arg", f"PYTHON_VERSION={python_version}",
        "--build-arg", f"COVALENT_VERSION={covalent_version}",
        "-t", image,
        ".",
    ]  # fmt: skip
    return {"steps": [{"name": "gcr.io/cloud-builders/docker", "args": build}], "images": [image], "timeout": BUILD_TIMEOUT}


def function_env(args: argparse.Namespace) -> dict[str, str]:
    from .deployment import CAP_FIELDS, DeploymentSettings

    caps = {name: getattr(args, name) for name in CAP_FIELDS}
    settings = DeploymentSettings(
        project_id=args.project,
        region=args.region,
        topic=args.topic,
        job_service_account=args.job_service_account,
        allowed_images=tuple(args.allowed_image),
        **{key: value for key, value in caps.items() if value not in (None, "")},
    )
    return settings.to_env()


def env_yaml(env: dict[str, str]) -> str:
    # JSON strings are YAML double-quoted scalars: every value stays a string, whatever it holds.
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in sorted(env.items()))


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            if child.name not in SKIPPED_PARTS and not child.name.endswith((".pyc", ".egg-info")):
                yield from _files(child)
    else:
        yield path


def digest(paths: Sequence[str], texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(b"text\0" + text.encode() + b"\0")
    for top in paths:
        top_path = Path(top)
        for path in _files(top_path):
            relative = path.relative_to(top_path).as_posix() if path != top_path else path.name
            h.update(b"file\0" + relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _config():
    from .local import covalent_config

    return covalent_config


def config_set(pairs: Sequence[str]) -> int:
    from .settings import SETTING_KEYS

    covalent_config = _config()
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeployError(f"config-set: expected KEY=VALUE, got {pair!r}")
        if key not in SETTING_KEYS:
            raise DeployError(f"config-set: {key!r} is not a GCPBatchExecutor setting (settings.py lists them)")
        values[key] = value
    before = covalent_config.read_executor_section()
    path = covalent_config.write_executor_section(values)
    changed = [key for key in values if before.get(key) != values[key]]
    print(f"[executors.{covalent_config.SECTION}] in {path}: " + (f"set {', '.join(changed)}" if changed else "unchanged"))
    return 0


def config_unset(keys: Sequence[str], if_bucket: str) -> int:
    covalent_config = _config()
    section = covalent_config.read_executor_section()
    path = covalent_config.config_file()
    if section.get("bucket_name") != if_bucket:
        print(
            f"[executors.{covalent_config.SECTION}] in {path} does not point at bucket {if_bucket!r}"
            f" (bucket_name={section.get('bucket_name', '')!r}): left as it is"
        )
        return 0
    covalent_config.remove_executor_section_keys(keys)
    print(f"Removed from [executors.{covalent_config.SECTION}] in {path}: {', '.join(keys)}")
    return 0


def config_show() -> int:
    covalent_config = _config()
    section = covalent_config.read_executor_section()
    print(f"# {covalent_config.config_file()}")
    print(f"[executors.{covalent_config.SECTION}]")
    for key, value in section.items():
        print(f"{key} = {json.dumps(value)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploy_helper", description="Helpers for deploy.sh.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("versions")
    p = commands.add_parser("lifecycle")
    p.add_argument("--days", type=int, required=True)
    p = commands.add_parser("bucket-matches")
    p.add_argument("--days", type=int, required=True)
    p = commands.add_parser("has-binding")
    p.add_argument("role")
    p.add_argument("member")
    p = commands.add_parser("build-config")
    p.add_argument("--image", required=True)
    p.add_argument("--python-version", required=True)
    p.add_argument("--covalent-version", required=True)
    p = commands.add_parser("function-env")
    for name in ("--project", "--region", "--topic", "--job-service-account"):
        p.add_argument(name, required=True)
    p.add_argument("--allowed-image", action="append", required=True)
    from .deployment import CAP_FIELDS, cap_flag  # pydantic: only while building this parser

    for name in CAP_FIELDS:
        p.add_argument(cap_flag(name), dest=name, default=None)
    p = commands.add_parser("digest")
    p.add_argument("--text", action="append", default=[])
    p.add_argument("paths", nargs="*")
    p = commands.add_parser("config-set")
    p.add_argument("pairs", nargs="+")
    p = commands.add_parser("config-unset")
    p.add_argument("--if-bucket", required=True)
    p.add_argument("keys", nargs="*", help="default: every key a deployment writes (settings.DEPLOYMENT_KEYS)")
    commands.add_parser("config-show")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DeployError as err:
        print(f"deploy_helper {args.command}: {err}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "versions":
        print(versions())
    elif command == "lifecycle":
        if args.days < 1:
            raise DeployError("--days must be at least 1")
        print(json.dumps(lifecycle(args.days), indent=2))
    elif command == "bucket-matches":
        problems = bucket_differences(json.load(sys.stdin), args.days)
        for problem in problems:
            print(f"  bucket: {problem}", file=sys.stderr)
        return NO if problems else 0
    elif command == "has-binding":
        text = sys.stdin.read().strip()
        return 0 if has_binding(json.loads(text) if text else {}, args.role, args.member) else NO
    elif command == "build-config":
        print(json.dumps(build_config(args.image, args.python_version, args.covalent_version), indent=2))
    elif command == "function-env":
        from pydantic import ValidationError

        try:
            env = function_env(args)
        except ValidationError as err:
            raise DeployError(f"invalid deployment setting: {err}") from None
        print(env_yaml(env), end="")
    elif command == "digest":
        print(digest(args.paths, args.text))
    elif command == "config-set":
        return config_set(args.pairs)
    elif command == "config-unset":
        from .settings import DEPLOYMENT_KEYS

        return config_unset(args.keys or DEPLOYMENT_KEYS, args.if_bucket)
    elif command == "config-show":
        return config_show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
