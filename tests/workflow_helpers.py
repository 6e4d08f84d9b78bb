"""Helpers for tests that dispatch Covalent workflows onto the local stack."""

from __future__ import annotations

import json
import time
import urllib.request

import covalent as ct
import pytest

from covalent_gcpbatch_plugin import clients

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "POSTPROCESSING_FAILED", "PENDING_POSTPROCESSING"}


def wait_for(dispatch_id: str, timeout_s: float = 180):
    """The dispatch's result once it is terminal; fail (after cancelling it) past the bound."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = ct.get_result(dispatch_id, wait=False)
        if result is not None and str(result.status) in TERMINAL:
            return result
        time.sleep(0.5)
    ct.cancel(dispatch_id)
    pytest.fail(f"dispatch {dispatch_id} did not finish within {timeout_s} s")


def node_results(result) -> list[dict]:
    return [result.get_node_result(node_id) for node_id in result.lattice.transport_graph._graph.nodes]


def nodes_by_name(result) -> dict:
    """Node results by electron name (for workflows that use each electron once)."""
    return {node["node_name"]: node for node in node_results(result)}


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
    jobs = batch.list_jobs(parent=f"projects/{stack.project_id}/locations/{stack.region}")
    return [job for job in jobs if job.labels.get("covalent-dispatch-id") == dispatch_id.lower()]
