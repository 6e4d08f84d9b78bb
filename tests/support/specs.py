"""Valid example job specs and deployment settings for tests, varied with keyword overrides."""

from __future__ import annotations

from covalent_gcpbatch_plugin import protocol as p
from covalent_gcpbatch_plugin.deployment import DeploymentSettings


def spec(**overrides) -> p.JobSpec:
    values = dict(
        dispatch_id="8f1c2d3e-aaaa-bbbb-cccc-1234567890ab",
        node_id=3,
        project_id="my-project",
        region="us-east1",
        container_image_uri="us-docker.pkg.dev/my-project/covalent/worker:1",
        vcpus=2,
        memory_mb=256,
        time_limit_s=300,
        retries=3,
        python_version="3.11",
        covalent_version="0.240.0",
    )
    values.update(overrides)
    return p.JobSpec(**values)


def deployment(**overrides) -> DeploymentSettings:
    values = dict(project_id="my-project", region="us-east1", topic="jobs", job_service_account="runner@my-project.iam.gserviceaccount.com",
                  allowed_images=("us-docker.pkg.dev/my-project/covalent/worker:1",), max_vcpus=8)
    values.update(overrides)
    return DeploymentSettings(**values)
