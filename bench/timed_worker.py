"""The unmodified worker (covalent_gcpbatch_plugin.worker), with timestamps around its phases.

The benchmarks start the local Batch service with ``--worker-command "python bench/timed_worker.py
<timings dir>"``, so every job runs this script instead of ``python -m covalent_gcpbatch_plugin.worker``.
It runs the worker's own ``main()``; the only additions are ``time.time()`` marks (wall clock, the
same clock as the Batch service's state-entry times) written to ``<timings dir>/<job id>.json``:

* ``start``: first line of this script (the interpreter is up, ``site`` is imported);
* ``imported``: the worker module and what it imports on its way (covalent for the version check,
  google-cloud-storage for the client) are imported;
* ``download_start`` / ``download_end``: around ``worker.load_task`` (object metadata, version
  check, download, unpickle);
* ``call_start`` / ``call_end``: around the task's own function;
* ``end``: ``worker.main()`` returned (result pickled, stdout/stderr/result uploaded); then it
  exits as the worker does (``worker.exit_now``).

Nothing in the worker is changed: ``load_task`` is wrapped through the module attribute that
``worker.run`` looks up at call time.
"""

import time

START = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# Run as a script: sys.path[0] is bench/; nothing there should shadow the worker's imports.
del sys.path[0]


def main() -> int:
    timings_dir = sys.argv[1]
    marks = {"start": START}
    import covalent  # noqa: F401 - the worker imports it for its version check
    import google.cloud.storage  # noqa: F401 - and this for its client

    from covalent_gcpbatch_plugin import worker

    marks["imported"] = time.time()
    load_task = worker.load_task

    def timed_load_task(bucket, objects, workdir, *rest):
        marks["download_start"] = time.time()
        function, args, kwargs = load_task(bucket, objects, workdir, *rest)
        marks["download_end"] = time.time()

        def timed(*a, **k):
            marks["call_start"] = time.time()
            try:
                return function(*a, **k)
            finally:
                marks["call_end"] = time.time()

        return timed, args, kwargs

    worker.load_task = timed_load_task
    code = worker.main()
    marks["end"] = time.time()
    marks["exit_code"] = code
    job_id = os.environ.get("GCPBATCH_JOB_ID", f"unknown-{os.getpid()}")
    path = os.path.join(timings_dir, f"{job_id}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(marks, f)
    os.replace(path + ".tmp", path)
    return code


if __name__ == "__main__":
    from covalent_gcpbatch_plugin.worker import exit_now

    exit_now(main())  # as the worker ends: the service's exit time is the worker's own
