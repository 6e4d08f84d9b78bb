"""A recording stand-in for the ``gcloud`` CLI, for tests/stack/test_deploy.py. No network.

The test copies this file into a temporary ``bin/gcloud`` (with this interpreter as its shebang)
and puts that directory first on PATH. Every call appends one JSON line to ``$FAKE_GCLOUD_LOG``:
``{"argv": [...], "files": {flag: content}}`` (the content of any file passed with
``--lifecycle-file``, ``--config`` or ``--env-vars-file``, which deploy.sh deletes when it exits).
Calls are answered from a JSON state file (``$FAKE_GCLOUD_STATE``) that the fake keeps up to date:
``describe``/``list``/``get-iam-policy`` read it, ``create``/``deploy``/``submit``/
``add-iam-policy-binding``/``delete``/... change it, so a second ``deploy.sh up`` sees what the
first created. Creating what exists fails (ALREADY_EXISTS), and describing what does not fails
with NOT_FOUND, as gcloud does.

It knows exactly the commands deploy.sh uses; anything else fails loudly.

Failures a test injects (``"inject"`` in the sidecar, gcloud_recorder.Recorder.fail_next): each
rule fails the next ``times`` calls starting with its ``words``, and counts down. A rule with
``stderr`` prints that text and exits 1; one with ``build_failure`` (``builds submit``) records a
build that failed with that ``failureInfo.type`` (``builds describe`` shows it) and fails as gcloud
does: ``build <id> completed with status "FAILURE"``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FILE_FLAGS = ("--lifecycle-file", "--config", "--env-vars-file")
VERBS = {
    "describe", "list", "create", "delete", "update", "enable", "deploy", "submit", "rm",
    "get-iam-policy", "add-iam-policy-binding", "remove-iam-policy-binding", "service-agent",
}  # fmt: skip
ACCOUNT = "deployer@example.com"


def settings() -> dict:
    """``log`` and ``state`` file paths, and ``fail`` (words a call starting with them fails on):
    fake-gcloud.json beside this script, which the test writes (callers may clear the environment,
    as Terraform does), with FAKE_GCLOUD_LOG/FAKE_GCLOUD_STATE from the environment first."""
    sidecar = Path(sys.argv[0]).resolve().with_name("fake-gcloud.json")
    values = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    if os.environ.get("FAKE_GCLOUD_LOG"):
        values.update(log=os.environ["FAKE_GCLOUD_LOG"], state=os.environ["FAKE_GCLOUD_STATE"])
    return values
PROJECT_NUMBER = "424242424242"
GCS_AGENT = f"service-{PROJECT_NUMBER}@gs-project-accounts.iam.gserviceaccount.com"


def parse(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    positionals, flags = [], {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            flags.setdefault(name, []).append(value)
        elif arg == "-q":
            flags.setdefault("--quiet", []).append("")
        else:
            positionals.append(arg)
    return positionals, flags


def parse_condition(value: str) -> dict | None:
    """gcloud's ``--condition``: ``None`` (or absent) for none, else ``expression=...,title=...``
    (both required, as gcloud requires them). A binding is found by role and condition together."""
    if value in ("", "None"):
        return None
    condition = dict(pair.split("=", 1) for pair in value.split(","))
    if not condition.get("expression") or not condition.get("title"):
        fail(f"INVALID_ARGUMENT: a condition needs an expression and a title: {value}")
    return condition


def fail(message: str, code: int = 1) -> None:
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(code)


def lookup(resource: dict, dotted: str):
    value = resource
    for part in dotted.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return value


def show(resource, flags: dict[str, list[str]]) -> None:
    fmt = (flags.get("--format") or [""])[-1]
    if fmt == "none":
        return
    if fmt.startswith("value(") and fmt.endswith(")"):
        value = lookup(resource, fmt[len("value(") : -1])
        if isinstance(value, list):
            print("\n".join(str(v) for v in value))
        elif value != "":
            print(value)
        return
    print(json.dumps(resource, indent=2))


def inject_failure(positionals: list[str], flags: dict[str, list[str]], state: dict, state_file: Path) -> None:
    """Fail this call if an injected rule (module docstring) still has calls to fail."""
    sidecar = Path(sys.argv[0]).resolve().with_name("fake-gcloud.json")
    values = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    words = " ".join(positionals)
    rule = next((r for r in values.get("inject", []) if r["times"] > 0 and words.startswith(r["words"])), None)
    if rule is None:
        return
    rule["times"] -= 1
    sidecar.write_text(json.dumps(values))
    if not rule.get("build_failure"):
        print(rule["stderr"], file=sys.stderr)
        sys.exit(1)
    build_id = f"0000feed-{len(state['builds']):04d}-4000-8000-000000000000"
    region, project = flags["--region"][-1], flags["--project"][-1]
    state["builds"][build_id] = {"id": build_id, "status": "FAILURE", "failureInfo": {
        "type": rule["build_failure"], "detail": "injected by the test"}}  # fmt: skip
    state_file.write_text(json.dumps(state, indent=2))
    print(f"Created [https://cloudbuild.googleapis.com/v1/projects/{project}/locations/{region}/builds/{build_id}].",
          file=sys.stderr)  # fmt: skip
    fail(f'build {build_id} completed with status "FAILURE"')


def main() -> None:
    argv = sys.argv[1:]
    positionals, flags = parse(argv)
    files = {}
    for flag in FILE_FLAGS:
        for path in flags.get(flag, []):
            files[flag] = Path(path).read_text()
    context = {}
    if positionals[:2] == ["builds", "submit"] and len(positionals) > 2:
        # The build's source directory (deploy.sh stages it in a temporary directory): its files.
        top = Path(positionals[2])
        context = {path.relative_to(top).as_posix(): path.read_text() for path in sorted(top.rglob("*")) if path.is_file()}
    config = settings()
    state_file = Path(config["state"])
    with open(config["log"], "a") as log:
        log.write(json.dumps({"argv": argv, "files": files, "context": context}) + "\n")
    if config.get("fail") and " ".join(positionals).startswith(config["fail"]):
        fail(f"PERMISSION_DENIED: {config['fail']} refused (injected by the test)")
    if positionals[:2] == ["auth", "list"]:
        print(ACCOUNT)
        return

    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    resources: dict[str, dict] = state.setdefault("resources", {})
    policies: dict[str, dict] = state.setdefault("policies", {})
    enabled: list[str] = state.setdefault("enabled", [])
    builds: dict[str, dict] = state.setdefault("builds", {})
    inject_failure(positionals, flags, state, state_file)

    verb_at = next((i for i, p in enumerate(positionals) if p in VERBS), None)
    if verb_at is None:
        fail(f"fake gcloud does not know {argv}", 2)
    group, verb, rest = " ".join(positionals[:verb_at]), positionals[verb_at], positionals[verb_at + 1 :]
    # Regional resources are keyed by name and region; buckets, topics and accounts by name only.
    regional = group in ("artifacts repositories", "functions", "run services")
    where = (flags.get("--location") or flags.get("--region") or [""])[-1] if regional else ""
    name = rest[0] if rest else ""
    if group == "iam service-accounts" and verb == "create":
        name = f"{name}@{flags['--project'][-1]}.iam.gserviceaccount.com"
    if group == "projects":
        key = f"projects/{name}"
    elif group == "storage" and verb == "rm":
        key = f"storage buckets/{name}"
    else:
        key = f"{group}/{name}" + (f"@{where}" if where else "")

    def save() -> None:
        state_file.write_text(json.dumps(state, indent=2))

    def require(k: str) -> dict:
        if k not in resources and not k.startswith("projects/"):
            fail(f"NOT_FOUND: {k} not found: 404", 1)
        return resources.get(k, {})

    if group == "services" and verb == "list":
        print("\n".join(enabled))
    elif group == "services" and verb == "enable":
        enabled.extend(api for api in rest if api not in enabled)
        save()
    elif group == "storage" and verb == "service-agent":
        print(GCS_AGENT)
    elif group == "projects" and verb == "describe":
        show({"projectId": name, "projectNumber": PROJECT_NUMBER}, flags)
    elif group == "builds" and verb == "describe":
        if name not in builds:
            fail(f"NOT_FOUND: Requested entity was not found. (build {name})")
        show(builds[name], flags)
    elif verb == "describe":
        show(require(key), flags)
    elif verb == "get-iam-policy":
        require(key)
        show({"bindings": policies.get(key, {}).get("bindings", []), "etag": "BwX=", "version": 1}, flags)
    elif verb in ("add-iam-policy-binding", "remove-iam-policy-binding"):
        require(key)
        member, role = flags["--member"][-1], flags["--role"][-1]
        condition = parse_condition((flags.get("--condition") or [""])[-1])
        bindings = policies.setdefault(key, {"bindings": []})["bindings"]
        binding = next((b for b in bindings if b["role"] == role and b.get("condition") == condition), None)
        if verb == "add-iam-policy-binding":
            if binding is None:
                bindings.append(binding := {"role": role, "members": []})
                if condition:
                    binding["condition"] = condition
            if member not in binding["members"]:
                binding["members"].append(member)
        else:
            if binding is None or member not in binding["members"]:
                fail(f"Policy binding with the specified principal, role, and condition not found! ({member}, {role})")
            binding["members"].remove(member)
            if not binding["members"]:
                bindings.remove(binding)
        save()
        show({"bindings": bindings}, flags)
    elif verb == "create":
        if key in resources:
            fail(f"ALREADY_EXISTS: {key} already exists", 1)
        resource = {"name": name, "email": name, "flags": flags}
        if "--lifecycle-file" in files:
            resource["lifecycle"] = json.loads(files["--lifecycle-file"])
        if group == "storage buckets":
            resource["iamConfiguration"] = {
                "uniformBucketLevelAccess": {"enabled": "--uniform-bucket-level-access" in flags},
                "publicAccessPrevention": "enforced" if "--public-access-prevention" in flags else "inherited",
            }
        resources[key] = resource
        save()
    elif verb == "update":
        resource = require(key)
        if "--lifecycle-file" in files:
            resource["lifecycle"] = json.loads(files["--lifecycle-file"])
        save()
    elif group == "builds" and verb == "submit":
        config = json.loads(files["--config"])
        for image in config.get("images", []):
            resources[f"artifacts docker images/{image}"] = {"name": image, "image_summary": {"digest": "sha256:feed"}}
        save()
    elif group == "functions" and verb == "deploy":
        labels = dict(pair.split("=", 1) for pair in ",".join(flags.get("--update-labels", [])).split(",") if pair)
        previous = resources.get(key, {})
        resources[key] = {"name": name, "labels": {**previous.get("labels", {}), **labels}, "flags": flags}
        resources[f"run services/{name}@{where}"] = {"name": name}
        save()
    elif verb in ("delete", "rm"):
        require(key)
        del resources[key]
        policies.pop(key, None)
        if group == "functions":
            resources.pop(f"run services/{name}@{where}", None)
            policies.pop(f"run services/{name}@{where}", None)
        if group == "artifacts repositories":
            for image in [k for k in resources if k.startswith("artifacts docker images/") and f"/{name}/" in k]:
                del resources[image]
        save()
    else:
        fail(f"fake gcloud does not know {argv}", 2)


if __name__ == "__main__":
    main()
