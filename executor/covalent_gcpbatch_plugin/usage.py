"""What a Batch job used and what that cost: pure, from the job's own typed fields.

Batch's typed fields first (``JobStatus.run_duration``: the time the job spent RUNNING;
``JobStatus.task_groups[...].instances[]``: the machine type and provisioning model of the VMs it
actually got), and the job's request only where Batch gives nothing: a job that is still running or
never ran has no run duration, so its VM time falls back to the time between its SCHEDULED and
terminal status events (the one place where a state is only in English text); a job whose VMs Batch
has not reported (none yet, or an older API) is sized from its instance policy and task resources.
``Usage.time_source`` and ``Usage.machine_source`` say which one a figure came from.

``run_duration`` starts at RUNNING: the VM's boot and image pull before it (tens of seconds to a
few minutes) are billed by Compute Engine but in no typed field, so the estimate is low by that
much. Compute Engine bills every VM for at least a minute, then per second. The price is an
estimate from on-demand list prices (``PRICE_TABLE`` says which and when; override them with a JSON
file of the same shape: ``covalent-gcpbatch cost --prices FILE``); discounts, Spot prices, disks and
network are not in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .machine_types import shape_of
from .protocol import state_name

if TYPE_CHECKING:  # read only: the executor module imports this, and the worker image has no batch client
    from google.cloud import batch_v1

#: Compute Engine's billing minimum per VM.
MIN_BILLED_S = 60.0
#: Where DEFAULT_PRICES come from and when: printed by ``cost`` beside every estimate. List prices
#: change: check them, or pass your own (a --prices file may carry its own "as_of" and "source").
PRICE_TABLE: dict[str, str] = {
    # The day the figures were entered (commit 9f258b7); not re-read since: no network here.
    "as_of": "2026-11-26",
    "source": ("Compute Engine list prices, on demand, us-central1: https://cloud.google.com/compute/vm-instance-pricing "
               "(N2 and E2 predefined vCPU and memory) and https://cloud.google.com/compute/gpus-pricing (T4, L4)"),
}
#: USD per hour, on demand, us-central1 (PRICE_TABLE).
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "vcpu_hour": {"n2": 0.031611, "e2": 0.021811, "default": 0.031611},
    "gib_hour": {"n2": 0.004237, "e2": 0.002923, "default": 0.004237},
    "gpu_hour": {"nvidia-tesla-t4": 0.35, "nvidia-l4": 0.7111, "default": 0.0},
}
_TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class Usage:
    job_id: str
    state: str
    vm_seconds: float
    vcpus: float
    memory_gib: float
    machine_family: str
    gpus: int = 0
    gpu_type: str = ""
    #: The VM's machine type as Batch reports it (its instances), or as the job asked for it; "" if neither.
    machine_type: str = ""
    #: Where vm_seconds came from: "run_duration" (Batch's typed field) or "status_events" (fallback).
    time_source: str = "run_duration"
    #: Where the VM's size came from: "instances" (the VM Batch gave: its machine type's shape),
    #: "policy" (the machine type the job asked for) or "task" (the task's cpu_milli/memory_mib).
    machine_source: str = "task"
    provisioning_model: str = ""

    @property
    def billed_seconds(self) -> float:
        return max(MIN_BILLED_S, self.vm_seconds) if self.vm_seconds > 0 else 0.0

    def hours(self) -> dict[str, float]:
        h = self.billed_seconds / 3600
        return {"vcpu_hours": self.vcpus * h, "memory_gib_hours": self.memory_gib * h, "gpu_hours": self.gpus * h}


def _state_entered(job: batch_v1.Job, state: str) -> datetime | None:
    for event in job.status.status_events:
        text = event.description
        if text.startswith("Job state is set from") and f" to {state} " in f"{text} ":
            return event.event_time
    return None


def _seconds_between_events(job: batch_v1.Job) -> float:
    """Fallback where Batch gives no run duration: from the job's SCHEDULED event to its terminal
    one (to now for a job still running); 0 for a job that never got a VM. Batch writes a job's
    state only in these events' English text ("Job state is set from X to Y for job ...")."""
    started = _state_entered(job, "SCHEDULED")
    if started is None:
        return 0.0
    ended = next((t for t in (_state_entered(job, s) for s in _TERMINAL) if t is not None), None)
    end = ended or datetime.now(started.tzinfo)
    return max(0.0, (end - started).total_seconds())


def _run_duration_s(job: batch_v1.Job) -> float:
    """``JobStatus.run_duration`` in seconds (0 when Batch has not set it)."""
    if "run_duration" not in job.status:  # proto-plus: unset message field
        return 0.0
    return max(0.0, job.status.run_duration.total_seconds())


