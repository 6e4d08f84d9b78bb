"""What Batch does on a task's VM before its container starts and after it ends, for the local
service: mount the task's buckets (``TaskSpec.volumes``, gcsfuse on a real VM) and read its
secrets (``Environment.secret_variables``, Secret Manager on a real VM).

* **Secrets**: the service's secret store is a directory standing in for Secret Manager
  (``--secrets-dir``): the value of ``projects/P/secrets/S/versions/V`` is the file of that
  relative path, ``versions/latest`` the highest numbered one. Values go into the worker's
  environment and nowhere else: never into the job, its events, the service's log or the
  attempt's log (an unreadable secret is named, its value never is).
* **Mounts**: a host process cannot see ``/mnt/...``, so each bucket folder is copied from the GCS
  emulator into the attempt's own directory before the worker starts, and the worker is told where
  (``protocol.ENV_LOCAL_MOUNTS``: ``volume_path`` maps a mount path there). A read-only mount's
  copy is made read-only (files 0444, directories 0555) and never written back; a read-write
  mount's changes (new, changed and deleted files) are written back to the bucket after the
  attempt, as gcsfuse writes a file on close and deletes an object on unlink. Only from an
  emulator (STORAGE_EMULATOR_HOST): the local service never touches real Cloud Storage. An
  attached disk's volume (the scratch disk) is an empty directory of the attempt's, mapped the same way.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.cloud import batch_v1

from ... import protocol


class TaskSetupError(Exception):
    """A secret or a mount the task cannot have: the attempt fails before its worker starts. The
    message names what, never a secret's value."""


def is_read_only(volume: batch_v1.Volume) -> bool:
    """gcsfuse's ``-o ro`` among the volume's mount options (jobs.build_volumes writes it)."""
    return any(option.replace(" ", "") in ("-oro", "--o=ro", "-o=ro") for option in volume.mount_options)


def secret_file(store: Path, version_name: str) -> Path:
    """The store's file of a secret version (``latest``: its highest numbered version)."""
    match = protocol.SECRET_VERSION_NAME.fullmatch(version_name)
    if match is None:
        raise TaskSetupError(f"{version_name!r} is not a secret version name")
    secret_dir = store / match["secret"] / "versions"
    if version_name.endswith("/versions/latest"):
        numbered = [int(p.name) for p in secret_dir.glob("*") if p.name.isdigit() and p.is_file()] if secret_dir.is_dir() else []
        if not numbered:
            raise TaskSetupError(f"secret {match['secret']} has no version in the local secret store ({store})")
        return secret_dir / str(max(numbered))
    return store / version_name


def resolve_secrets(secret_variables: Mapping[str, str], store: Path | None) -> dict[str, str]:
    """Environment name -> value, read from the store; TaskSetupError naming the first unreadable one."""
    values = {}
    for name, version_name in secret_variables.items():
        if store is None:
            raise TaskSetupError(f"secret variable {name} needs a secret store: start the local Batch service with "
                                 "--secrets-dir (`covalent-gcpbatch local up` does)")
        path = secret_file(store, version_name)
        try:
            values[name] = path.read_text().removesuffix("\n")
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as err:
            raise TaskSetupError(f"secret variable {name}: cannot access {version_name} in the local secret store "
                                 f"({type(err).__name__})") from None
    return values


def _digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - a change check, not security


@dataclass
class Mount:
    volume: batch_v1.Volume
    local: Path
    bucket: str
    prefix: str  # "" or "folder/"
    read_only: bool
    #: An attached disk's volume (the scratch disk): an empty directory of the attempt's, new on
    #: each VM as a new disk is, and never written anywhere after.
    disk: bool = False
    #: What was copied: relative path -> md5, to find what the task changed.
    copied: dict[str, str] = field(default_factory=dict)


