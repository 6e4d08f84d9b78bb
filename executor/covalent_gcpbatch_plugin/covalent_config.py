"""Edit the ``[executors.gcpbatch]`` section of the Covalent config file in use.

Covalent keeps its whole configuration in one TOML file (``$COVALENT_CONFIG_DIR/covalent.conf``,
else ``$XDG_CONFIG_DIR/covalent.conf``, else ``~/.config/covalent/covalent.conf``) and rewrites it
from memory whenever it updates it, under ``<file>.lock``. We take the same lock and touch only our
section's keys, so Covalent's own entries and any other executor's are left as they are.

Covalent merges the file INTO its in-memory copy on every update, so a key removed from the file
stays in the memory of a Covalent process that read it and could be written back by that
process's next update. In practice the next ``import covalent`` (plugin discovery) first writes
the plugin's defaults (empty strings) for missing keys, and file values win over memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import filelock
import toml

from .errors import ConfigError

SECTION = "gcpbatch"
LOCK_TIMEOUT_S = 10


def config_file() -> Path:
    """The file Covalent reads (same resolution as covalent._shared_files.defaults)."""
    directory = os.environ.get("COVALENT_CONFIG_DIR") or os.environ.get("XDG_CONFIG_DIR")
    if not directory:
        directory = str(Path(os.environ.get("HOME") or Path.home()) / ".config" / "covalent")
    return Path(directory) / "covalent.conf"


def read_executor_section(path: Path | None = None, timeout_s: float = LOCK_TIMEOUT_S) -> dict[str, Any]:
    """``[executors.gcpbatch]`` as Covalent last wrote it. Covalent rewrites the file in place
    (truncate, then write) under ``<file>.lock``, and every ``import covalent`` does so: read under
    the same lock, or a reader can meet an empty file."""
    path = path or config_file()
    if not path.exists():
        return {}
    try:
        with filelock.FileLock(f"{path}.lock", timeout=timeout_s):
            return dict(toml.load(path).get("executors", {}).get(SECTION, {}))
    except FileNotFoundError:
        return {}
    except filelock.Timeout:
        raise ConfigError(
            f"{path}.lock was held for over {timeout_s:g} s, so {path} could not be read: another process "
            "(Covalent) is writing it; try again, or remove the lock file if no Covalent process is running"
        ) from None


def write_executor_section(values: Mapping[str, Any], path: Path | None = None) -> Path:
    """Set ``values`` in ``[executors.gcpbatch]`` (other keys untouched); returns the file."""
    return _edit(lambda section: section.update(values), path)


def remove_executor_section_keys(
    keys: Iterable[str], restore: Mapping[str, Any] | None = None, path: Path | None = None
) -> Path:
    """Take ``keys`` out of ``[executors.gcpbatch]``; a key in ``restore`` gets that value back instead."""
    restore = restore or {}

    def remove(section: dict[str, Any]) -> None:
        for key in keys:
            if key in restore:
                section[key] = restore[key]
            else:
                section.pop(key, None)

    return _edit(remove, path)


def _edit(change: Callable[[dict[str, Any]], None], path: Path | None) -> Path:
    path = path or config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
        try:
            config = toml.load(path)
        except FileNotFoundError:
            config = {}
        section = config.setdefault("executors", {}).setdefault(SECTION, {})
        change(section)
        if not section:
            del config["executors"][SECTION]
            if not config["executors"]:
                del config["executors"]
        # Replace atomically: a Covalent process reading without the lock never sees half a file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(toml.dumps(config))
        os.replace(tmp, path)
    return path