def vm_time(job: batch_v1.Job) -> tuple[float, str]:
    """(seconds, where they came from): Batch's ``run_duration`` when it has set it; the status
    events only when it has not (a job still running, or one that never reached RUNNING)."""
    run = _run_duration_s(job)
    if run > 0:
        return run, "run_duration"
    return _seconds_between_events(job), "status_events"


def vm_seconds(job: batch_v1.Job) -> float:
    return vm_time(job)[0]


def reported_instance(job: batch_v1.Job) -> batch_v1.JobStatus.InstanceStatus | None:
    """The first VM shape Batch reports for the job's task group (``status.task_groups[...]
    .instances``), or None while it reports none. One task group per job (group0)."""
    for group in job.status.task_groups.values():
        for instance in group.instances:
            if instance.machine_type:
                return instance
    return None


def usage_of(job: batch_v1.Job) -> Usage:
    resources = job.task_groups[0].task_spec.compute_resource if job.task_groups else None
    policy = job.allocation_policy.instances[0].policy if job.allocation_policy.instances else None
    accelerators = list(policy.accelerators) if policy else []
    seconds, time_source = vm_time(job)
    reported = reported_instance(job)
    # The VM Batch gave (its typed status) first; else the machine type the job asked for; else
    # the task's own request (Batch picks a machine for cpu_milli/memory_mib then: an e2 today).
    machine = reported.machine_type if reported else (policy.machine_type if policy else "")
    shape = shape_of(machine) if machine else None
    if shape is not None:
        vcpus, memory_gib, source = float(shape.vcpus), shape.memory_mb / 1024, "instances" if reported else "policy"
    else:
        vcpus = resources.cpu_milli / 1000 if resources and resources.cpu_milli else 1.0
        memory_gib = resources.memory_mib / 1024 if resources and resources.memory_mib else 0.5
        source = "task"
    model = (reported.provisioning_model if reported is not None and reported.provisioning_model
             else policy.provisioning_model if policy is not None else 0)
    provisioning = getattr(model, "name", str(model)) if model else ""  # the enum's name (STANDARD, SPOT...)
    return Usage(
        job_id=job.name.rsplit("/", 1)[-1],
        state=state_name(job.status.state),
        vm_seconds=seconds,
        vcpus=vcpus,
        memory_gib=memory_gib,
        machine_family=machine.split("-", 1)[0] if machine else "",
        gpus=sum(a.count for a in accelerators),
        gpu_type=accelerators[0].type_ if accelerators else "",
        machine_type=machine,
        time_source=time_source,
        machine_source=source,
        provisioning_model=provisioning,
    )


def load_prices(path: str | None) -> dict[str, dict[str, float]]:
    if not path:
        return DEFAULT_PRICES
    given = json.loads(Path(path).read_text())
    return {kind: {**DEFAULT_PRICES[kind], **given.get(kind, {})} for kind in DEFAULT_PRICES}


def price_table_of(path: str | None) -> dict[str, str]:
    """The date and source of the prices ``load_prices(path)`` returns: PRICE_TABLE's, or those a
    --prices file names (``"as_of"``, ``"source"``; else its path, as of unknown)."""
    if not path:
        return dict(PRICE_TABLE)
    given = json.loads(Path(path).read_text())
    return {"as_of": str(given.get("as_of") or "unknown"),
            "source": str(given.get("source") or f"{path} (over the defaults of {PRICE_TABLE['as_of']})")}


def _price(prices: dict[str, dict[str, float]], kind: str, key: str) -> float:
    table = prices[kind]
    return table.get(key, table["default"])


def estimate(usage: Usage, prices: dict[str, dict[str, float]] = DEFAULT_PRICES) -> float:
    """USD, on demand."""
    h = usage.hours()
    return (h["vcpu_hours"] * _price(prices, "vcpu_hour", usage.machine_family)
            + h["memory_gib_hours"] * _price(prices, "gib_hour", usage.machine_family)
            + h["gpu_hours"] * _price(prices, "gpu_hour", usage.gpu_type))  # fmt: skip


def summary(usage: Usage, prices: dict[str, dict[str, float]] = DEFAULT_PRICES) -> str:
    """One line for the executor's log when a task ends."""
    h = usage.hours()
    return (f"job {usage.job_id} {usage.state}: VM {usage.vm_seconds:.1f} s (billed {usage.billed_seconds:.0f} s), "
            f"{h['vcpu_hours']:.4f} vCPU-h, {h['memory_gib_hours']:.4f} GiB-h"
            + (f", {h['gpu_hours']:.4f} GPU-h" if usage.gpus else "")
            + (f" on {usage.machine_type}" if usage.machine_type else "")
            + f", about ${estimate(usage, prices):.4f} on demand"
            + ("" if usage.time_source == "run_duration" else " (VM time from status events: Batch gave no run duration)"))
