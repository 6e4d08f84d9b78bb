"""The contract between the hops: executor -> GCS -> function -> Batch -> worker -> Pub/Sub.

Everything two hops must agree on lives here and nowhere else, one module per concern:

* ``layout``: the GCS objects of one task, the deterministic Batch job id, resource names;
* ``spec``: the job spec the executor attaches to the task object as custom metadata;
* ``outcome``: the worker's environment, exit codes and error record;
* ``messages``: the Pub/Sub messages Batch publishes (and the function's "no job" messages).

(What a deployment allows is deployment.py; the executor's settings are settings.py.) The Cloud
Function imports this package too (``functions/`` links its files), so it depends on nothing but
the standard library, pydantic and errors.py. Import names from here: ``protocol.TaskObjects``.
"""

from __future__ import annotations

from ..errors import SpecError  # noqa: F401 - what spec validation raises
from .layout import (  # noqa: F401
    TASKS_PREFIX,
    TASK_OBJECT,
    RESULT_OBJECT,
    ERROR_OBJECT,
    STDOUT_OBJECT,
    STDERR_OBJECT,
    CANCEL_OBJECT,
    NOT_CREATED_OBJECT,
    JOB_ID_PATTERN,
    PACK_OBJECT,
    TaskObjects,
    PackObjects,
    objects_of,
    job_id_of_task_object,
    pack_id_of_pack_object,
    make_pack_id,
    is_pack_id,
    task_name,
    new_attempt_token,
    make_job_id,
    node_id_of_job_id,
    location_name,
    job_name,
    topic_path,
    job_id_of_job_name,
    job_console_url,
    job_logs_command,
    job_logs_filter,
    dispatch_prefix,
    STREAMS,
)
from .spec import (  # noqa: F401
    PROTOCOL_VERSION,
    SPEC_METADATA_KEY,
    MAX_METADATA_BYTES,
    PACK_METADATA_KEY,
    MAX_PACK_TASKS,
    MAX_PARALLELISM,
    JobOptions,
    GcsVolume,
    BUCKET_NAME,
    SECRET_NAME,
    SECRET_VERSION_NAME,
    secret_of_version,
    JobSpec,
    PackManifest,
    LOCAL_SSD_GB,
    SCRATCH_DEVICE_NAME,
    SCRATCH_MOUNT_PATH,
    HYPERDISK_ONLY_FAMILIES,
    NO_RESERVATION,
    job_problem,
    cap_exceeded,
    exceeded_cap,
)
from .outcome import (  # noqa: F401
    ENV_BUCKET,
    ENV_TASK_BUCKET,
    ENV_JOB_ID,
    ENV_RETRY_ATTEMPT,
    ENV_JOB_UID,
    ENV_LOCAL_MOUNTS,
    WORKER_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    OUTCOME_JOB_UID_KEY,
    OUTCOME_ATTEMPT_KEY,
    ENV_PACK_ID,
    ENV_TASK_INDEX,
    EXIT_CANCELLED,
    EXIT_TOO_LATE,
    EXIT_TASK_FAILED,
    EXIT_WORKER_ERROR,
    EXIT_UPLOAD_FAILED,
    EXIT_MAX_RUN_DURATION,
    RETRIED_EXIT_CODES,
    INFRASTRUCTURE_EXIT_CODES,
    EXIT_CODE_MEANINGS,
    worker_environment,
    pack_environment,
    exit_code_of_event,
    ErrorRecord,
    dumps_error,
    loads_error,
)
from .messages import (  # noqa: F401
    JobState,
    state_name,
    JOB_STATE_CHANGED,
    TASK_REJECTED,
    TASK_NOT_CREATED,
    JobEvent,
    parse_notification,
    TaskEvent,
    parse_task_notification,
    JOB_STATE_OF_TASK_STATE,
    member_event,
    TASK_STATE_CHANGED,
    NotCreated,
    not_created_message,
    dumps_not_created,
    loads_not_created,
    job_state_message,
    task_state_message,
)
