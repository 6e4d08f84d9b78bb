"""Covalent file transfers to and from Cloud Storage as the job's own service account.

Covalent 0.240.0's ``ct.fs_strategies.GCloud`` needs a service account key file: without
``credentials`` its client is built from ``service_account.Credentials.from_service_account_info(None)``,
which fails on the worker (``AttributeError: 'NoneType' object has no attribute 'keys'``;
covalent/_file_transfer/strategies/gcloud_strategy.py). A key file is a long-lived secret this
deployment never makes. ``GCloudDefaultCredentials`` is the same strategy with the environment's own
credentials (google.auth's Application Default Credentials: on a Batch VM, the job's service
account from the metadata server; on the local stack, the GCS emulator), so a task reaches the
buckets its deployment granted (``--allowed-mount-buckets``, ``--allowed-writable-mount-buckets``)
and no other:

    files=[ct.fs.TransferFromRemote("gs://bucket/in.csv", "/tmp/in.csv", strategy=GCloudDefaultCredentials())]

The worker image has what it needs (google-cloud-storage, and covalent's furl).
"""

from __future__ import annotations

from covalent import fs_strategies


class GCloudDefaultCredentials(fs_strategies.GCloud):
    """``ct.fs_strategies.GCloud`` with the environment's credentials instead of a key file."""

    def __init__(self, project_id: str | None = None) -> None:
        super().__init__(credentials=None, project_id=project_id)

    def _get_service_client(self, bucket_name: str):
        from google.cloud import storage

        # No credentials given: the client finds the environment's (the VM's account), or, with
        # STORAGE_EMULATOR_HOST set, talks to the emulator anonymously (google-cloud-storage Client).
        return storage.Client(project=self.project_id).bucket(bucket_name)
