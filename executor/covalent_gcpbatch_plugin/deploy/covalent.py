"""The deployment's side of the Covalent config: write, remove and show ``[executors.gcpbatch]``
(covalent_config.py does the file handling, honouring COVALENT_CONFIG_DIR)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .. import covalent_config
from ..errors import DeployError
from ..settings import SETTING_KEYS


def parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeployError(f"expected KEY=VALUE, got {pair!r}")
        if key not in SETTING_KEYS:
            raise DeployError(f"{key!r} is not a GCPBatchExecutor setting (settings.py lists them)")
        values[key] = value
    return values


def conf_file(path: str, pairs: Sequence[str]) -> int:
    """Write the settings as ``[gcpbatch]`` of an INI file: what ``covalent deploy up gcpbatch``
    reads back with a ConfigParser and validates with ExecutorPluginDefaults."""
    from configparser import ConfigParser
    from pathlib import Path

    values = parse_pairs(pairs)
    parser = ConfigParser(interpolation=None)
    parser[covalent_config.SECTION] = values
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w") as f:
        parser.write(f)
    print(f"[{covalent_config.SECTION}] written to {target}: {', '.join(values)}")
    return 0


def config_set(pairs: Sequence[str]) -> int:
    values = parse_pairs(pairs)
    before = covalent_config.read_executor_section()
    path = covalent_config.write_executor_section(values)
    changed = [key for key in values if before.get(key) != values[key]]
    print(f"[executors.{covalent_config.SECTION}] in {path}: " + (f"set {', '.join(changed)}" if changed else "unchanged"))
    return 0


def config_unset(keys: Sequence[str], if_bucket: str) -> int:
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
    section = covalent_config.read_executor_section()
    print(f"# {covalent_config.config_file()}")
    print(f"[executors.{covalent_config.SECTION}]")
    for key, value in section.items():
        print(f"{key} = {json.dumps(value)}")
    return 0
