"""How long real Batch takes, as a model the local Batch service can run (off by default).

On Google Cloud an electron's cost is Batch's, not the pipeline's: admission, a VM boot per job, a
one-minute billing minimum. The local service answers at once unless started with
``--latency-model realistic``; then each job waits as real Batch makes it wait, compressed by
``--time-scale`` (0.05 runs a 90 s boot in 4.5 s), and the service bills every VM as Compute
Engine does. Each default names its source; docs/performance.md repeats them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LatencyModel:
    enabled: bool = False
    #: CreateJob -> SCHEDULED: about 5 s (public timings of Batch jobs: ../shared/notes/platform.md,
    #: "Real Batch timings").
    create_to_scheduled_s: float = 5.0
    #: Jobs Batch moves from QUEUED to SCHEDULED per second: about one every 2 s in practice
    #: (ClusterFuzz PR #3558 merged tasks into one job for that reason).
    admission_per_s: float = 0.5
    #: SCHEDULED -> RUNNING for a new VM (provisioning, boot, image pull): Cromwell's logged jobs
    #: took 88.9 s and 94.6 s, Google's transcoding sample 127 s; a 600 MB image alone took 1-2.5 min
    #: to pull (Nextflow PR #6836). 90 s.
    boot_s: float = 90.0
    #: The boot of a job whose container streams its image (Container.enable_image_streaming), as a
    #: share of ``boot_s``: a 600 MB image's jobs started in ~1 minute instead of ~2.5 with
    #: streaming (Nextflow PR #6836), 1 / 2.5 of the time.
    image_streaming_boot_share: float = 1.0 / 2.5
    #: Compute Engine bills a VM for at least one minute, then per second.
    min_billed_s: float = 60.0
    #: Real seconds per model second.
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.time_scale <= 0 or self.admission_per_s <= 0:
            raise ValueError("time_scale and admission_per_s must be positive")

    @classmethod
    def realistic(cls, time_scale: float = 1.0) -> LatencyModel:
        return cls(enabled=True, time_scale=time_scale)

    def boot_seconds(self, *, image_streaming: bool = False) -> float:
        """Model seconds from SCHEDULED to RUNNING on a new VM."""
        return self.boot_s * (self.image_streaming_boot_share if image_streaming else 1.0)

    def real(self, model_s: float) -> float:
        """Real seconds the service waits for ``model_s`` of Batch's time (none when off)."""
        return model_s * self.time_scale if self.enabled else 0.0

    def model_seconds(self, real_s: float) -> float:
        return real_s / self.time_scale

    def billed(self, vm_real_s: float) -> float:
        """Model seconds Compute Engine bills for a VM that lived ``vm_real_s`` real seconds."""
        return max(self.min_billed_s, self.model_seconds(vm_real_s))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Admission:
    """When each new job may leave QUEUED: not before ``create_to_scheduled_s`` after its creation,
    and at most ``admission_per_s`` jobs per second, in creation order."""

    model: LatencyModel
    next_at: float = field(default=0.0)

    def admit_at(self, created_at: float) -> float:
        if not self.model.enabled:
            return created_at
        at = max(created_at + self.model.real(self.model.create_to_scheduled_s), self.next_at)
        self.next_at = at + self.model.real(1.0 / self.model.admission_per_s)
        return at


@dataclass
class VmLedger:
    """The VMs the service's jobs would have used: boots, lifetime and billed seconds (model time),
    and each VM's life (real wall-clock start and end, for timelines)."""

    model: LatencyModel
    boots: int = 0
    lifetime_s: float = 0.0
    billed_s: float = 0.0
    intervals: list[tuple[float, float]] = field(default_factory=list)

    def boot(self) -> None:
        self.boots += 1

    def release(self, since: float, until: float) -> float:
        """A VM created at ``since`` is deleted at ``until`` (wall clock): add its time; return its
        billed seconds."""
        billed = self.model.billed(until - since)
        self.lifetime_s += self.model.model_seconds(until - since)
        self.billed_s += billed
        self.intervals.append((round(since, 3), round(until, 3)))
        return billed

    def to_json(self) -> dict:
        return {"boots": self.boots, "lifetime_s": round(self.lifetime_s, 3), "billed_s": round(self.billed_s, 3),
                "intervals": self.intervals}
