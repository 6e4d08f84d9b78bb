"""Packing's pure parts: which run() calls share a pack (Packer), what a process knows of its packs
(PackRegistry), the pack's contract (ids, manifest, job) and task events read as electron events."""

import asyncio

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_plugin import jobs, packing, settings
from covalent_gcpbatch_plugin import protocol as p
from specs import deployment, spec


def run_joins(arrivals: list[tuple[float, str, str]], window: float, fail: bool = False,
              pacing: packing.Pacing | None = None, submitted_at: list[float] | None = None):
    """Members join at (delay after the previous, key, name); returns (submitted packs, placements by
    name). ``submitted_at``, if given, gets each submit's time since the first arrival."""
    submitted: list[list[str]] = []
    started: list[float] = []

    async def submit(members):
        submitted.append(list(members))
        if submitted_at is not None:
            submitted_at.append(asyncio.get_running_loop().time() - started[0])
        if fail:
            raise OSError("upload failed")
        if len(members) == 1:
            return [packing.ALONE]
        return [packing.Placement("cov-x-pack-1", i) for i in range(len(members))]

    async def main():
        tasks = {}
        packer = packing.Packer(pacing)
        started.append(asyncio.get_running_loop().time())
        for delay, key, name in arrivals:
            await asyncio.sleep(delay)
            tasks[name] = asyncio.ensure_future(packer.join(key, name, window=window, submit=submit))
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        return dict(zip(tasks, results))

    return submitted, asyncio.run(main())


def test_calls_close_together_with_one_spec_share_a_pack():
    submitted, placed = run_joins([(0, "a", "x"), (0.01, "a", "y"), (0.01, "a", "z")], window=0.1)
    assert submitted == [["x", "y", "z"]]
    assert [placed[n].index for n in "xyz"] == [0, 1, 2] and placed["x"].packed


def test_a_lone_call_runs_alone_and_other_specs_never_mix():
    submitted, placed = run_joins([(0, "a", "x"), (0, "b", "y")], window=0.05)
    assert sorted(submitted) == [["x"], ["y"]]
    assert placed["x"] == packing.ALONE and placed["y"] == packing.ALONE


#: Pacing at a unit test's scale: each gap below is at most half the quiet it must fit in.
QUICK = packing.Pacing(max_wait_s=10.0, follow_min_s=0.4, follow_max_s=1.2, pace_factor=4.0)


def arrivals(gaps: list[float], key: str = "a") -> list[tuple[float, str, str]]:
    return [(gap, key, f"e{i}") for i, gap in enumerate([0.0, *gaps])]


def test_a_pack_closes_after_a_quiet_window():
    """A pause longer than the followed pace closes the pack; the next electron waits only the window."""
    submitted, _ = run_joins([(0, "a", "x"), (0.01, "a", "y"), (1.8, "a", "z")], window=0.1, pacing=QUICK)
    assert submitted == [["x", "y"], ["z"]]


def test_a_lone_electron_waits_only_the_window():
    at: list[float] = []
    submitted, _ = run_joins([(0, "a", "x")], window=0.05, pacing=QUICK, submitted_at=at)
    assert submitted == [["x"]]
    assert at[0] < QUICK.follow_min_s, "no company came: the pack did not wait for a pace it never saw"


def test_arrivals_at_a_slow_uneven_pace_still_form_one_pack():
    """Gaps far longer than the window (a busy server) and uneven: once a second electron came
    within the window, the pack follows the hand-over."""
    gaps = [0.03, 0.2, 0.05, 0.5, 0.1, 0.35, 0.6, 0.02]
    submitted, placed = run_joins(arrivals(gaps), window=0.05, pacing=QUICK)
    assert submitted == [[f"e{i}" for i in range(len(gaps) + 1)]]
    assert all(placed[f"e{i}"].packed for i in range(len(gaps) + 1))


def test_a_fan_out_longer_than_the_cap_makes_packs_and_no_electron_alone():
    """Steady arrivals past ``max_wait_s``: the pack closes at its cap and the next electron starts
    the next pack at the pace already seen (not alone after the window)."""
    capped = packing.Pacing(max_wait_s=0.5, follow_min_s=0.4, follow_max_s=1.2)
    submitted, _ = run_joins(arrivals([0.02] + [0.15] * 10), window=0.05, pacing=capped)
    assert len(submitted) >= 2 and all(len(pack) >= 2 for pack in submitted), submitted
    assert [name for pack in submitted for name in pack] == [f"e{i}" for i in range(12)]


def test_a_pack_closes_at_its_task_cap():
    submitted, _ = run_joins(arrivals([0.01] * 6), window=0.05, pacing=packing.Pacing(max_tasks=3, follow_min_s=0.3))
    assert submitted == [["e0", "e1", "e2"], ["e3", "e4", "e5"], ["e6"]]


