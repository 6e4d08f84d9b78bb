"""GCPBatchExecutor without a Covalent server: what the server would answer, answered locally
(the job handle kept, no cancel requested, this interpreter's versions)."""

from __future__ import annotations

import platform

from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor


class DirectExecutor(GCPBatchExecutor):
    async def set_job_handle(self, handle):
        self.handle = handle

    async def get_cancel_requested(self):
        return False

    async def get_version_info(self):
        import covalent

        return {"python": platform.python_version(), "covalent": covalent.__version__}
