"""Packing: electrons that reach ``run()`` together with the same job spec run as ONE Batch job
(a pack), one task each, instead of one job (and one VM boot, one admission) per electron.

Batch admits about one job every 2 s and boots a VM per job in about 90 s (docs/performance.md);
a pack is admitted once and its VMs run task after task (``pack_parallelism`` at once). Each
electron keeps its own objects, its own task (``BATCH_TASK_INDEX``), its own retries and time
limit, and ends with its own task-level notification.

Here: which ``run()`` calls share a pack (``Packer``: the calls of one event loop whose specs are
equal but for the node id, from executors whose ``PACK_SETTING_KEYS`` are equal; when a pack
closes is ``Pacing``'s rule), and what this process knows about its packs (``PackRegistry``: an
electron's place, who is still waiting, who was cancelled). The uploads and Batch calls are the
executor's (gcpbatch.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .protocol import MAX_PACK_TASKS, OFFER_TAKE_S, JobSpec

#: A pack closes at the latest this long after its first electron, however steady the arrivals: a
#: third of one VM boot on Batch. (A Covalent server handed a 200-electron fan-out to its executors
#: over 27 s, 0.14 s apart at the median, on a 2-core Intel machine (bench/results), and over 12 s,
#: 0.06 s apart (the longest gap 0.11 s), on a 2-core AMD EPYC one (tests/stack/test_packing.py's
#: 200-electron run, its arrivals logged by hand on 2026-12-02);
#: a pack's workers starting on the same cores can stretch the gaps past a second.)
MAX_WAIT_S = 30.0


@dataclass(frozen=True)
class Pacing:
    """When a pack closes: the rule follows the pace at which the Covalent server hands electrons
    over, not a fixed quiet time, since that pace is the server's (a busy server, a slow machine,
    a big graph hand over seconds apart; a pack's own workers starting on the same cores slow it).

    * A lone electron waits ``window`` (``pack_window``) for company, no longer.
    * Once a second one came, the fan-out is being handed over: the pack waits for the next
      electron ``pace_factor`` times the longest gap seen between this key's arrivals, at least
      ``follow_min_s``, at most ``follow_max_s`` (never less than ``window``).
    * A pack closes at its cap, ``max_wait_s`` after its first electron or at ``max_tasks``; an
      electron arriving within the followed pace after that starts the next pack at that pace, so
      a fan-out longer than the cap makes several packs, no electron alone.
    """

    max_wait_s: float = MAX_WAIT_S
    max_tasks: int = MAX_PACK_TASKS
    follow_min_s: float = 2.0
    follow_max_s: float = 10.0
    pace_factor: float = 4.0

    def quiet(self, window: float, longest_gap: float | None) -> float:
        """How long a pack waits for its next electron (``longest_gap`` None: no company yet)."""
        if longest_gap is None:
            return window
        return max(window, min(self.follow_max_s, max(self.follow_min_s, self.pace_factor * longest_gap)))


@dataclass
class _Pace:
    """The arrivals of one pack key, for as long as they keep coming."""

    last_at: float
    quiet: float
    longest_gap: float | None = None


T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    """Where an electron runs: alone (its own job, ``pack_id`` None) or as task ``index`` of a pack."""

    pack_id: str | None = None
    index: int = 0

    @property
    def packed(self) -> bool:
        return self.pack_id is not None


ALONE = Placement()


#: Executor settings that shape a pack beyond its job spec: the bucket its objects go to, its
#: parallelism, how its notifications reach the electrons, the endpoints its members read.
PACK_SETTING_KEYS = ("bucket_name", "task_bucket_name", "pack_parallelism", "wait_mode", "pubsub_topic", "keep_artifacts",
                     "storage_emulator_host", "pubsub_emulator_host", "batch_api_endpoint")


def pack_key(spec: JobSpec, settings: Mapping[str, Any]) -> str:
    """Electrons pack together only if their job specs are equal but for the node id, and their
    executors' ``PACK_SETTING_KEYS`` are equal too (``settings``: an executor's attributes)."""
    shared = json.dumps({key: settings[key] for key in PACK_SETTING_KEYS}, sort_keys=True)
    return f"{spec.model_copy(update={'node_id': 0}).model_dump_json()} {shared}"


class WarmTakers:
    """Which lone electrons skip the pack window for a warm VM: a ``keep_warm`` electron whose
    spec a waiting VM may run is better off there at once than packed onto new VMs. The function
    routes it (the executor only counts): a VM an electron of this process went for still lists
    as waiting until the function has routed that upload, so each key's goers not yet routed (not
    ``release``d, and for ``window_s`` at most) are counted against the waiting VMs; more electrons
    than VMs are packed as usual."""

    def __init__(self, window_s: float = OFFER_TAKE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._going: dict[str, dict[str, float]] = collections.defaultdict(dict)

    def take(self, key: str, job_id: str, waiting: int) -> bool:
        """Whether electron ``job_id`` of warm key ``key`` goes to a warm VM alone, ``waiting``
        VMs of that key listed as waiting (it is counted until released, if so)."""
        now, going = self.clock(), self._going[key]
        for stale in [j for j, since in going.items() if since <= now - self.window_s]:
            del going[stale]
        if len(going) >= waiting:
            return False
        going[job_id] = now
        return True

    def release(self, job_id: str) -> None:
        """The electron was routed (offered to a VM, or given a job of its own), or its run ended."""
        for going in self._going.values():
            going.pop(job_id, None)


@dataclass
class _OpenPack(Generic[T]):
    members: list[T]
    futures: list[asyncio.Future]
    first_at: float
    timer: asyncio.TimerHandle | None = None


class Packer(Generic[T]):
    """Collects the members of open packs, per event loop and pack key. A pack is submitted (by
    ``submit``, given its members, answering one Placement each) when its ``Pacing`` says so."""

    def __init__(self, pacing: Pacing | None = None) -> None:
        self.pacing = pacing or Pacing()
        self._open: dict[tuple[int, str], _OpenPack[T]] = {}
        self._paces: dict[tuple[int, str], _Pace] = {}
        #: Submits in flight: the event loop keeps only a weak reference to a task.
        self._submitting: set[asyncio.Task] = set()

    async def join(self, key: str, member: T, *, window: float,
                   submit: Callable[[list[T]], Awaitable[list[Placement]]]) -> Placement:
        loop = asyncio.get_running_loop()
        slot, now = (id(loop), key), loop.time()
        quiet = self._arrive(slot, now, window)
        pack = self._open.get(slot)
        if pack is None:
            pack = self._open[slot] = _OpenPack(members=[], futures=[], first_at=now)
        future: asyncio.Future[Placement] = loop.create_future()
        pack.members.append(member)
        pack.futures.append(future)
        if pack.timer is not None:
            pack.timer.cancel()
        if len(pack.members) >= self.pacing.max_tasks:
            self._close(slot, pack, submit)
        else:
            at = min(now + quiet, pack.first_at + max(self.pacing.max_wait_s, window))
            pack.timer = loop.call_at(at, self._close, slot, pack, submit)
        return await future

    def _arrive(self, slot: tuple[int, str], now: float, window: float) -> float:
        """Record an arrival of ``slot``'s key; how long its pack now waits for the next one."""
        for stale in [s for s, pace in self._paces.items() if now - pace.last_at > pace.quiet]:
            del self._paces[stale]
        pace = self._paces.get(slot)
        if pace is None:
            pace = self._paces[slot] = _Pace(last_at=now, quiet=self.pacing.quiet(window, None))
            return pace.quiet
        pace.longest_gap = max(pace.longest_gap or 0.0, now - pace.last_at)
        pace.last_at = now
        pace.quiet = self.pacing.quiet(window, pace.longest_gap)
        return pace.quiet

    def _close(self, slot: tuple[int, str], pack: _OpenPack[T], submit) -> None:
        if self._open.get(slot) is pack:
            del self._open[slot]
        task = asyncio.ensure_future(self._submit(pack, submit))
        self._submitting.add(task)
        task.add_done_callback(self._submitting.discard)

    @staticmethod
    async def _submit(pack: _OpenPack[T], submit) -> None:
        try:
            placements = await submit(pack.members)
        except BaseException as err:  # noqa: BLE001 - every member's run() reports it
            for future in pack.futures:
                if not future.done():
                    future.set_exception(err if isinstance(err, Exception) else RuntimeError(repr(err)))
            return
        for future, placement in zip(pack.futures, placements):
            if not future.done():
                future.set_result(placement)


