"""What a Batch job used and what that cost: pure, from the job's own fields.

A job's VM exists from the moment Batch schedules the job (it creates the VM) until the job ends,
so its VM-seconds are the time between the job's SCHEDULED and terminal status events, which real
Batch writes and the local Batch service writes alike. Compute Engine bills every VM for at least
a minute, then per second. The price is an estimate from on-demand list prices (override them with
a JSON file of the same shape: ``covalent-gcpbatch cost --prices FILE``); discounts, Spot prices,
disks and network are not in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .protocol import state_name

if TYPE_CHECKING:  # read only: the executor module imports this, and the worker image has no batch client
    from google.cloud import batch_v1

#: Compute Engine's billing minimum per VM.
MIN_BILLED_S = 60.0
#: USD per hour, on demand, us-central1: Compute Engine "VM instance pricing" (N2 and E2 predefined
#: vCPU and memory; GPUs from "GPU pricing"). List prices change: check them, or pass your own.
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


def vm_seconds(job: batch_v1.Job) -> float:
    """From the job's SCHEDULED event to its terminal one (to now for a job still running); 0 for a
    job that never got a VM."""
    started = _state_entered(job, "SCHEDULED")
    if started is None:
        return 0.0
    ended = next((t for t in (_state_entered(job, s) for s in _TERMINAL) if t is not None), None)
    end = ended or datetime.now(started.tzinfo)
    return max(0.0, (end - started).total_seconds())


def usage_of(job: batch_v1.Job) -> Usage:
    resources = job.task_groups[0].task_spec.compute_resource if job.task_groups else None
    instance = job.allocation_policy.instances[0].policy if job.allocation_policy.instances else None
    machine = instance.machine_type if instance else ""
    accelerators = list(instance.accelerators) if instance else []
    # A machine type sets the VM's size; otherwise Batch picks one for the task's cpu_milli/memory_mib.
    return Usage(
        job_id=job.name.rsplit("/", 1)[-1],
        state=state_name(job.status.state),
        vm_seconds=vm_seconds(job),
        vcpus=resources.cpu_milli / 1000 if resources and resources.cpu_milli else 1.0,
        memory_gib=resources.memory_mib / 1024 if resources and resources.memory_mib else 0.5,
        machine_family=machine.split("-", 1)[0] if machine else "",
        gpus=sum(a.count for a in accelerators),
        gpu_type=accelerators[0].type_ if accelerators else "",
    )


def load_prices(path: str | None) -> dict[str, dict[str, float]]:
    if not path:
        return DEFAULT_PRICES
    given = json.loads(Path(path).read_text())
    return {kind: {**DEFAULT_PRICES[kind], **given.get(kind, {})} for kind in DEFAULT_PRICES}


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
            + f", about ${estimate(usage, prices):.4f} on demand")
