"""What ``deploy.sh`` asks Python for, so that the shell script never parses JSON or edits TOML.

    python -m covalent_gcpbatch_plugin.deploy_helper COMMAND [ARGS]

Commands (each prints its answer on stdout; a check answers with its exit status):

``versions``
    ``<python major.minor> <covalent version>`` of this interpreter: the worker image must be built
    for the environment tasks are dispatched from.
``lifecycle --days N [--everything]``
    The bucket's lifecycle file: delete objects under protocol.TASKS_PREFIX (or every object: the
    build staging bucket) after N days.
``bucket-matches --days N`` (bucket resource JSON, ``describe --raw``, on stdin)
    Exit 0 if the bucket has that lifecycle rule, uniform bucket-level access and public access
    prevention; else exit 3 (NO), saying what differs on stderr.
``has-binding ROLE MEMBER [--condition EXPRESSION]`` (IAM policy JSON on stdin)
    Exit 0 if the policy binds ROLE to MEMBER unconditionally (or under exactly that condition), else 3 (NO).
``build-config --image URI --python-version X.Y --covalent-version V``
    The Cloud Build config (JSON) that builds worker_image/Dockerfile with those build arguments
    from the repository root and pushes it.
``function-env --project P --region R --topic T --job-service-account SA --task-bucket B --bucket B --allowed-image URI... [caps]``
    The function's environment (YAML, for ``gcloud functions deploy --env-vars-file``), written by
    deployment.DeploymentSettings.to_env, so it is exactly what DeploymentSettings.from_env reads.
    The caps' flags are deployment.CAP_FIELDS (``--max-vcpus``...).
``stage-context DEST [--requirements FILE]``
    Copy the worker image's build context (the Dockerfile and exactly what it copies; FILE as the
    user's extra requirements) into DEST and print its digest, which tags the image.
``digest [--text S]... PATH...``
    A short content digest of files (directories recursively, symlinks followed, caches skipped).
``conf-file PATH KEY=VALUE...``
    Write the settings as the ``[gcpbatch]`` section of PATH, for ``covalent deploy up gcpbatch``
    (infra.py), which reads it into the Covalent config itself.
``config-set KEY=VALUE...`` / ``config-unset --if-bucket B [KEY...]`` / ``config-show``
    Edit or show ``[executors.gcpbatch]`` of the Covalent config in use (covalent_config.py,
    which honours COVALENT_CONFIG_DIR). Keys must be GCPBatchExecutor settings (settings.py).
    ``config-unset`` removes the given keys, or every key a deployment writes
    (settings.DEPLOYMENT_KEYS), and leaves the section alone unless its bucket_name is B, so
    tearing a deployment down never removes another deployment's settings.

The work is done by deploy/ (one module per domain); this module is the command table over it.
Each command is one short-lived process and imports only its domain.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .errors import DeployError

#: The exit status of a check that answers "no" (1 is left to Python's own errors).
NO = 3


@dataclass(frozen=True)
class Command:
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _print(value: str) -> int:
    print(value)
    return 0


def _versions(args: argparse.Namespace) -> int:
    from .deploy import image

    return _print(image.versions())


def _lifecycle(args: argparse.Namespace) -> int:
    from .deploy import cloud

    if args.days < 1:
        raise DeployError("--days must be at least 1")
    return _print(json.dumps(cloud.lifecycle(args.days, "" if args.everything else cloud.TASKS_PREFIX), indent=2))


def _bucket_matches(args: argparse.Namespace) -> int:
    from .deploy import cloud

    problems = cloud.bucket_differences(json.load(sys.stdin), args.days)
    for problem in problems:
        print(f"  bucket: {problem}", file=sys.stderr)
    return NO if problems else 0


def _has_binding(args: argparse.Namespace) -> int:
    from .deploy import cloud

    text = sys.stdin.read().strip()
    return 0 if cloud.has_binding(json.loads(text) if text else {}, args.role, args.member, args.condition) else NO


def _build_config(args: argparse.Namespace) -> int:
    from .deploy import image

    return _print(json.dumps(image.build_config(args.image, args.python_version, args.covalent_version), indent=2))


def _function_env_arguments(p: argparse.ArgumentParser) -> None:
    from .deployment import CAP_FIELDS, cap_flag  # pydantic: only while building this parser

    for name in ("--project", "--region", "--topic", "--job-service-account", "--task-bucket", "--bucket"):
        p.add_argument(name, required=True)
    p.add_argument("--allowed-image", action="append", required=True)
    for name in CAP_FIELDS:
        p.add_argument(cap_flag(name), dest=name, default=None)


def _function_env(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .deploy import cloud
    from .deployment import CAP_FIELDS

    try:
        env = cloud.function_env(project=args.project, region=args.region, topic=args.topic,
                                 job_service_account=args.job_service_account, allowed_images=args.allowed_image,
                                 caps={name: getattr(args, name) for name in CAP_FIELDS},
                                 task_bucket=args.task_bucket, bucket=args.bucket)
    except ValidationError as err:
        raise DeployError(f"invalid deployment setting: {err}") from None
    print(cloud.env_yaml(env), end="")
    return 0


def _stage_context(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deploy import image

    return _print(image.stage_context(Path(args.dest), Path(args.requirements) if args.requirements else None))


def _stage_context_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest")
    p.add_argument("--requirements", default="")


def _digest(args: argparse.Namespace) -> int:
    from .deploy import image

    return _print(image.digest(args.paths, args.text))


def _config_set(args: argparse.Namespace) -> int:
    from .deploy import covalent

    return covalent.config_set(args.pairs)


def _config_unset(args: argparse.Namespace) -> int:
    from .deploy import covalent
    from .settings import DEPLOYMENT_KEYS

    return covalent.config_unset(args.keys or DEPLOYMENT_KEYS, args.if_bucket)


def _conf_file(args: argparse.Namespace) -> int:
    from .deploy import covalent

    return covalent.conf_file(args.path, args.pairs)


def _conf_file_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("pairs", nargs="+")


def _config_show(args: argparse.Namespace) -> int:
    from .deploy import covalent

    return covalent.config_show()


def _days(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=int, required=True)


def _lifecycle_arguments(p: argparse.ArgumentParser) -> None:
    _days(p)
    p.add_argument("--everything", action="store_true", help="every object, not only the task objects")


def _nothing(p: argparse.ArgumentParser) -> None:
    pass


def _has_binding_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("role")
    p.add_argument("member")
    p.add_argument("--condition", default=None)


def _build_config_arguments(p: argparse.ArgumentParser) -> None:
    for name in ("--image", "--python-version", "--covalent-version"):
        p.add_argument(name, required=True)


def _digest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", default=[])
    p.add_argument("paths", nargs="*")


def _config_set_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pairs", nargs="+")


def _config_unset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--if-bucket", required=True)
    p.add_argument("keys", nargs="*", help="default: every key a deployment writes (settings.DEPLOYMENT_KEYS)")


COMMANDS: dict[str, Command] = {
    "versions": Command(_nothing, _versions),
    "lifecycle": Command(_lifecycle_arguments, _lifecycle),
    "bucket-matches": Command(_days, _bucket_matches),
    "has-binding": Command(_has_binding_arguments, _has_binding),
    "build-config": Command(_build_config_arguments, _build_config),
    "function-env": Command(_function_env_arguments, _function_env),
    "stage-context": Command(_stage_context_arguments, _stage_context),
    "digest": Command(_digest_arguments, _digest),
    "config-set": Command(_config_set_arguments, _config_set),
    "config-unset": Command(_config_unset_arguments, _config_unset),
    "config-show": Command(_nothing, _config_show),
    "conf-file": Command(_conf_file_arguments, _conf_file),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploy_helper", description="Helpers for deploy.sh.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.configure(commands.add_parser(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except DeployError as err:
        print(f"deploy_helper {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
