"""Where a task finds a bucket it mounted (``gcs_volumes``): ``volume_path("/mnt/data/x.csv")``.

On Batch that is the path itself: Batch mounts the bucket there with gcsfuse and binds it into the
container. The local stack runs each worker as a host process, which cannot see ``/mnt/...``: its
Batch service copies each mounted folder into the attempt's own directory and tells the worker
where (``protocol.ENV_LOCAL_MOUNTS``, set by nothing else), and this function maps the path there.
Code that reads its mounts through it runs unchanged on both (docs/local.md).

Imports only the protocol (the standard library and pydantic), which every worker image has.
"""

from __future__ import annotations

import json
import os

from .protocol.outcome import ENV_LOCAL_MOUNTS


def volume_path(path: str) -> str:
    """``path`` inside a mounted bucket, as this task sees it: the path itself on Batch; on the
    local stack, the same file in the local Batch service's copy of the bucket's folder."""
    mounts = json.loads(os.environ.get(ENV_LOCAL_MOUNTS) or "{}")
    for mount_path, local in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return local + path[len(mount_path):]
    return path
