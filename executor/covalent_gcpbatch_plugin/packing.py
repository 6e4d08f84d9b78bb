"""Packing: electrons that reach ``run()`` together with the same job spec run as ONE Batch job
(a pack), one task each, instead of one job (and one VM boot, one admission) per electron.

Batch admits about one job every 2 s and boots a VM per job in about 90 s (README "Performance");
a pack is admitted once and its VMs run task after task (``pack_parallelism`` at once). Each
electron keeps its own objects, its own task (``BATCH_TASK_INDEX``), its own retries and time
limit, and ends with its own task-level notification.

Here: which ``run()`` calls share a pack (``Packer``: the calls of one event loop whose specs are
equal but for the node id, from executors whose ``PACK_SETTING_KEYS`` are equal, closed after
``pack_window`` seconds with no newcomer), and what this process knows about its packs
(``PackRegistry``: an electron's place, who is still waiting, who was cancelled). The uploads and
Batch calls are the executor's (gcpbatch.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .protocol import MAX_PACK_TASKS, JobSpec

#: A pack closes at the latest this long after its first electron, however steady the arrivals: a
#: third of one VM boot on Batch. (A Covalent server hands a 200-electron fan-out to its executors
#: over about 27 s on a 2-core machine, 0.14 s apart at the median: bench/results.)
MAX_WAIT_S = 30.0

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
PACK_SETTING_KEYS = ("bucket_name", "pack_parallelism", "wait_mode", "pubsub_topic", "keep_artifacts",
                     "storage_emulator_host", "pubsub_emulator_host", "batch_api_endpoint")


def pack_key(spec: JobSpec, settings: Mapping[str, Any]) -> str:
    """Electrons pack together only if their job specs are equal but for the node id, and their
    executors' ``PACK_SETTING_KEYS`` are equal too (``settings``: an executor's attributes)."""
    shared = json.dumps({key: settings[key] for key in PACK_SETTING_KEYS}, sort_keys=True)
    return f"{spec.model_copy(update={'node_id': 0}).model_dump_json()} {shared}"


@dataclass
class _OpenPack(Generic[T]):
    members: list[T]
    futures: list[asyncio.Future]
    first_at: float
    timer: asyncio.TimerHandle | None = None


class Packer(Generic[T]):
    """Collects the members of open packs, per event loop and pack key. A pack is submitted (by
    ``submit``, given its members, answering one Placement each) when ``window`` seconds pass
    without a newcomer, ``MAX_WAIT_S`` after its first member, or at ``MAX_PACK_TASKS``."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, str], _OpenPack[T]] = {}
        #: Submits in flight: the event loop keeps only a weak reference to a task.
        self._submitting: set[asyncio.Task] = set()

    async def join(self, key: str, member: T, *, window: float,
                   submit: Callable[[list[T]], Awaitable[list[Placement]]]) -> Placement:
        loop = asyncio.get_running_loop()
        slot = (id(loop), key)
        pack = self._open.get(slot)
        if pack is None:
            pack = self._open[slot] = _OpenPack(members=[], futures=[], first_at=loop.time())
        future: asyncio.Future[Placement] = loop.create_future()
        pack.members.append(member)
        pack.futures.append(future)
        if pack.timer is not None:
            pack.timer.cancel()
        if len(pack.members) >= MAX_PACK_TASKS:
            self._close(slot, pack, submit)
        else:
            at = min(loop.time() + window, pack.first_at + max(MAX_WAIT_S, window))
            pack.timer = loop.call_at(at, self._close, slot, pack, submit)
        return await future

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