def test_the_followed_pace_is_bounded():
    pacing = packing.Pacing()
    assert pacing.quiet(0.5, None) == 0.5, "a lone electron pays the window"
    assert pacing.quiet(0.5, 0.01) == pacing.follow_min_s
    assert pacing.quiet(0.5, 1.0) == pacing.pace_factor * 1.0
    assert pacing.quiet(0.5, 60.0) == pacing.follow_max_s
    assert pacing.quiet(10.0, 0.01) == 10.0, "never shorter than the window"


def test_a_failed_submit_reaches_every_member():
    _, placed = run_joins([(0, "a", "x"), (0, "a", "y")], window=0.05, fail=True)
    assert all(isinstance(placed[n], OSError) for n in "xy")


def test_pack_key_ignores_only_the_node():
    shared = settings.PLUGIN_DEFAULTS
    assert packing.pack_key(spec(node_id=1), shared) == packing.pack_key(spec(node_id=7), shared)
    assert packing.pack_key(spec(vcpus=1), shared) != packing.pack_key(spec(vcpus=2), shared)
    assert packing.pack_key(spec(dispatch_id="d1"), shared) != packing.pack_key(spec(dispatch_id="d2"), shared)


@pytest.mark.parametrize("key, other", [("bucket_name", "another-bucket"), ("pack_parallelism", 7), ("wait_mode", "poll")])
def test_executors_that_differ_beyond_the_spec_never_share_a_pack(key, other):
    """Same spec, but the pack's objects would go to another bucket, or run at another parallelism,
    or its events would not be routed to the electron: not the same pack."""
    shared = settings.PLUGIN_DEFAULTS
    assert packing.pack_key(spec(), shared) != packing.pack_key(spec(), {**shared, key: other})
    assert set(packing.PACK_SETTING_KEYS) <= set(settings.PLUGIN_DEFAULTS), "every key is an executor setting"


def test_registry_knows_who_still_waits():
    registry = packing.PackRegistry()
    placements = registry.add("cov-x-pack-1", ("m0", "m1"))
    assert registry.placement("m1") == placements[1] == packing.Placement("cov-x-pack-1", 1)
    assert registry.placement("other") == packing.ALONE
    assert registry.settle("other", abandoned=True) is None
    assert registry.settle("m0", abandoned=True) == packing.Settled("cov-x-pack-1", last=False, abandoned=True)
    assert registry.settle("m1", abandoned=False) == packing.Settled("cov-x-pack-1", last=True, abandoned=True), \
        "one electron given up on is enough: the job may still run its task"
    registry.add("cov-x-pack-2", ("m2",))
    assert registry.settle("m2", abandoned=False) == packing.Settled("cov-x-pack-2", last=True, abandoned=False)
    assert registry.placement("m0") == packing.ALONE, "settled electrons are forgotten"


def test_pack_ids_and_objects():
    pack_id = p.make_pack_id("8F1C2D3E-aaaa", "a1b2c3d4")
    assert pack_id == "cov-8f1c2d3e-pack-a1b2c3d4" and p.JOB_ID_PATTERN.fullmatch(pack_id)
    assert p.is_pack_id(pack_id) and not p.is_pack_id(p.make_job_id("8f1c2d3e", 3, "a1"))
    assert p.node_id_of_job_id(pack_id) is None
    objects = p.PackObjects(pack_id)
    assert p.pack_id_of_pack_object(objects.manifest) == pack_id
    assert p.pack_id_of_pack_object(p.TaskObjects(p.make_job_id("d", 1, "a")).prefix + p.PACK_OBJECT) is None, \
        "only a pack's own prefix holds a manifest"
    assert p.job_id_of_task_object(objects.manifest) is None
    assert p.task_name("projects/p/locations/r/jobs/j", 7) == "projects/p/locations/r/jobs/j/taskGroups/group0/tasks/7"


@pytest.mark.parametrize("members, parallelism, problem", [
    (("cov-a-1-x",), 0, "at least 2"),
    (("cov-a-1-x", "cov-a-1-x"), 0, "distinct"),
    (("cov-a-1-x", "cov-a-pack-y"), 0, "not an electron"),
    (("cov-a-1-x", "cov-a-2-y"), -1, "greater than or equal"),
    (tuple(f"cov-a-{i}-x" for i in range(p.MAX_PACK_TASKS + 1)), 0, f"at most {p.MAX_PACK_TASKS}"),
])
def test_manifest_rules(members, parallelism, problem):
    payload = f'{{"members": {list(members)!r}, "parallelism": {parallelism}}}'.replace("'", '"').encode()
    with pytest.raises(p.SpecError, match=problem):
        p.PackManifest.loads(payload)


