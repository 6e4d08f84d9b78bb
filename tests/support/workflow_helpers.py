"""Helpers for tests that dispatch Covalent workflows onto the local stack."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import covalent as ct
import pytest

from covalent_gcpbatch_plugin import clients, protocol

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "POSTPROCESSING_FAILED", "PENDING_POSTPROCESSING"}


def wait_for(dispatch_id: str, timeout_s: float = 180):
    """The dispatch's result once it is terminal (every failure explained: see
    ``assert_failures_explained``); fail (after cancelling it) past the bound."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = ct.get_result(dispatch_id, wait=False)
        if result is not None and str(result.status) in TERMINAL:
            assert_failures_explained(result)
            return result
        time.sleep(0.5)
    ct.cancel(dispatch_id)
    pytest.fail(f"dispatch {dispatch_id} did not finish within {timeout_s} s")


def one_node_flow(executor, body):
    """A lattice around one electron ``task`` running ``body(*args)``."""

    @ct.electron(executor=executor)
    def task(*args):
        return body(*args)

    @ct.lattice
    def flow(*args):
        return task(*args)

    return flow


def run_flow(flow, *args, timeout_s: float = 60):
    """Dispatch ``flow(*args)`` and wait for it (``timeout_s`` plus a minute for Covalent itself):
    (dispatch id, result, seconds from dispatch to terminal)."""
    started = time.monotonic()
    dispatch_id = ct.dispatch(flow)(*args)
    result = wait_for(dispatch_id, timeout_s=timeout_s + 60)
    return dispatch_id, result, time.monotonic() - started


def node_results(result) -> list[dict]:
    return [result.get_node_result(node_id) for node_id in result.lattice.transport_graph._graph.nodes]


def nodes_by_name(result) -> dict:
    """Node results by electron name (for workflows that use each electron once)."""
    return {node["node_name"]: node for node in node_results(result)}


def assert_failures_explained(result) -> None:
    """No node may end FAILED with nothing to say why. Covalent keeps an executor's
    TaskRuntimeError in the node's stderr (its message is dropped) and any other exception in its
    error: one of the two must say something."""
    silent = [n["node_name"] for n in node_results(result)
              if str(n["status"]) == "FAILED" and not (n.get("error") or "").strip() and not (n.get("stderr") or "").strip()]
    assert silent == [], f"nodes FAILED with an empty error and stderr: {silent}"


def failure_details(result) -> str:
    failed = [n for n in node_results(result) if str(n["status"]) == "FAILED"]
    return "\n".join(f"{n['node_name']}: error={n['error']!r} stderr={n['stderr']!r}" for n in failed)


def batch_admin(stack, path: str, body: dict | None = None) -> dict:
    """The local Batch service's admin API (stats, active, faults, reset)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{stack.batch_api_endpoint}/_admin/{path}", data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def active_jobs(stack) -> list:
    return batch_admin(stack, "active")["active"]


def jobs_of_dispatch(stack, dispatch_id: str) -> list:
    """Batch jobs of a dispatch, found by the label the job builder sets."""
    batch = clients.batch_client(stack.batch_api_endpoint)
    jobs = batch.list_jobs(parent=protocol.location_name(stack.project_id, stack.region))
    return [job for job in jobs if job.labels.get("covalent-dispatch-id") == dispatch_id.lower()]


def wait_until(condition, timeout_s: float, what: str, step_s: float = 0.1):
    """``condition()``'s first truthy value; fail naming ``what`` past the bound. Bounds are for a
    machine three times slower than ours: a test waits on the event, a benchmark times it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(step_s)


#: Batch's job states from which a job moves no more.
ENDED_JOB_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}


def no_active_job_left(stack, within_s: float = 90) -> None:
    """Every job of the local Batch service has ended (a cancel is an operation that ends later)."""
    wait_until(lambda: not active_jobs(stack), within_s, "every job of the local Batch service ended", step_s=0.3)


def ended_jobs_of_dispatch(stack, dispatch_id: str, within_s: float = 90) -> list:
    """The dispatch's jobs once every one has ended: a cancel or a last task's end is recorded on
    the job a moment after Covalent hears of it, on Batch as here."""
    return wait_until(lambda: (jobs := jobs_of_dispatch(stack, dispatch_id))
                      and all(j.status.state.name in ENDED_JOB_STATES for j in jobs) and jobs,
                      within_s, f"every job of dispatch {dispatch_id} ended", step_s=0.3)


def bridge_log(stack) -> Path:
    return Path(stack.state_dir) / "logs" / "bridge.log"


def wait_for_delivery(stack, object_name: str, status: int, timeout_s: float = 60) -> list[str]:
    """The local Eventarc's log lines for ``object_name``, once one says the function answered
    ``status``: the observable event that the function has seen (and decided on) the object."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in bridge_log(stack).read_text(errors="replace").splitlines() if f" {object_name} attempt=" in line]
        if any(f"-> {status} " in line for line in lines):
            return lines
        assert time.monotonic() < deadline, f"the bridge never delivered {object_name} with answer {status}: {lines}"
        time.sleep(0.1)


def create_attempts_of_dispatch(stack, dispatch_id: str) -> int:
    """create_job calls (failed ones too) for this dispatch's jobs, by the job id's prefix."""
    prefix = protocol.make_job_id(dispatch_id, 0, "x").rsplit("-", 2)[0] + "-"
    return sum(n for job_id, n in batch_admin(stack, "stats")["create_attempts"].items() if job_id.startswith(prefix))


def attempt_exit_codes(job) -> list[int]:
    """Each attempt's exit code, read from the job's status event text as on real Batch (its
    job-level events have no task_execution): the local Batch service words one per attempt."""
    return [protocol.exit_code_of_event(e) for e in job.status.status_events if e.description.startswith("Task state")]


def nonzero_exit_codes(job) -> list[int]:
    return [code for code in attempt_exit_codes(job) if code]