@dataclass
class _PackState:
    members: tuple[str, ...]
    waiting: set[str] = field(default_factory=set)
    abandoned: bool = False


@dataclass(frozen=True)
class Settled:
    """What ``PackRegistry.settle`` says about the pack once an electron is done with it."""

    pack_id: str
    last: bool  # no electron of the pack waits any more
    #: Some electron stopped waiting before its task ended (cancelled, given up on): the job may
    #: still have work nobody waits for.
    abandoned: bool = False


class PackRegistry:
    """This process's packs: each electron's placement and which electrons still wait (once none
    does, the executor closes the pack). Thread-safe (cancel() may come from another thread); no I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._packs: dict[str, _PackState] = {}
        self._placements: dict[str, Placement] = {}

    def add(self, pack_id: str, members: tuple[str, ...]) -> list[Placement]:
        placements = [Placement(pack_id, index) for index in range(len(members))]
        with self._lock:
            self._packs[pack_id] = _PackState(members=members, waiting=set(members))
            self._placements.update(zip(members, placements))
        return placements

    def placement(self, job_id: str) -> Placement:
        with self._lock:
            return self._placements.get(job_id, ALONE)

    def members(self, pack_id: str) -> tuple[str, ...]:
        with self._lock:
            state = self._packs.get(pack_id)
            return state.members if state else ()

    def settle(self, job_id: str, *, abandoned: bool) -> Settled | None:
        """The electron is done waiting (``abandoned``: before its task ended); None if it was not packed."""
        with self._lock:
            placement = self._placements.pop(job_id, None)
            if placement is None or placement.pack_id is None:
                return None
            state = self._packs[placement.pack_id]
            state.waiting.discard(job_id)
            state.abandoned = state.abandoned or abandoned
            last = not state.waiting
            if last:
                del self._packs[placement.pack_id]
            return Settled(placement.pack_id, last, state.abandoned)