@dataclass
class LocalMounts:
    """The task's buckets, copied into ``root`` (one directory per volume)."""

    mounts: list[Mount] = field(default_factory=list)

    def environment(self) -> dict[str, str]:
        if not self.mounts:
            return {}
        return {protocol.ENV_LOCAL_MOUNTS: json.dumps({m.volume.mount_path: str(m.local) for m in self.mounts})}

    @classmethod
    def prepare(cls, volumes, root: Path, emulator_host: str) -> LocalMounts:
        """Copy every GCS volume's folder into ``root``; TaskSetupError for anything else."""
        result = cls()
        disks = [volume for volume in volumes if volume.device_name]
        for index, volume in enumerate(disks):
            local = root / f"disk-{index}"
            local.mkdir(parents=True)
            result.mounts.append(Mount(volume=volume, local=local, bucket="", prefix="", read_only=False, disk=True))
        volumes = [volume for volume in volumes if not volume.device_name]
        if not volumes:
            return result
        if not emulator_host:
            raise TaskSetupError("the local Batch service mounts buckets from a GCS emulator only: STORAGE_EMULATOR_HOST "
                                 "is not set in its environment")
        from ... import clients

        client = clients.storage_client("local", emulator_host)
        for index, volume in enumerate(volumes):
            if "gcs" not in volume:
                raise TaskSetupError(f"volume {volume.mount_path}: only Cloud Storage volumes are mounted locally")
            bucket, _, folder = volume.gcs.remote_path.partition("/")
            prefix = f"{folder.rstrip('/')}/" if folder.strip("/") else ""
            mount = Mount(volume=volume, local=root / f"mount-{index}", bucket=bucket, prefix=prefix,
                          read_only=is_read_only(volume))
            mount.local.mkdir(parents=True)
            try:
                for blob in client.list_blobs(bucket, prefix=prefix or None):
                    relative = blob.name[len(prefix):]
                    if not relative or relative.endswith("/"):
                        continue  # the folder itself, or a folder placeholder
                    target = (mount.local / relative).resolve()
                    if not target.is_relative_to(mount.local.resolve()):
                        continue  # an object name gcsfuse could not show as a file either
                    target.parent.mkdir(parents=True, exist_ok=True)
                    blob.download_to_filename(str(target))
                    mount.copied[relative] = _digest(target)
            except Exception as err:  # noqa: BLE001 - a missing bucket or an unreachable emulator
                raise TaskSetupError(f"volume {volume.mount_path}: cannot mount gs://{volume.gcs.remote_path}: "
                                     f"{type(err).__name__}: {err}") from None
            if mount.read_only:
                _make_read_only(mount.local)
            result.mounts.append(mount)
        return result

    def write_back(self, emulator_host: str) -> list[str]:
        """Upload what the task wrote into its read-write mounts, delete what it removed; the
        object names changed (read-only mounts: none, whatever the task did to its copy)."""
        writable = [m for m in self.mounts if not m.read_only and not m.disk]
        if not writable:
            return []
        from ... import clients

        client = clients.storage_client("local", emulator_host)
        changed = []
        for mount in writable:
            bucket = client.bucket(mount.bucket)
            present = {p.relative_to(mount.local).as_posix(): p for p in mount.local.rglob("*")
                       if p.is_file() and not p.is_symlink()}
            for relative, path in sorted(present.items()):
                if mount.copied.get(relative) != _digest(path):
                    bucket.blob(mount.prefix + relative).upload_from_filename(str(path))
                    changed.append(f"gs://{mount.bucket}/{mount.prefix}{relative}")
            for relative in sorted(set(mount.copied) - set(present)):
                bucket.blob(mount.prefix + relative).delete()
                changed.append(f"gs://{mount.bucket}/{mount.prefix}{relative} (deleted)")
        return changed


def _make_read_only(root: Path) -> None:
    """Files 0444 and directories 0555, deepest first (a process running as root is not stopped
    by modes: ``write_back`` never writes a read-only mount back in any case)."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)
    root.chmod(0o555)


def make_writable(root: Path) -> None:
    """Undo ``_make_read_only`` so that the attempt's directory can be removed."""
    if not root.exists():
        return
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