def test_a_pack_job_has_a_task_per_electron_and_task_notifications():
    manifest = p.PackManifest(members=("cov-a-1-x", "cov-a-2-y", "cov-a-3-z"), parallelism=2)
    job = jobs.build_job(spec(), bucket="b", job_id="cov-a-pack-q", settings=deployment(), pack=manifest)
    (group,) = job.task_groups
    assert group.task_count == 3 and group.parallelism == 2
    assert group.task_count_per_node == 1, "one electron per VM at a time, as each asked for its own vcpus and memory"
    assert dict(group.task_spec.environment.variables) == {p.ENV_BUCKET: "b", p.ENV_PACK_ID: "cov-a-pack-q"}
    Type = batch_v1.JobNotification.Type
    assert [n.message.type_ for n in job.notifications] == [Type.JOB_STATE_CHANGED, Type.TASK_STATE_CHANGED]
    lone = jobs.build_job(spec(), bucket="b", job_id="cov-a-1-x", settings=deployment())
    assert [n.message.type_ for n in lone.notifications] == [Type.JOB_STATE_CHANGED]


def test_task_states_read_as_electron_states():
    assert {s: p.member_event("m", s).state.value for s in p.JOB_STATE_OF_TASK_STATE} == {
        "PENDING": "QUEUED", "ASSIGNED": "SCHEDULED", "RUNNING": "RUNNING", "SUCCEEDED": "SUCCEEDED",
        "FAILED": "FAILED", "UNEXECUTED": "CANCELLED"}
    assert p.member_event("m", "STATE_UNSPECIFIED") is None
    assert set(p.JOB_STATE_OF_TASK_STATE) == {s.name for s in batch_v1.TaskStatus.State} - {"STATE_UNSPECIFIED"}, \
        "every task state Batch has is read"


def test_objects_of_a_job_id_are_its_packs_or_its_tasks():
    assert p.objects_of("cov-a-pack-q") == p.PackObjects("cov-a-pack-q")
    assert p.objects_of("cov-a-1-x") == p.TaskObjects("cov-a-1-x")
    assert p.PackObjects("cov-a-pack-q").cancelled == "covalent-gcpbatch/cov-a-pack-q/cancelled"


def test_docs_state_the_packing_facts_as_declared():
    from pathlib import Path

    from covalent_gcpbatch_plugin import worker

    design = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()  # linked from the README
    section = design[design.index("\n## Packing\n"):design.index("\n## Security model")]
    assert f"at most {p.MAX_PACK_TASKS:,} electrons" in section
    assert f"`CANCEL_CHECK_S` ({worker.CANCEL_CHECK_S:g} s)" in section
    assert f"(exit {p.EXIT_CANCELLED})" in section
    assert f"(0.5 by default; a pack closes {packing.MAX_WAIT_S:g} s after its first\nelectron" in section
    pacing = packing.Pacing()
    assert (f"next one {pacing.pace_factor:g} times the longest gap seen so far between arrivals of its key (at least "
            f"{pacing.follow_min_s:g} s, at most\n{pacing.follow_max_s:g} s). At its cap ({pacing.max_wait_s:g} s or "
            f"{pacing.max_tasks:,} electrons)") in section
    assert f"a pack waits at least {pacing.follow_min_s:g} s after its last electron" in section
    assert settings.PLUGIN_DEFAULTS["pack_window"] == 0.5


class MonotonicClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_more_electrons_skip_the_pack_window_than_warm_vms_wait():
    """A keep_warm electron goes alone (no pack window) while a warm VM of its spec waits; the
    VMs this process's electrons went for still list as waiting until the function routes them,
    so they are counted until released (routed, or their run ended) or for OFFER_TAKE_S: a fan-out
    larger than the waiting VMs still packs, and a chain's next electron finds its VM free again."""
    clock = MonotonicClock()
    takers = packing.WarmTakers(clock=clock)
    assert takers.window_s == p.OFFER_TAKE_S
    assert [takers.take("k", f"e{i}", waiting=2) for i in range(4)] == [True, True, False, False]
    assert takers.take("other", "o1", waiting=1) and not takers.take("other", "o2", waiting=1), "each key on its own"
    assert not takers.take("none", "n1", waiting=0), "no VM waits: pack as usual"
    takers.release("e0")
    assert takers.take("k", "e4", waiting=2), "e0 was routed: its VM is not counted twice"
    assert not takers.take("k", "e5", waiting=2)
    clock.now += p.OFFER_TAKE_S
    assert takers.take("k", "e6", waiting=1), "never routed (a lost offer): counted OFFER_TAKE_S at most"
